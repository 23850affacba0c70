"""Forward kernel (online softmax, FA2-like on CPU) as hand-written TIR generated from Python (ABI.md).

One task = (b, n) query head. Per q block: pack Q; running max m = -FLT_MAX (finite, as CANN: a
fully masked row then behaves like CANN's uniform P), running sum l = 0, O accumulator = 0; for each
KV block that intersects the band (TILE_SKIP=1): pack K^T, V; S = Q K^T (micro-kernel); cells (score,
pse, masks, dropout factor); per row: new max, alpha = exp(m_old - m_new), P = exp(S - m_new), l, O *= alpha;
P' = P * drop / keep rounded to dtype; O += P' V (micro-kernel). Finally o = O / l, smax = m, ssum = l
(8 lanes); with INVALID_ROWS=1 a row whose max stayed -FLT_MAX gets o = 0, (-FLT_MAX, +FLT_MAX).
A task whose inputs (q rows, k/v rows, pse block) hold a NaN or ±Inf writes NaN to its o rows and stats
instead (poison); with finite inputs scores and outputs saturate (kernels/common/finite).
"""
from __future__ import annotations

from ...core.abi import FPARAMS_LEN, I_B, I_N2, IPARAMS_LEN, STATS_LANES, pad16, param_names
from ...core.spec import KernelSpec
from ...kernels.common import dropout as cdrop
from ...kernels.common import mask as cmask
from ...kernels.common import softmax as csoft
from ...kernels.common.context import batch_prologue, head_context
from ...kernels.common.dtype import DType
from ...kernels.common.finite import nan32
from ...kernels.common.pse import slope_of
from ...kernels.common.score import score_expr
from ...kernels.common.tir import FLT_MAX, T, ns
from . import microkernels as M


