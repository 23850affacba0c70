"""Masks: the structural band/prefix rule (SPEC §5, ABI.md bmeta PRE/NEXT/PREFIX) per cell and per tile,
and the element-wise atten_mask. Tile rules let every target skip fully masked tiles and evaluate the
mask per element only in partial tiles."""
from __future__ import annotations

from .tir import T, tirx


def band_any_visible(i0, i1, j0, j1, pre, nxt, prefix):
    """Tile [i0,i1) x [j0,j1) (non-empty) has a cell with -PRE <= j-i <= NEXT, or j0 < PREFIX."""
    lo = j0 - i1 + 1
    hi = j1 - 1 - i0
    return T.Or(T.max(lo, -pre) <= T.min(hi, nxt), j0 < prefix)


def band_all_visible(i0, i1, j0, j1, pre, nxt, prefix):
    """Every cell of the tile is visible under the band rule (sufficient condition)."""
    return T.Or(T.And(j1 - 1 - i0 <= nxt, i1 - 1 - j0 <= pre), j1 <= prefix)


def band_cell_visible(gi, gj, pre, nxt, prefix):
    d = gj - gi
    return T.Or(T.And(d <= nxt, -d <= pre), gj < prefix)


def skip_tiles(band: bool, tile_skip, j0, prefix):
    """Whether q blocks outside the band may be skipped for the KV block starting at j0: only with a band
    rule, TILE_SKIP=1, and not in prefix columns (which every row sees)."""
    if not band:
        return T.bool(False)
    return T.And(tile_skip != 0, j0 >= prefix)


def q_block_lo(j0, nxt, bq: int, skip):
    """First q block of size bq that can see KV rows from j0 (rows >= j0 - NEXT); 0 without skipping."""
    return T.Select(skip, T.max(j0 - nxt, T.int64(0)) // bq, T.int64(0))


def q_block_hi(j0, nj, sq, nqb, bq: int, pre, nxt, skip):
    """One past the last q block that can see KV rows [j0, j0+nj) (rows <= j0 + nj - 1 + PRE); all nqb
    blocks without skipping; none when the band is empty (-PRE > NEXT)."""
    return T.Select(skip, T.Select(-pre > nxt, T.int64(0), T.min((T.min(j0 + nj + pre, sq) + (bq - 1)) // bq, nqb)),
                    nqb)


def cell_masked(c, gi, gj, check_band: bool):
    """Boolean expression: cell (gi, gj) masked (band rule when check_band, atten_mask when the spec reads
    one), or None when nothing can mask it. `c` is the head context (fag_tvm.kernels.common.context)."""
    conds = []
    if check_band:
        conds.append(T.Not(band_cell_visible(gi, gj, c.pre, c.nxt, c.prefix)))
    if c.spec.full_mask:
        conds.append(c.mask[c.mask_head + gi * c.m_si + gj] != tirx.const(0, "uint8"))
    if not conds:
        return None
    out = conds[0]
    for x in conds[1:]:
        out = T.Or(out, x)
    return out
