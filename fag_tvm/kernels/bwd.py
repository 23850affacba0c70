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

Scratch is O(tile) per thread; ws holds Di and the fp32 dq accumulator (O(rows * D)).
"""
from __future__ import annotations

from .._tvm import tirx_script
from .spec import KernelSpec, bwd_workspace_floats, param_names  # noqa: F401 (re-export)


def bwd_param_names(spec: KernelSpec) -> list[str]:
    """The ABI argument list of this specialisation."""
    return param_names(spec)


def make_bwd(spec: KernelSpec, knobs=None, name: str = "fag_bwd"):
    # TVM is imported here, not at module level: hosts import this module for the workspace size /
    # parameter names without loading the compiler.
    _, T = tirx_script()

    from schedules.llvm import default_knobs, gemm_shape, prune

    from . import tir_common as C
    from .tir_common import FLT_MAX, DType, ns, pad16

    assert spec.direction == "bwd"
    knobs = knobs or default_knobs(spec)
    ok, why = prune(spec, knobs, l2=1 << 40)  # hard rules only (cache size is a heuristic)
    if not ok:
        raise ValueError(f"infeasible knobs {knobs}: {why}")
    BQ, BKV, VEC = knobs.block_q, knobs.block_kv, knobs.vec
    D, DV, G = spec.d, spec.dv, spec.group
    DP, DVP = pad16(D), pad16(DV)
    dt = DType(spec.dtype)
    SD = dt.storage
    PD = spec.pse_storage_dtype
    LOWP = dt.lowp
    BAND = spec.band
    DROP = spec.dropout
    DPSE = spec.dpse
    SUMB = spec.dpse_sum_b
    PSE_SLOPES = spec.pse in ("slopes", "slopes_sqrt")
    DPSE_MUL_SCALE = spec.pse_add_first

    gemm_s = C.make_gemm(BQ, BKV, D, *gemm_shape(knobs, BQ, BKV), VEC, False, False)
    gemm_dp = C.make_gemm(BQ, BKV, DV, *gemm_shape(knobs, BQ, BKV), VEC, False, False)
    gemm_dv = C.make_gemm(BKV, DVP, BQ, *gemm_shape(knobs, BKV, DVP), VEC, True, True)
    gemm_dk = C.make_gemm(BKV, DP, BQ, *gemm_shape(knobs, BKV, DP), VEC, True, True)
    gemm_dq = C.make_gemm(BQ, DP, BKV, *gemm_shape(knobs, BQ, DP), VEC, False, False)
    pack_q = C.make_pack_rows(BQ, D, DP, VEC, dt)
    pack_dy = C.make_pack_rows(BQ, DV, DVP, VEC, dt)
    pack_k = C.make_pack_rows(BKV, D, DP, VEC, dt)
    pack_kt = C.make_pack_rows_t(BKV, D, VEC, dt)
    pack_vt = C.make_pack_rows_t(BKV, DV, VEC, dt)

    def skip_rule(tile_skip, j0, prefix):
        if not BAND:
            return T.bool(False)
        return T.And(tile_skip != 0, j0 >= prefix)

    def slope_of(pse, idx):
        return pse[idx] if PSE_SLOPES else T.float32(0)

    # ---- element-wise tile pass ------------------------------------------------------------------
    def make_cell(check_band: bool):
        @T.macro
        def cell(c, t, i, j):
            t.St[i, j] = C.score_expr(c, t.St[i, j], t.i0 + i, t.j0 + j, check_band)
            t.Pt[i, j] = C.fexp(t.St[i, j] - t.rm[i]) * t.rr[i]
            if DROP:
                t.Mk[j] = C.drop_keep_factor(c, t.i0 + i, t.j0 + j)
                t.dPt[i, j] = t.Pt[i, j] * (t.dPt[i, j] * t.Mk[j] - t.rd[i])
            else:
                t.dPt[i, j] = t.Pt[i, j] * (t.dPt[i, j] - t.rd[i])
            if DPSE:
                if DPSE_MUL_SCALE:
                    c.dpse[c.pse_head + (t.i0 + i) * c.p_si + t.j0 + j] = \
                        c.dpse[c.pse_head + (t.i0 + i) * c.p_si + t.j0 + j] + t.dPt[i, j] * c.scale
                else:
                    c.dpse[c.pse_head + (t.i0 + i) * c.p_si + t.j0 + j] = \
                        c.dpse[c.pse_head + (t.i0 + i) * c.p_si + t.j0 + j] + t.dPt[i, j]
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

    cells_full = C.make_tile_cells(BQ, BKV, VEC, make_cell(False), pad)
    cells_part = C.make_tile_cells(BQ, BKV, VEC, make_cell(True), pad)

    # ---- row helpers -----------------------------------------------------------------------------
    @T.macro
    def zero_body(a, c):
        a.ws[a.base + c] = T.float32(0)

    zero_dq_cols = C.make_cols(DP, VEC, zero_body)

    @T.macro
    def dqadd_body(a, c):
        a.ws[a.base + c] = a.ws[a.base + c] + a.dQt[a.i, c]

    dqadd_cols = C.make_cols(DP, VEC, dqadd_body)

    @T.macro
    def dqout_body(a, c):
        a.dq[a.obase + c] = dt.st(a.ws[a.base + c] * a.scale)

    dqout_cols = C.make_cols(D, VEC, dqout_body)

    @T.macro
    def dkout_body(a, c):
        a.dk[a.obase + c] = dt.st(a.acc[a.j, c] * a.scale)

    dkout_cols = C.make_cols(D, VEC, dkout_body)

    @T.macro
    def dvout_body(a, c):
        a.dv[a.obase + c] = dt.st(a.acc[a.j, c])

    dvout_cols = C.make_cols(DV, VEC, dvout_body)

    @T.macro
    def zero_tile_body(a, c):
        a.t[a.r, c] = T.float32(0)

    zero_dk_cols = C.make_cols(DP, VEC, zero_tile_body)
    zero_dv_cols = C.make_cols(DVP, VEC, zero_tile_body)

    # ---- one task --------------------------------------------------------------------------------
    @T.macro
    def task(gb, b, n2):
        sq: T.let = gb.bm[b * 16 + C.SQ]
        skv: T.let = gb.bm[b * 16 + C.SKV]
        q_off: T.let = gb.bm[b * 16 + C.Q_OFF]
        k_off: T.let = gb.bm[b * 16 + C.K_OFF]
        v_off: T.let = gb.bm[b * 16 + C.V_OFF]
        o_off: T.let = gb.bm[b * 16 + C.O_OFF]
        row0: T.let = gb.bm[b * 16 + C.ROW0]
        drop0: T.let = gb.bm[b * 16 + C.DROP0]
        pre: T.let = gb.bm[b * 16 + C.PRE]
        nxt: T.let = gb.bm[b * 16 + C.NEXT]
        prefix: T.let = gb.bm[b * 16 + C.PREFIX]
        mask_off: T.let = gb.bm[b * 16 + C.MASK_OFF]
        pse_off: T.let = gb.bm[b * 16 + C.PSE_OFF]
        p_sn: T.let = gb.bm[b * 16 + C.P_SN]
        p_si: T.let = gb.bm[b * 16 + C.P_SI]
        q_sn: T.let = gb.ip[C.I_Q_SN]
        q_ss: T.let = gb.ip[C.I_Q_SS]
        k_sn: T.let = gb.ip[C.I_K_SN]
        k_ss: T.let = gb.ip[C.I_K_SS]
        v_sn: T.let = gb.ip[C.I_V_SN]
        v_ss: T.let = gb.ip[C.I_V_SS]
        o_sn: T.let = gb.ip[C.I_O_SN]
        o_ss: T.let = gb.ip[C.I_O_SS]
        m_sn: T.let = gb.ip[C.I_M_SN]
        m_si: T.let = gb.ip[C.I_M_SI]
        tile_skip: T.let = gb.ip[C.I_TILE_SKIP]
        q_start: T.let = gb.ip[C.I_Q_START]
        kv_start: T.let = gb.ip[C.I_KV_START]
        alibi_mode: T.let = gb.ip[C.I_ALIBI_MODE]
        alibi_sq: T.let = gb.ip[C.I_ALIBI_SQ]
        alibi_skv: T.let = gb.ip[C.I_ALIBI_SKV]
        dq0: T.let = (gb.ip[C.I_TOTAL_ROWS] + 15) // 16 * 16
        scale: T.let = gb.fp[C.F_SCALE]
        rkeep: T.let = gb.fp[C.F_RKEEP]
        nqb: T.let = (sq + (BQ - 1)) // BQ
        nkb: T.let = (skv + (BKV - 1)) // BKV

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

        # ---- preprocess: Di and dq_acc := 0 for the rows of this task
        for g in range(G):
            for i in range(sq):
                for v in T.vectorized(VEC):
                    red[v] = T.float32(0)
                for cc in range(DV // VEC):
                    for v in T.vectorized(VEC):
                        red[v] = red[v] + dt.ld(gb.dy, o_off + (n2 * G + g) * o_sn + i * o_ss + cc * VEC + v) \
                            * dt.ld(gb.o, o_off + (n2 * G + g) * o_sn + i * o_ss + cc * VEC + v)
                sc[0] = T.float32(0)
                for v in range(VEC):
                    sc[0] = sc[0] + red[v]
                for c in range(DV % VEC):
                    sc[0] = sc[0] + dt.ld(gb.dy, o_off + (n2 * G + g) * o_sn + i * o_ss + (DV - DV % VEC) + c) \
                        * dt.ld(gb.o, o_off + (n2 * G + g) * o_sn + i * o_ss + (DV - DV % VEC) + c)
                gb.ws[row0 + (n2 * G + g) * sq + i] = sc[0]
                zero_dq_cols(ns(ws=gb.ws, base=dq0 + (row0 + (n2 * G + g) * sq + i) * DP))

        # ---- main loop over KV blocks
        for jb in range(nkb):
            j0: T.let = jb * BKV
            nj: T.let = T.Cast("int32", T.min(skv - j0, T.int64(BKV)))
            pack_kt(KT, gb.k, k_off + n2 * k_sn + j0 * k_ss, k_ss, nj)
            pack_vt(VT, gb.v, v_off + n2 * v_sn + j0 * v_ss, v_ss, nj)
            pack_k(Kp, gb.k, k_off + n2 * k_sn + j0 * k_ss, k_ss, nj)
            for r in range(BKV):
                zero_dk_cols(ns(t=dKa, r=r))
                zero_dv_cols(ns(t=dVa, r=r))
            # q blocks that can see this KV block (band rule, analytic)
            # q blocks that can see this KV block (band rule, analytic): rows [j0 - NEXT, j1 - 1 + PRE]
            skip_q: T.let = skip_rule(tile_skip, j0, prefix)
            ib_lo: T.let = T.Select(skip_q, T.max(j0 - nxt, T.int64(0)) // BQ, T.int64(0))
            ib_hi: T.let = T.Select(skip_q, T.Select(-pre > nxt, T.int64(0),
                                                     T.min((T.min(j0 + nj + pre, sq) + (BQ - 1)) // BQ, nqb)), nqb)
            for g in range(G):
                n: T.let = n2 * G + g
                rowbase: T.let = row0 + n * sq
                slope: T.let = slope_of(gb.pse, pse_off + n * p_sn)
                for ib in range(ib_lo, ib_hi):
                    i0: T.let = ib * BQ
                    ni: T.let = T.Cast("int32", T.min(sq - i0, T.int64(BQ)))
                    pack_q(Qt, gb.q, q_off + n * q_sn + i0 * q_ss, q_ss, ni)
                    pack_dy(dYt, gb.dy, o_off + n * o_sn + i0 * o_ss, o_ss, ni)
                    for i in range(BQ):
                        if i < ni:
                            rm[i] = T.Select(
                                T.And(gb.smax[(rowbase + i0 + i) * 8] == T.float32(-FLT_MAX),
                                      gb.ssum[(rowbase + i0 + i) * 8] == T.float32(FLT_MAX)),
                                T.float32(FLT_MAX), gb.smax[(rowbase + i0 + i) * 8])
                            rr[i] = T.Select(
                                T.And(gb.smax[(rowbase + i0 + i) * 8] == T.float32(-FLT_MAX),
                                      gb.ssum[(rowbase + i0 + i) * 8] == T.float32(FLT_MAX)),
                                T.float32(0), T.float32(1) / gb.ssum[(rowbase + i0 + i) * 8])
                            rd[i] = gb.ws[rowbase + i0 + i]
                        else:
                            rm[i] = T.float32(FLT_MAX)
                            rr[i] = T.float32(0)
                            rd[i] = T.float32(0)
                    gemm_s(St, Qt, KT)
                    gemm_dp(dPt, dYt, VT)
                    if BAND:
                        if C.band_all_visible(i0, i0 + ni, j0, j0 + nj, pre, nxt, prefix):
                            cells_full(
                                ns(spec=spec, dt=dt, scale=scale, rkeep=rkeep, pse=gb.pse, mask=gb.mask,
                                   drop=gb.drop, dpse=gb.dpse, pse_head=pse_off + n * p_sn, p_si=p_si,
                                   mask_head=mask_off + n * m_sn, m_si=m_si, drop_head=drop0 + n * sq * skv,
                                   skv=skv, pre=pre, nxt=nxt, prefix=prefix, q_start=q_start,
                                   kv_start=kv_start, alibi_mode=alibi_mode, alibi_sq=alibi_sq,
                                   alibi_skv=alibi_skv, slope=slope),
                                ns(St=St, Pt=Pt, dPt=dPt, Mk=Mk, rm=rm, rr=rr, rd=rd, i0=i0, j0=j0, ni=ni, nj=nj))
                        else:
                            cells_part(
                                ns(spec=spec, dt=dt, scale=scale, rkeep=rkeep, pse=gb.pse, mask=gb.mask,
                                   drop=gb.drop, dpse=gb.dpse, pse_head=pse_off + n * p_sn, p_si=p_si,
                                   mask_head=mask_off + n * m_sn, m_si=m_si, drop_head=drop0 + n * sq * skv,
                                   skv=skv, pre=pre, nxt=nxt, prefix=prefix, q_start=q_start,
                                   kv_start=kv_start, alibi_mode=alibi_mode, alibi_sq=alibi_sq,
                                   alibi_skv=alibi_skv, slope=slope),
                                ns(St=St, Pt=Pt, dPt=dPt, Mk=Mk, rm=rm, rr=rr, rd=rd, i0=i0, j0=j0, ni=ni, nj=nj))
                    else:
                        cells_full(
                            ns(spec=spec, dt=dt, scale=scale, rkeep=rkeep, pse=gb.pse, mask=gb.mask,
                               drop=gb.drop, dpse=gb.dpse, pse_head=pse_off + n * p_sn, p_si=p_si,
                               mask_head=mask_off + n * m_sn, m_si=m_si, drop_head=drop0 + n * sq * skv,
                               skv=skv, pre=pre, nxt=nxt, prefix=prefix, q_start=q_start,
                               kv_start=kv_start, alibi_mode=alibi_mode, alibi_sq=alibi_sq,
                               alibi_skv=alibi_skv, slope=slope),
                            ns(St=St, Pt=Pt, dPt=dPt, Mk=Mk, rm=rm, rr=rr, rd=rd, i0=i0, j0=j0, ni=ni, nj=nj))
                    gemm_dv(dVa, Pt, dYt)
                    gemm_dk(dKa, dPt, Qt)
                    gemm_dq(dQt, dPt, Kp)
                    for i in range(ni):
                        dqadd_cols(ns(ws=gb.ws, dQt=dQt, i=i, base=dq0 + (rowbase + i0 + i) * DP))
            for j in range(nj):
                dkout_cols(ns(dk=gb.dk, acc=dKa, j=j, scale=scale, obase=k_off + n2 * k_sn + (j0 + j) * k_ss))
                dvout_cols(ns(dv=gb.dv, acc=dVa, j=j, obase=v_off + n2 * v_sn + (j0 + j) * v_ss))

        # ---- postprocess: dq = cast(scale * dq_acc)
        for g in range(G):
            for i in range(sq):
                dqout_cols(ns(dq=gb.dq, ws=gb.ws, scale=scale,
                              base=dq0 + (row0 + (n2 * G + g) * sq + i) * DP,
                              obase=q_off + (n2 * G + g) * q_sn + i * q_ss))

    @T.prim_func
    def fag_bwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, dy_h: T.handle, o_h: T.handle,
                smax_h: T.handle, ssum_h: T.handle, pse_h: T.handle, mask_h: T.handle, drop_h: T.handle,
                bmeta_h: T.handle, iparams: T.Buffer((32,), "int64"), fparams: T.Buffer((4,), "float32"),
                dq_h: T.handle, dk_h: T.handle, dv_h: T.handle, dpse_h: T.handle, ws_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_q = T.int64()
        n_k = T.int64()
        n_v = T.int64()
        n_dy = T.int64()
        n_o = T.int64()
        n_sm = T.int64()
        n_ss = T.int64()
        n_pse = T.int64()
        n_mask = T.int64()
        n_drop = T.int64()
        n_bm = T.int64()
        n_dq = T.int64()
        n_dk = T.int64()
        n_dv = T.int64()
        n_dpse = T.int64()
        n_ws = T.int64()
        q = T.match_buffer(q_h, (n_q,), SD)
        k = T.match_buffer(k_h, (n_k,), SD)
        v = T.match_buffer(v_h, (n_v,), SD)
        dy = T.match_buffer(dy_h, (n_dy,), SD)
        o = T.match_buffer(o_h, (n_o,), SD)
        smax = T.match_buffer(smax_h, (n_sm,), "float32")
        ssum = T.match_buffer(ssum_h, (n_ss,), "float32")
        pse = T.match_buffer(pse_h, (n_pse,), PD)
        atten_mask = T.match_buffer(mask_h, (n_mask,), "uint8")
        drop_mask = T.match_buffer(drop_h, (n_drop,), "uint8")
        bmeta = T.match_buffer(bmeta_h, (n_bm,), "int64")
        dq = T.match_buffer(dq_h, (n_dq,), SD)
        dk = T.match_buffer(dk_h, (n_dk,), SD)
        dv = T.match_buffer(dv_h, (n_dv,), SD)
        dpse_acc = T.match_buffer(dpse_h, (n_dpse,), "float32")
        ws = T.match_buffer(ws_h, (n_ws,), "float32")
        if SUMB:
            for n2 in T.parallel(iparams[C.I_N2]):
                for b in range(iparams[C.I_B]):
                    task(ns(q=q, k=k, v=v, dy=dy, o=o, smax=smax, ssum=ssum, pse=pse, mask=atten_mask,
                            drop=drop_mask, bm=bmeta, ip=iparams, fp=fparams, dq=dq, dk=dk, dv=dv,
                            dpse=dpse_acc, ws=ws), b, n2)
        else:
            for tk in T.parallel(iparams[C.I_B] * iparams[C.I_N2]):
                task(ns(q=q, k=k, v=v, dy=dy, o=o, smax=smax, ssum=ssum, pse=pse, mask=atten_mask,
                        drop=drop_mask, bm=bmeta, ip=iparams, fp=fparams, dq=dq, dk=dk, dv=dv,
                        dpse=dpse_acc, ws=ws), tk // iparams[C.I_N2], tk % iparams[C.I_N2])

    func = C.drop_params(fag_bwd, bwd_param_names(spec))
    return func.with_attr("global_symbol", name)