def make_fwd(spec: KernelSpec, knobs, name: str = "fag_fwd"):
    """The forward PrimFunc of `spec` with the LLVM schedule `knobs` (schedules/llvm.py)."""
    from ...schedules.llvm import gemm_shape

    assert spec.direction == "fwd"
    BQ, BKV, VEC = knobs.block_q, knobs.block_kv, knobs.vec
    D, DV, G = spec.d, spec.dv, spec.group
    DVP = pad16(DV)
    dt = DType(spec.dtype)
    SD = dt.storage
    PD = spec.pse_storage_dtype
    LOWP = dt.lowp
    DROP = spec.dropout
    NCH = BKV // VEC

    gemm_s = M.make_gemm(BQ, BKV, D, *gemm_shape(knobs, BQ, BKV), VEC, False, False)
    gemm_o = M.make_gemm(BQ, DVP, BKV, *gemm_shape(knobs, BQ, DVP), VEC, False, True)
    pack_q = M.make_pack_rows(BQ, D, D, VEC, dt)
    pack_kt = M.make_pack_rows_t(BKV, D, VEC, dt)
    pack_v = M.make_pack_rows(BKV, DV, DVP, VEC, dt)

    def tile_visible(tile_skip, i0, i1, j0, j1, pre, nxt, prefix):
        if not spec.band:
            return T.bool(True)
        return T.Or(tile_skip == 0, cmask.band_any_visible(i0, i1, j0, j1, pre, nxt, prefix))

    def make_cell(check_band: bool):
        @T.macro
        def cell(c, t, i, j):
            t.St[i, j] = score_expr(c, t.St[i, j], t.i0 + i, t.j0 + j, check_band)
            if DROP:
                t.Dk[i, j] = cdrop.drop_keep_factor(c, t.i0 + i, t.j0 + j)

        return cell

    @T.macro
    def pad(c, t, i, j):
        t.St[i, j] = T.float32(float("-inf"))
        if DROP:
            t.Dk[i, j] = T.float32(0)

    tile_cells = M.make_masked_tile(M.make_tile_cells(BQ, BKV, VEC, make_cell(False), pad),
                                    M.make_tile_cells(BQ, BKV, VEC, make_cell(True), pad), spec.band)

    @T.macro
    def oscale_body(a, c):
        a.O[a.i, c] = a.O[a.i, c] * a.alpha

    oscale_cols = M.make_cols(DVP, VEC, oscale_body)

    @T.macro
    def ozero_body(a, c):
        a.O[a.i, c] = T.float32(0)

    ozero_cols = M.make_cols(DVP, VEC, ozero_body)

    @T.macro
    def oout_body(a, c):
        a.o[a.obase + c] = dt.st_sat(a.O[a.i, c] * a.rl)

    oout_cols = M.make_cols(DV, VEC, oout_body)

    # ---- poison: scan the task's inputs (q rows, k/v rows, pse block), or fill its outputs with NaN
    scan = M.make_task_scan(spec, dt, VEC)
    fill_dv = M.make_fill_rows(DV, VEC)

    @T.macro
    def scan_inputs(gb, md, n, acc, sc):
        scan.start(acc)
        scan.q_rows(acc, gb, md, n)
        scan.kv_rows(acc, gb, md, n // G)
        scan.pse_block(acc, gb, md, n)
        scan.total(acc, sc)

    @T.macro
    def poison_outputs(gb, md, n):
        fill_dv(gb.o, md.o_off + n * md.o_sn, md.o_ss, md.sq, dt.st(nan32()))
        for r in range(md.sq * STATS_LANES):
            gb.smax[(md.row0 + n * md.sq) * STATS_LANES + r] = nan32()
            gb.ssum[(md.row0 + n * md.sq) * STATS_LANES + r] = nan32()

    @T.macro
    def task(gb, md, n):
        n2: T.let = n // G
        nqb: T.let = (md.sq + (BQ - 1)) // BQ
        nkb: T.let = (md.skv + (BKV - 1)) // BKV
        rowbase: T.let = md.row0 + n * md.sq
        slope: T.let = slope_of(spec, gb.pse, md.pse_off + n * md.p_sn)

        Qt = T.decl_buffer((BQ, D), "float32")
        KT = T.decl_buffer((D, BKV), "float32")
        Vt = T.decl_buffer((BKV, DVP), "float32")
        Oa = T.decl_buffer((BQ, DVP), "float32")
        St = T.decl_buffer((BQ, BKV), "float32")
        Dk = T.decl_buffer((BQ, BKV), "float32")
        mrow = T.decl_buffer((BQ,), "float32")
        lrow = T.decl_buffer((BQ,), "float32")
        red = T.decl_buffer((VEC,), "float32")
        sc = T.decl_buffer((2,), "float32")  # mutable scalars (global scope -> stack -> registers)

        scan_inputs(gb, md, n, red, sc)
        if sc[0] > T.float32(0):
            poison_outputs(gb, md, n)
        else:
            for ib in range(nqb):
                i0: T.let = ib * BQ
                ni: T.let = T.Cast("int32", T.min(md.sq - i0, T.int64(BQ)))
                pack_q(Qt, gb.q, md.q_off + n * md.q_sn + i0 * md.q_ss, md.q_ss, ni)
                for i in range(BQ):
                    mrow[i] = T.float32(-FLT_MAX)
                    lrow[i] = T.float32(0)
                    ozero_cols(ns(O=Oa, i=i))
                for jb in range(nkb):
                    j0: T.let = jb * BKV
                    nj: T.let = T.Cast("int32", T.min(md.skv - j0, T.int64(BKV)))
                    if tile_visible(md.tile_skip, i0, i0 + ni, j0, j0 + nj, md.pre, md.nxt, md.prefix):
                        pack_kt(KT, gb.k, md.k_off + n2 * md.k_sn + j0 * md.k_ss, md.k_ss, nj)
                        pack_v(Vt, gb.v, md.v_off + n2 * md.v_sn + j0 * md.v_ss, md.v_ss, nj)
                        gemm_s(St, Qt, KT)
                        tile_cells(head_context(spec, dt, gb, md, n, slope),
                                   ns(St=St, Dk=Dk, i0=i0, j0=j0, ni=ni, nj=nj))
                        # online softmax update, row by row
                        for i in range(BQ):
                            for v in T.vectorized(VEC):
                                red[v] = St[i, v]
                            for jc in range(1, NCH):
                                for v in T.vectorized(VEC):
                                    red[v] = T.max(red[v], St[i, jc * VEC + v])
                            sc[0] = mrow[i]
                            for v in range(VEC):
                                sc[0] = T.max(sc[0], red[v])
                            mx: T.let = sc[0]
                            alpha: T.let = csoft.fexp(mrow[i] - mx)
                            for v in T.vectorized(VEC):
                                red[v] = T.float32(0)
                            for jc in range(NCH):
                                for v in T.vectorized(VEC):
                                    St[i, jc * VEC + v] = csoft.fexp(St[i, jc * VEC + v] - mx)
                                    red[v] = red[v] + St[i, jc * VEC + v]
                                    if DROP:
                                        St[i, jc * VEC + v] = St[i, jc * VEC + v] * Dk[i, jc * VEC + v]
                                    if LOWP:
                                        St[i, jc * VEC + v] = dt.rnd(St[i, jc * VEC + v])
                            sc[1] = T.float32(0)
                            for v in range(VEC):
                                sc[1] = sc[1] + red[v]
                            lrow[i] = lrow[i] * alpha + sc[1]
                            mrow[i] = mx
                            oscale_cols(ns(O=Oa, i=i, alpha=alpha))
                        gemm_o(Oa, St, Vt)
                # finalize the rows of this q block
                for i in range(ni):
                    if T.And(md.invalid_rows != 0, mrow[i] == T.float32(-FLT_MAX)):
                        oout_cols(ns(o=gb.o, O=Oa, i=i, rl=T.float32(0), obase=md.o_off + n * md.o_sn + (i0 + i) * md.o_ss))
                        for lane in range(STATS_LANES):
                            gb.smax[(rowbase + i0 + i) * STATS_LANES + lane] = T.float32(-FLT_MAX)
                            gb.ssum[(rowbase + i0 + i) * STATS_LANES + lane] = T.float32(FLT_MAX)
                    else:
                        oout_cols(ns(o=gb.o, O=Oa, i=i,
                                     rl=T.Select(lrow[i] > T.float32(0), T.float32(1) / lrow[i], T.float32(0)),
                                     obase=md.o_off + n * md.o_sn + (i0 + i) * md.o_ss))
                        for lane in range(STATS_LANES):
                            gb.smax[(rowbase + i0 + i) * STATS_LANES + lane] = mrow[i]
                            gb.ssum[(rowbase + i0 + i) * STATS_LANES + lane] = lrow[i]

    @T.prim_func
    def fag_fwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, pse_h: T.handle, mask_h: T.handle,
                drop_h: T.handle, bmeta_h: T.handle, iparams: T.Buffer((IPARAMS_LEN,), "int64"),
                fparams: T.Buffer((FPARAMS_LEN,), "float32"), o_h: T.handle, smax_h: T.handle, ssum_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        q = T.match_buffer(q_h, (T.int64(),), SD)
        k = T.match_buffer(k_h, (T.int64(),), SD)
        v = T.match_buffer(v_h, (T.int64(),), SD)
        pse = T.match_buffer(pse_h, (T.int64(),), PD)
        atten_mask = T.match_buffer(mask_h, (T.int64(),), "uint8")
        drop_mask = T.match_buffer(drop_h, (T.int64(),), "uint8")
        bmeta = T.match_buffer(bmeta_h, (T.int64(),), "int64")
        o = T.match_buffer(o_h, (T.int64(),), SD)
        smax = T.match_buffer(smax_h, (T.int64(),), "float32")
        ssum = T.match_buffer(ssum_h, (T.int64(),), "float32")
        for tk in T.parallel(iparams[I_B] * iparams[I_N2] * G):
            batch_prologue(ns(q=q, k=k, v=v, pse=pse, mask=atten_mask, drop=drop_mask, bm=bmeta, ip=iparams,
                              fp=fparams, o=o, smax=smax, ssum=ssum),
                           tk // (iparams[I_N2] * G), task, tk % (iparams[I_N2] * G))

    return M.drop_params(fag_fwd, param_names(spec)).with_attr("global_symbol", name)
