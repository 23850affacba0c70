"""Backward kernel (FA2-like on CPU) as hand-written TIR generated from Python closures (ABI.md).

One task = (b, n2): all G query heads of KV head n2 in batch b (or n2 with b serial inside when
spec.dpse_sum_b, so dpse accumulation over b is deterministic). Per task:

  preprocess  for each row of the G heads: Di = rowsum(dy * o) -> ws[DI + row]; dq_acc row := 0
  main        for each KV block: pack K^T, V^T, K (fp32), zero dK/dV accumulators;
                for g, for each q block intersecting the band (TILE_SKIP=1; analytic range):
                  pack Q, dY; S = Q K^T; dP = dY V^T (micro-kernels)
                  cells: score (scale, pse, band only in partial tiles, atten_mask), P (INVALID rows ->
                         P = 0 exactly), dropout, dS = P (dP' - Di), dpse +=, rounding to dtype
                  dV += P'^T dY; dK += dS^T Q; dQ_tile = dS K; dq_acc rows += dQ_tile
              write dK (x scale) / dV rows of the block (cast)
  postprocess dq = cast(scale * dq_acc)

Before all that the task scans its inputs (q/dy/o rows of its heads, their stats, k/v rows, their pse
block): if one is NaN or ±Inf, the task writes NaN to every output it owns instead (poison, SPEC
decision). With finite inputs, scores saturate to the fp32 range, 1/ssum is bounded so P stays finite,
and every output saturates to its dtype's range (an overflow inside a product cannot reach an output
as Inf or NaN; kernels/common/finite).

Scratch is O(tile) per thread; ws holds Di and the fp32 dq accumulator (O(rows * D)).
"""
from __future__ import annotations

from ...core.abi import FPARAMS_LEN, I_B, I_N2, IPARAMS_LEN, STATS_LANES, pad16, param_names
from ...core.spec import KernelSpec
from ...kernels.common import dropout as cdrop
from ...kernels.common import mask as cmask
from ...kernels.common import softmax as csoft
from ...kernels.common.context import batch_prologue, head_context
from ...kernels.common.dtype import DType
from ...kernels.common.finite import nan32, sat, sat_keep_nan
from ...kernels.common.pse import pse_region, slope_of
from ...kernels.common.score import score_expr
from ...kernels.common.tir import FLT_MAX, T, ns
from . import microkernels as M
from .workspace import dq_acc_offset


