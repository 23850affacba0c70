"""pse(b, n, i, j) of every pse kind (SPEC §4): external tensors, the 1024-row alibi-compressed form,
and alibi generated from slopes (with q_start_idx / kv_start_idx)."""
from __future__ import annotations

from ...config import ALIBI_ROWS
from .tir import T, ns


def pse_value(c, gi, gj):
    """fp32 pse of cell (gi, gj) for the kernel's pse kind, or None without pse (c: the head context)."""
    spec, dt = c.spec, c.dt
    if spec.pse == "ext":
        return dt.ld(c.pse, c.pse_head + gi * c.p_si + gj)
    if spec.pse == "alibi_c":
        W = c.alibi_skv
        sqa = c.alibi_sq
        top = sqa - ALIBI_ROWS
        m0 = T.Select(gi >= top, gi - top, T.floormod(gi, ALIBI_ROWS))
        c0 = T.Select(gi >= top, gj, gj + (W - ALIBI_ROWS) + T.floormod(gi, ALIBI_ROWS) - gi)
        t = gi - gj
        m1 = T.Select(t >= 0, T.int64(ALIBI_ROWS - 1), t + (ALIBI_ROWS - 1))
        c1 = T.Select(t >= 0, W - 1 - t, W - 1)
        mm = T.Select(c.alibi_mode == 0, m0, m1)
        cc = T.Select(c.alibi_mode == 0, c0, c1)
        mm = T.max(T.min(mm, T.int64(ALIBI_ROWS - 1)), T.int64(0))
        cc = T.max(T.min(cc, W - 1), T.int64(0))
        return dt.ld(c.pse, c.pse_head + mm * c.p_si + cc)
    if spec.pse in ("slopes", "slopes_sqrt"):
        dist = T.abs(T.Cast("float32", (gj + c.kv_start) - (gi + c.q_start)))
        if spec.pse == "slopes_sqrt":
            dist = T.sqrt(dist)
        return -c.slope * dist
    return None


def slope_of(spec, pse, idx):
    """The alibi slope of a head (0 for kernels without slopes)."""
    return pse[idx] if spec.pse in ("slopes", "slopes_sqrt") else T.float32(0)


def pse_region(spec, md, n):
    """ns(base, stride, rows, width) of the pse block query head n of batch md.b reads: its [Sq_b, Skv_b]
    rows (one broadcast row for BN1S forms), the [1024, W] compressed block, or its one slope. The
    non-finite scan (poison) and the dpse poison fill cover exactly this block."""
    base = md.pse_off + n * md.p_sn
    if spec.pse == "ext":
        return ns(base=base, stride=md.p_si, rows=T.Select(md.p_si == 0, T.int64(1), md.sq), width=md.skv)
    if spec.pse == "alibi_c":
        return ns(base=base, stride=md.p_si, rows=T.int64(ALIBI_ROWS), width=md.alibi_skv)
    return ns(base=base, stride=T.int64(0), rows=T.int64(1), width=T.int64(1))
