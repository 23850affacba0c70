"""Forward kernel (online softmax, FA2-like on CPU) as hand-written TIR generated from Python (ABI.md).

One task = (b, n) query head. Per q block: pack Q; running max m = -FLT_MAX (finite, as CANN: a
fully masked row then behaves like CANN's uniform P), running sum l = 0, O accumulator = 0; for each
KV block that intersects the band (TILE_SKIP=1): pack K^T, V; S = Q K^T (micro-kernel); cells (score,
pse, masks, dropout factor); per row: new max, alpha = exp(m_old - m_new), P = exp(S - m_new), l, O *= alpha;
P' = P * drop / keep rounded to dtype; O += P' V (micro-kernel). Finally o = O / l, smax = m, ssum = l
(8 lanes); with INVALID_ROWS=1 a row whose max stayed -FLT_MAX gets o = 0, (-FLT_MAX, +FLT_MAX).
"""
from __future__ import annotations

from .._tvm import tirx_script
from .spec import KernelSpec, param_names

def fwd_param_names(spec: KernelSpec) -> list[str]:
    return param_names(spec)


def make_fwd(spec: KernelSpec, knobs=None, name: str = "fag_fwd"):
    # TVM is imported here, not at module level: hosts import this module for the workspace size /
    # parameter names without loading the compiler.
    _, T = tirx_script()

    from schedules.llvm import default_knobs, gemm_shape, prune

    from . import tir_common as C
    from .tir_common import FLT_MAX, DType, ns, pad16

    assert spec.direction == "fwd"
    knobs = knobs or default_knobs(spec)
    ok, why = prune(spec, knobs, l2=1 << 40)
    if not ok:
        raise ValueError(f"infeasible knobs {knobs}: {why}")
    BQ, BKV, VEC = knobs.block_q, knobs.block_kv, knobs.vec
    D, DV, G = spec.d, spec.dv, spec.group
    DVP = pad16(DV)
    dt = DType(spec.dtype)
    SD = dt.storage
    PD = spec.pse_storage_dtype
    LOWP = dt.lowp
    BAND = spec.band
    DROP = spec.dropout
    PSE_SLOPES = spec.pse in ("slopes", "slopes_sqrt")
    NCH = BKV // VEC

    gemm_s = C.make_gemm(BQ, BKV, D, *gemm_shape(knobs, BQ, BKV), VEC, False, False)
    gemm_o = C.make_gemm(BQ, DVP, BKV, *gemm_shape(knobs, BQ, DVP), VEC, False, True)
    pack_q = C.make_pack_rows(BQ, D, D, VEC, dt)
    pack_kt = C.make_pack_rows_t(BKV, D, VEC, dt)
    pack_v = C.make_pack_rows(BKV, DV, DVP, VEC, dt)

    def slope_of(pse, idx):
        return pse[idx] if PSE_SLOPES else T.float32(0)

    def tile_visible(tile_skip, i0, i1, j0, j1, pre, nxt, prefix):
        if not BAND:
            return T.bool(True)
        return T.Or(tile_skip == 0, C.band_any_visible(i0, i1, j0, j1, pre, nxt, prefix))

    def make_cell(check_band: bool):
        @T.macro
        def cell(c, t, i, j):
            t.St[i, j] = C.score_expr(c, t.St[i, j], t.i0 + i, t.j0 + j, check_band)
            if DROP:
                t.Dk[i, j] = C.drop_keep_factor(c, t.i0 + i, t.j0 + j)

        return cell

    @T.macro
    def pad(c, t, i, j):
        t.St[i, j] = T.float32(float("-inf"))
        if DROP:
            t.Dk[i, j] = T.float32(0)

    cells_full = C.make_tile_cells(BQ, BKV, VEC, make_cell(False), pad)
    cells_part = C.make_tile_cells(BQ, BKV, VEC, make_cell(True), pad)

    @T.macro
    def oscale_body(a, c):
        a.O[a.i, c] = a.O[a.i, c] * a.alpha

    oscale_cols = C.make_cols(DVP, VEC, oscale_body)

    @T.macro
    def ozero_body(a, c):
        a.O[a.i, c] = T.float32(0)

    ozero_cols = C.make_cols(DVP, VEC, ozero_body)

    @T.macro
    def oout_body(a, c):
        a.o[a.obase + c] = dt.st(a.O[a.i, c] * a.rl)

    oout_cols = C.make_cols(DV, VEC, oout_body)

    @T.macro
    def task(gb, b, n):
        n2: T.let = n // G
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
        invalid_rows: T.let = gb.ip[C.I_INVALID_ROWS]
        scale: T.let = gb.fp[C.F_SCALE]
        rkeep: T.let = gb.fp[C.F_RKEEP]
        nqb: T.let = (sq + (BQ - 1)) // BQ
        nkb: T.let = (skv + (BKV - 1)) // BKV
        rowbase: T.let = row0 + n * sq
        slope: T.let = slope_of(gb.pse, pse_off + n * p_sn)

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

        for ib in range(nqb):
            i0: T.let = ib * BQ
            ni: T.let = T.Cast("int32", T.min(sq - i0, T.int64(BQ)))
            pack_q(Qt, gb.q, q_off + n * q_sn + i0 * q_ss, q_ss, ni)
            for i in range(BQ):
                mrow[i] = T.float32(-FLT_MAX)
                lrow[i] = T.float32(0)
                ozero_cols(ns(O=Oa, i=i))
            for jb in range(nkb):
                j0: T.let = jb * BKV
                nj: T.let = T.Cast("int32", T.min(skv - j0, T.int64(BKV)))
                if tile_visible(tile_skip, i0, i0 + ni, j0, j0 + nj, pre, nxt, prefix):
                    pack_kt(KT, gb.k, k_off + n2 * k_sn + j0 * k_ss, k_ss, nj)
                    pack_v(Vt, gb.v, v_off + n2 * v_sn + j0 * v_ss, v_ss, nj)
                    gemm_s(St, Qt, KT)
                    if BAND:
                        if C.band_all_visible(i0, i0 + ni, j0, j0 + nj, pre, nxt, prefix):
                            cells_full(
                                ns(spec=spec, dt=dt, scale=scale, rkeep=rkeep, pse=gb.pse, mask=gb.mask,
                                   drop=gb.drop, pse_head=pse_off + n * p_sn, p_si=p_si,
                                   mask_head=mask_off + n * m_sn, m_si=m_si, drop_head=drop0 + n * sq * skv,
                                   skv=skv, pre=pre, nxt=nxt, prefix=prefix, q_start=q_start,
                                   kv_start=kv_start, alibi_mode=alibi_mode, alibi_sq=alibi_sq,
                                   alibi_skv=alibi_skv, slope=slope),
                                ns(St=St, Dk=Dk, i0=i0, j0=j0, ni=ni, nj=nj))
                        else:
                            cells_part(
                                ns(spec=spec, dt=dt, scale=scale, rkeep=rkeep, pse=gb.pse, mask=gb.mask,
                                   drop=gb.drop, pse_head=pse_off + n * p_sn, p_si=p_si,
                                   mask_head=mask_off + n * m_sn, m_si=m_si, drop_head=drop0 + n * sq * skv,
                                   skv=skv, pre=pre, nxt=nxt, prefix=prefix, q_start=q_start,
                                   kv_start=kv_start, alibi_mode=alibi_mode, alibi_sq=alibi_sq,
                                   alibi_skv=alibi_skv, slope=slope),
                                ns(St=St, Dk=Dk, i0=i0, j0=j0, ni=ni, nj=nj))
                    else:
                        cells_full(
                            ns(spec=spec, dt=dt, scale=scale, rkeep=rkeep, pse=gb.pse, mask=gb.mask,
                               drop=gb.drop, pse_head=pse_off + n * p_sn, p_si=p_si,
                               mask_head=mask_off + n * m_sn, m_si=m_si, drop_head=drop0 + n * sq * skv,
                               skv=skv, pre=pre, nxt=nxt, prefix=prefix, q_start=q_start,
                               kv_start=kv_start, alibi_mode=alibi_mode, alibi_sq=alibi_sq,
                               alibi_skv=alibi_skv, slope=slope),
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
                        alpha: T.let = C.fexp(mrow[i] - mx)
                        for v in T.vectorized(VEC):
                            red[v] = T.float32(0)
                        for jc in range(NCH):
                            for v in T.vectorized(VEC):
                                St[i, jc * VEC + v] = C.fexp(St[i, jc * VEC + v] - mx)
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
                if T.And(invalid_rows != 0, mrow[i] == T.float32(-FLT_MAX)):
                    oout_cols(ns(o=gb.o, O=Oa, i=i, rl=T.float32(0), obase=o_off + n * o_sn + (i0 + i) * o_ss))
                    for l in range(8):
                        gb.smax[(rowbase + i0 + i) * 8 + l] = T.float32(-FLT_MAX)
                        gb.ssum[(rowbase + i0 + i) * 8 + l] = T.float32(FLT_MAX)
                else:
                    oout_cols(ns(o=gb.o, O=Oa, i=i,
                                 rl=T.Select(lrow[i] > T.float32(0), T.float32(1) / lrow[i], T.float32(0)),
                                 obase=o_off + n * o_sn + (i0 + i) * o_ss))
                    for l in range(8):
                        gb.smax[(rowbase + i0 + i) * 8 + l] = mrow[i]
                        gb.ssum[(rowbase + i0 + i) * 8 + l] = lrow[i]

    @T.prim_func
    def fag_fwd(q_h: T.handle, k_h: T.handle, v_h: T.handle, pse_h: T.handle, mask_h: T.handle,
                drop_h: T.handle, bmeta_h: T.handle, iparams: T.Buffer((32,), "int64"),
                fparams: T.Buffer((4,), "float32"), o_h: T.handle, smax_h: T.handle, ssum_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n_q = T.int64()
        n_k = T.int64()
        n_v = T.int64()
        n_pse = T.int64()
        n_mask = T.int64()
        n_drop = T.int64()
        n_bm = T.int64()
        n_o = T.int64()
        n_sm = T.int64()
        n_ss = T.int64()
        q = T.match_buffer(q_h, (n_q,), SD)
        k = T.match_buffer(k_h, (n_k,), SD)
        v = T.match_buffer(v_h, (n_v,), SD)
        pse = T.match_buffer(pse_h, (n_pse,), PD)
        atten_mask = T.match_buffer(mask_h, (n_mask,), "uint8")
        drop_mask = T.match_buffer(drop_h, (n_drop,), "uint8")
        bmeta = T.match_buffer(bmeta_h, (n_bm,), "int64")
        o = T.match_buffer(o_h, (n_o,), SD)
        smax = T.match_buffer(smax_h, (n_sm,), "float32")
        ssum = T.match_buffer(ssum_h, (n_ss,), "float32")
        for tk in T.parallel(iparams[C.I_B] * iparams[C.I_N2] * G):
            task(ns(q=q, k=k, v=v, pse=pse, mask=atten_mask, drop=drop_mask, bm=bmeta, ip=iparams,
                    fp=fparams, o=o, smax=smax, ssum=ssum),
                 tk // (iparams[C.I_N2] * G), tk % (iparams[C.I_N2] * G))

    func = C.drop_params(fag_fwd, fwd_param_names(spec))
    return func.with_attr("global_symbol", name)