def make_bwd(spec: KernelSpec, knobs, name: str = "fag_bwd"):
    """The backward PrimFunc of `spec` with the LLVM schedule `knobs` (schedules/llvm.py)."""
    from ...schedules.llvm import gemm_shape

    assert spec.direction == "bwd"
    BQ, BKV, VEC = knobs.block_q, knobs.block_kv, knobs.vec
    D, DV, G = spec.d, spec.dv, spec.group
    DP, DVP = pad16(D), pad16(DV)
    dt = DType(spec.dtype)
    SD = dt.storage
    PD = spec.pse_storage_dtype
    LOWP = dt.lowp
    DROP = spec.dropout
    DPSE = spec.dpse
    DPSE_MUL_SCALE = spec.pse_add_first

    gemm_s = M.make_gemm(BQ, BKV, D, *gemm_shape(knobs, BQ, BKV), VEC, False, False)
    gemm_dp = M.make_gemm(BQ, BKV, DV, *gemm_shape(knobs, BQ, BKV), VEC, False, False)
    gemm_dv = M.make_gemm(BKV, DVP, BQ, *gemm_shape(knobs, BKV, DVP), VEC, True, True)
    gemm_dk = M.make_gemm(BKV, DP, BQ, *gemm_shape(knobs, BKV, DP), VEC, True, True)
    gemm_dq = M.make_gemm(BQ, DP, BKV, *gemm_shape(knobs, BQ, DP), VEC, False, False)
    pack_q = M.make_pack_rows(BQ, D, DP, VEC, dt)
    pack_dy = M.make_pack_rows(BQ, DV, DVP, VEC, dt)
    pack_k = M.make_pack_rows(BKV, D, DP, VEC, dt)
    pack_kt = M.make_pack_rows_t(BKV, D, VEC, dt)
    pack_vt = M.make_pack_rows_t(BKV, DV, VEC, dt)

    # ---- element-wise tile pass ------------------------------------------------------------------
    def make_cell(check_band: bool):
        @T.macro
        def cell(c, t, i, j):
            t.St[i, j] = score_expr(c, t.St[i, j], t.i0 + i, t.j0 + j, check_band)
            t.Pt[i, j] = csoft.fexp(t.St[i, j] - t.rm[i]) * t.rr[i]  # <= FLT_MAX: rr <= RR_MAX
            if DROP:
                t.Mk[j] = cdrop.drop_keep_factor(c, t.i0 + i, t.j0 + j)
                t.dPt[i, j] = t.Pt[i, j] * (t.dPt[i, j] * t.Mk[j] - t.rd[i])
            else:
                t.dPt[i, j] = t.Pt[i, j] * (t.dPt[i, j] - t.rd[i])
            if DPSE:
                t.dPt[i, j] = sat(t.dPt[i, j])  # an overflowed dS must not turn the dpse accumulator into NaN
                if DPSE_MUL_SCALE:
                    c.dpse[c.pse_head + (t.i0 + i) * c.p_si + t.j0 + j] = sat_keep_nan(
                        c.dpse[c.pse_head + (t.i0 + i) * c.p_si + t.j0 + j] + t.dPt[i, j] * c.scale)
                else:
                    c.dpse[c.pse_head + (t.i0 + i) * c.p_si + t.j0 + j] = sat_keep_nan(
                        c.dpse[c.pse_head + (t.i0 + i) * c.p_si + t.j0 + j] + t.dPt[i, j])
            if LOWP:
                t.dPt[i, j] = dt.rnd(t.dPt[i, j])
            if DROP:
                t.Pt[i, j] = t.Pt[i, j] * t.Mk[j]
            if LOWP:
                t.Pt[i, j] = dt.rnd(t.Pt[i, j])

        return cell

    @T.macro
    def pad(c, t, i, j):
        t.Pt[i, j] = T.float32(0)
        t.dPt[i, j] = T.float32(0)

    tile_cells = M.make_masked_tile(M.make_tile_cells(BQ, BKV, VEC, make_cell(False), pad),
                                    M.make_tile_cells(BQ, BKV, VEC, make_cell(True), pad), spec.band)

    # ---- row helpers -----------------------------------------------------------------------------
    @T.macro
    def zero_body(a, c):
        a.ws[a.base + c] = T.float32(0)

    zero_dq_cols = M.make_cols(DP, VEC, zero_body)

    @T.macro
    def dqadd_body(a, c):
        a.ws[a.base + c] = a.ws[a.base + c] + a.dQt[a.i, c]

    dqadd_cols = M.make_cols(DP, VEC, dqadd_body)

    @T.macro
    def dqout_body(a, c):
        a.dq[a.obase + c] = dt.st_sat(a.ws[a.base + c] * a.scale)

    dqout_cols = M.make_cols(D, VEC, dqout_body)

    @T.macro
    def dkout_body(a, c):
        a.dk[a.obase + c] = dt.st_sat(a.acc[a.j, c] * a.scale)

    dkout_cols = M.make_cols(D, VEC, dkout_body)

    @T.macro
    def dvout_body(a, c):
        a.dv[a.obase + c] = dt.st_sat(a.acc[a.j, c])

    dvout_cols = M.make_cols(DV, VEC, dvout_body)

    @T.macro
    def zero_tile_body(a, c):
        a.t[a.r, c] = T.float32(0)

    zero_dk_cols = M.make_cols(DP, VEC, zero_tile_body)
    zero_dv_cols = M.make_cols(DVP, VEC, zero_tile_body)

    # ---- poison: scan the task's inputs, or fill its outputs with NaN ------------------------------
    scan = M.make_task_scan(spec, dt, VEC)
    fill_d = M.make_fill_rows(D, VEC)
    fill_dv = M.make_fill_rows(DV, VEC)

    @T.macro
    def scan_inputs(gb, md, n2, acc, sc):
        scan.start(acc)
        for g in range(G):
            scan.q_rows(acc, gb, md, n2 * G + g)
            scan.grad_rows(acc, gb, md, n2 * G + g)
            scan.pse_block(acc, gb, md, n2 * G + g)
        scan.kv_rows(acc, gb, md, n2)
        scan.total(acc, sc)

    @T.macro
    def poison_outputs(gb, md, n2):
        for g in range(G):
            fill_d(gb.dq, md.q_off + (n2 * G + g) * md.q_sn, md.q_ss, md.sq, dt.st(nan32()))
            if DPSE:
                M.fill_rows_dyn(gb.dpse, pse_region(spec, md, n2 * G + g).base, pse_region(spec, md, n2 * G + g).stride,
                                pse_region(spec, md, n2 * G + g).rows, pse_region(spec, md, n2 * G + g).width, nan32())
        fill_d(gb.dk, md.k_off + n2 * md.k_sn, md.k_ss, md.skv, dt.st(nan32()))
        fill_dv(gb.dv, md.v_off + n2 * md.v_sn, md.v_ss, md.skv, dt.st(nan32()))

    # ---- one task --------------------------------------------------------------------------------
    @T.macro
    def task(gb, md, n2):
        sq: T.let = md.sq
        dq0: T.let = dq_acc_offset(md.total_rows)
        nqb: T.let = (sq + (BQ - 1)) // BQ
        nkb: T.let = (md.skv + (BKV - 1)) // BKV

        # scratch (per task)
        KT = T.decl_buffer((D, BKV), "float32")
        VT = T.decl_buffer((DV, BKV), "float32")
        Kp = T.decl_buffer((BKV, DP), "float32")
        dKa = T.decl_buffer((BKV, DP), "float32")
        dVa = T.decl_buffer((BKV, DVP), "float32")
        Qt = T.decl_buffer((BQ, DP), "float32")
        dYt = T.decl_buffer((BQ, DVP), "float32")
        dQt = T.decl_buffer((BQ, DP), "float32")
        St = T.decl_buffer((BQ, BKV), "float32")
        Pt = T.decl_buffer((BQ, BKV), "float32")
        dPt = T.decl_buffer((BQ, BKV), "float32")
        rm = T.decl_buffer((BQ,), "float32")
        rr = T.decl_buffer((BQ,), "float32")
        rd = T.decl_buffer((BQ,), "float32")
        Mk = T.decl_buffer((BKV,), "float32")
        red = T.decl_buffer((VEC,), "float32")
        sc = T.decl_buffer((1,), "float32")  # a mutable scalar (global scope -> stack -> register)

        # ---- poison: a non-finite input anywhere in the task -> NaN in every output it owns
        scan_inputs(gb, md, n2, red, sc)
        if sc[0] > T.float32(0):
            poison_outputs(gb, md, n2)
        else:
            # ---- preprocess: Di and dq_acc := 0 for the rows of this task
            for g in range(G):
                for i in range(sq):
                    for v in T.vectorized(VEC):
                        red[v] = T.float32(0)
                    for cc in range(DV // VEC):
                        for v in T.vectorized(VEC):
                            red[v] = red[v] + dt.ld(gb.dy, md.o_off + (n2 * G + g) * md.o_sn + i * md.o_ss + cc * VEC + v) \
                                * dt.ld(gb.o, md.o_off + (n2 * G + g) * md.o_sn + i * md.o_ss + cc * VEC + v)
                    sc[0] = T.float32(0)
                    for v in range(VEC):
                        sc[0] = sc[0] + red[v]
                    for c in range(DV % VEC):
                        sc[0] = sc[0] + dt.ld(gb.dy, md.o_off + (n2 * G + g) * md.o_sn + i * md.o_ss + (DV - DV % VEC) + c) \
                            * dt.ld(gb.o, md.o_off + (n2 * G + g) * md.o_sn + i * md.o_ss + (DV - DV % VEC) + c)
                    gb.ws[md.row0 + (n2 * G + g) * sq + i] = sat(sc[0])
                    zero_dq_cols(ns(ws=gb.ws, base=dq0 + (md.row0 + (n2 * G + g) * sq + i) * DP))

            # ---- main loop over KV blocks
            for jb in range(nkb):
                j0: T.let = jb * BKV
                nj: T.let = T.Cast("int32", T.min(md.skv - j0, T.int64(BKV)))
                pack_kt(KT, gb.k, md.k_off + n2 * md.k_sn + j0 * md.k_ss, md.k_ss, nj)
                pack_vt(VT, gb.v, md.v_off + n2 * md.v_sn + j0 * md.v_ss, md.v_ss, nj)
                pack_k(Kp, gb.k, md.k_off + n2 * md.k_sn + j0 * md.k_ss, md.k_ss, nj)
                for r in range(BKV):
                    zero_dk_cols(ns(t=dKa, r=r))
                    zero_dv_cols(ns(t=dVa, r=r))
                # q blocks that can see this KV block (band rule, analytic)
                skip_q: T.let = cmask.skip_tiles(spec.band, md.tile_skip, j0, md.prefix)
                ib_lo: T.let = cmask.q_block_lo(j0, md.nxt, BQ, skip_q)
                ib_hi: T.let = cmask.q_block_hi(j0, nj, sq, nqb, BQ, md.pre, md.nxt, skip_q)
                for g in range(G):
                    n: T.let = n2 * G + g
                    rowbase: T.let = md.row0 + n * sq
                    slope: T.let = slope_of(spec, gb.pse, md.pse_off + n * md.p_sn)
                    for ib in range(ib_lo, ib_hi):
                        i0: T.let = ib * BQ
                        ni: T.let = T.Cast("int32", T.min(sq - i0, T.int64(BQ)))
                        pack_q(Qt, gb.q, md.q_off + n * md.q_sn + i0 * md.q_ss, md.q_ss, ni)
                        pack_dy(dYt, gb.dy, md.o_off + n * md.o_sn + i0 * md.o_ss, md.o_ss, ni)
                        for i in range(BQ):
                            if i < ni:
                                rm[i] = csoft.row_max_for_p(gb.smax[(rowbase + i0 + i) * STATS_LANES],
                                                            gb.ssum[(rowbase + i0 + i) * STATS_LANES])
                                rr[i] = T.min(csoft.row_rsum_for_p(gb.smax[(rowbase + i0 + i) * STATS_LANES],
                                                                   gb.ssum[(rowbase + i0 + i) * STATS_LANES]), T.float32(csoft.RR_MAX))
                                rd[i] = gb.ws[rowbase + i0 + i]
                            else:
                                rm[i] = T.float32(FLT_MAX)
                                rr[i] = T.float32(0)
                                rd[i] = T.float32(0)
                        gemm_s(St, Qt, KT)
                        gemm_dp(dPt, dYt, VT)
                        tile_cells(head_context(spec, dt, gb, md, n, slope),
                                   ns(St=St, Pt=Pt, dPt=dPt, Mk=Mk, rm=rm, rr=rr, rd=rd, i0=i0, j0=j0, ni=ni, nj=nj))
                        gemm_dv(dVa, Pt, dYt)
                        gemm_dk(dKa, dPt, Qt)
                        gemm_dq(dQt, dPt, Kp)
                        for i in range(ni):
                            dqadd_cols(ns(ws=gb.ws, dQt=dQt, i=i, base=dq0 + (rowbase + i0 + i) * DP))
                for j in range(nj):
                    dkout_cols(ns(dk=gb.dk, acc=dKa, j=j, scale=md.scale,
                                  obase=md.k_off + n2 * md.k_sn + (j0 + j) * md.k_ss))
                    dvout_cols(ns(dv=gb.dv, acc=dVa, j=j, obase=md.v_off + n2 * md.v_sn + (j0 + j) * md.v_ss))

            # ---- postprocess: dq = cast(scale * dq_acc)
            for g in range(G):
                for i in range(sq):
                    dqout_cols(ns(dq=gb.dq, ws=gb.ws, scale=md.scale,
                                  base=dq0 + (md.row0 + (n2 * G + g) * sq + i) * DP,
                                  obase=md.q_off + (n2 * G + g) * md.q_sn + i * md.q_ss))

    @T.prim_func
    def fag_bwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, dy_h: T.handle, o_h: T.handle,
                smax_h: T.handle, ssum_h: T.handle, pse_h: T.handle, mask_h: T.handle, drop_h: T.handle,
                bmeta_h: T.handle, iparams: T.Buffer((IPARAMS_LEN,), "int64"), fparams: T.Buffer((FPARAMS_LEN,), "float32"),
                dq_h: T.handle, dk_h: T.handle, dv_h: T.handle, dpse_h: T.handle, ws_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        q = T.match_buffer(q_h, (T.int64(),), SD)
        k = T.match_buffer(k_h, (T.int64(),), SD)
        v = T.match_buffer(v_h, (T.int64(),), SD)
        dy = T.match_buffer(dy_h, (T.int64(),), SD)
        o = T.match_buffer(o_h, (T.int64(),), SD)
        smax = T.match_buffer(smax_h, (T.int64(),), "float32")
        ssum = T.match_buffer(ssum_h, (T.int64(),), "float32")
        pse = T.match_buffer(pse_h, (T.int64(),), PD)
        atten_mask = T.match_buffer(mask_h, (T.int64(),), "uint8")
        drop_mask = T.match_buffer(drop_h, (T.int64(),), "uint8")
        bmeta = T.match_buffer(bmeta_h, (T.int64(),), "int64")
        dq = T.match_buffer(dq_h, (T.int64(),), SD)
        dk = T.match_buffer(dk_h, (T.int64(),), SD)
        dv = T.match_buffer(dv_h, (T.int64(),), SD)
        dpse_acc = T.match_buffer(dpse_h, (T.int64(),), "float32")
        ws = T.match_buffer(ws_h, (T.int64(),), "float32")
        if spec.dpse_sum_b:
            for n2 in T.parallel(iparams[I_N2]):
                for b in range(iparams[I_B]):
                    batch_prologue(ns(q=q, k=k, v=v, dy=dy, o=o, smax=smax, ssum=ssum, pse=pse, mask=atten_mask,
                                      drop=drop_mask, bm=bmeta, ip=iparams, fp=fparams, dq=dq, dk=dk, dv=dv,
                                      dpse=dpse_acc, ws=ws), b, task, n2)
        else:
            for tk in T.parallel(iparams[I_B] * iparams[I_N2]):
                batch_prologue(ns(q=q, k=k, v=v, dy=dy, o=o, smax=smax, ssum=ssum, pse=pse, mask=atten_mask,
                                  drop=drop_mask, bm=bmeta, ip=iparams, fp=fparams, dq=dq, dk=dk, dv=dv,
                                  dpse=dpse_acc, ws=ws), tk // iparams[I_N2], task, tk % iparams[I_N2])

    return M.drop_params(fag_bwd, param_names(spec)).with_attr("global_symbol", name)
