"""Shared-memory tiles of a CTA and the SIMT pieces that move and multiply them (thread-owned elements).

A CTA of NT threads gives each thread a fixed set of elements of a [R, C] tile: e = k * NT + tx for k in
[0, R*C/NT), element (e // C, e % C). Tiles live in flat 1-D shared buffers with an explicit row stride
(TVM compacts padded 2-D buffers back to dense rows; TVM_NOTES §4b), so `smem_pad` really pads them."""
from __future__ import annotations

from ...core.abi import pad16
from ...kernels.common.tir import T, ns


def geometry(spec, knobs) -> ns:
    """Compile-time sizes of the tiles: rows (BM, BN), padded widths (DP, DVP) and row strides (KLD, VLD, PLD)."""
    pad = knobs.smem_pad
    dp, dvp = pad16(spec.d), pad16(spec.dv)
    return ns(BM=knobs.block_m, BN=knobs.block_n, NT=knobs.threads, D=spec.d, DV=spec.dv, DP=dp, DVP=dvp,
              KLD=dp + pad, VLD=dvp + pad, PLD=knobs.block_n + pad)


def shared_floats(g, dpse: bool) -> dict[str, int]:
    """The shared buffers of a CTA (both kernels declare the same set): {name: fp32 elements}. Must agree with
    schedules/cuda.smem_floats."""
    out = {"ks": g.BN * g.KLD, "vs": g.BN * g.VLD, "qs": g.BM * g.KLD, "dys": g.BM * g.VLD, "ps": g.BM * g.PLD,
           "dss": g.BM * g.PLD, "rm": g.BM, "rr": g.BM, "rd": g.BM, "red": g.NT}
    if dpse:
        out["es"] = g.BM * g.PLD
    return out


def make_load_rows(R: int, W: int, NT: int):
    """dst[r * ld + c] = widened src[base + r * stride + c] for r < nrows, c < width (width <= W, compile-time),
    zero elsewhere in the [R, W] tile: every thread moves R*W/NT elements (consecutive threads, consecutive
    columns: coalesced global reads)."""
    assert (R * W) % NT == 0, (R, W, NT)

    @T.macro
    def load(dst, ld, dt, src, base, stride, nrows, width, tx):
        for kk in T.serial((R * W) // NT, annotations={"pragma_unroll": 1}):
            if T.And((kk * NT + tx) // W < nrows, (kk * NT + tx) % W < width):
                dst[(kk * NT + tx) // W * ld + (kk * NT + tx) % W] = dt.ld(
                    src, base + T.Cast("int64", (kk * NT + tx) // W) * stride + (kk * NT + tx) % W)
            else:
                dst[(kk * NT + tx) // W * ld + (kk * NT + tx) % W] = T.float32(0)

    return load


def make_row_stats(BM: int, NT: int, csoft, stats_lanes: int):
    """rm / rr / rd of the tile's rows (row max and bounded 1/sum to rebuild P, and Di), zero past nrows."""

    @T.macro
    def stats(sm, gb, row_first, di_first, nrows, tx):
        for kk in T.serial((BM + NT - 1) // NT):
            if kk * NT + tx < BM:
                if kk * NT + tx < nrows:
                    sm.rm[kk * NT + tx] = csoft.row_max_for_p(gb.smax[(row_first + kk * NT + tx) * stats_lanes],
                                                              gb.ssum[(row_first + kk * NT + tx) * stats_lanes])
                    sm.rr[kk * NT + tx] = T.min(csoft.row_rsum_for_p(
                        gb.smax[(row_first + kk * NT + tx) * stats_lanes],
                        gb.ssum[(row_first + kk * NT + tx) * stats_lanes]), T.float32(csoft.RR_MAX))
                    sm.rd[kk * NT + tx] = gb.ws[di_first + kk * NT + tx]
                else:
                    sm.rm[kk * NT + tx] = T.float32(0)
                    sm.rr[kk * NT + tx] = T.float32(0)
                    sm.rd[kk * NT + tx] = T.float32(0)

    return stats


def make_accumulate_t(g, rows: int, width: int, a_ld: int, b_ld: int):
    """acc[k] += sum_i A[i, r] * B[i, c] over the tile's BM rows i, for the thread's elements (r, c) of the
    [rows, width] product A^T B (dV += P^T dY, dK += dS^T Q)."""
    E = rows * width // g.NT
    assert (rows * width) % g.NT == 0

    @T.macro
    def acc_t(a, b, acc, ni, tx):
        for i in T.serial(ni):
            for k in T.unroll(E):
                acc[k] = acc[k] + a[i * a_ld + (k * g.NT + tx) // width] * b[i * b_ld + (k * g.NT + tx) % width]

    return acc_t, E


def make_accumulate_n(g):
    """acc[k] += sum_j dS[r, j] * K[j, c] over the tile's key rows j (dQ += dS K), thread's elements of [BM, DP]."""
    E = g.BM * g.DP // g.NT
    assert (g.BM * g.DP) % g.NT == 0

    @T.macro
    def acc_n(sm, acc, nj, tx):
        for j in T.serial(nj):
            for k in T.unroll(E):
                acc[k] = acc[k] + sm.dss[(k * g.NT + tx) // g.DP * g.PLD + j] * sm.ks[j * g.KLD + (k * g.NT + tx) % g.DP]

    return acc_n, E
