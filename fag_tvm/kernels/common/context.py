"""The batch-metadata prologue every kernel starts with, and the per-head context record the cell math
reads (ABI.md: bmeta row b, iparams, fparams). One definition for all targets and directions."""
from __future__ import annotations

from ...core import abi
from .tir import T, ns

W = abi.BMETA_WIDTH


@T.macro
def batch_prologue(gb, b, body, arg):
    """Bind batch b's metadata once (T.let) and expand `body(gb, md, arg)` with `md` holding them.

    gb: the kernel's global buffers (q, k, ..., bm = bmeta, ip = iparams, fp = fparams)."""
    sq: T.let = gb.bm[b * W + abi.SQ]
    skv: T.let = gb.bm[b * W + abi.SKV]
    q_off: T.let = gb.bm[b * W + abi.Q_OFF]
    k_off: T.let = gb.bm[b * W + abi.K_OFF]
    v_off: T.let = gb.bm[b * W + abi.V_OFF]
    o_off: T.let = gb.bm[b * W + abi.O_OFF]
    row0: T.let = gb.bm[b * W + abi.ROW0]
    drop0: T.let = gb.bm[b * W + abi.DROP0]
    pre: T.let = gb.bm[b * W + abi.PRE]
    nxt: T.let = gb.bm[b * W + abi.NEXT]
    prefix: T.let = gb.bm[b * W + abi.PREFIX]
    mask_off: T.let = gb.bm[b * W + abi.MASK_OFF]
    pse_off: T.let = gb.bm[b * W + abi.PSE_OFF]
    p_sn: T.let = gb.bm[b * W + abi.P_SN]
    p_si: T.let = gb.bm[b * W + abi.P_SI]
    q_sn: T.let = gb.ip[abi.I_Q_SN]
    q_ss: T.let = gb.ip[abi.I_Q_SS]
    k_sn: T.let = gb.ip[abi.I_K_SN]
    k_ss: T.let = gb.ip[abi.I_K_SS]
    v_sn: T.let = gb.ip[abi.I_V_SN]
    v_ss: T.let = gb.ip[abi.I_V_SS]
    o_sn: T.let = gb.ip[abi.I_O_SN]
    o_ss: T.let = gb.ip[abi.I_O_SS]
    m_sn: T.let = gb.ip[abi.I_M_SN]
    m_si: T.let = gb.ip[abi.I_M_SI]
    tile_skip: T.let = gb.ip[abi.I_TILE_SKIP]
    q_start: T.let = gb.ip[abi.I_Q_START]
    kv_start: T.let = gb.ip[abi.I_KV_START]
    alibi_mode: T.let = gb.ip[abi.I_ALIBI_MODE]
    alibi_sq: T.let = gb.ip[abi.I_ALIBI_SQ]
    alibi_skv: T.let = gb.ip[abi.I_ALIBI_SKV]
    invalid_rows: T.let = gb.ip[abi.I_INVALID_ROWS]
    total_rows: T.let = gb.ip[abi.I_TOTAL_ROWS]
    scale: T.let = gb.fp[abi.F_SCALE]
    rkeep: T.let = gb.fp[abi.F_RKEEP]
    body(gb, ns(b=b, sq=sq, skv=skv, q_off=q_off, k_off=k_off, v_off=v_off, o_off=o_off, row0=row0, drop0=drop0,
                pre=pre, nxt=nxt, prefix=prefix, mask_off=mask_off, pse_off=pse_off, p_sn=p_sn, p_si=p_si,
                q_sn=q_sn, q_ss=q_ss, k_sn=k_sn, k_ss=k_ss, v_sn=v_sn, v_ss=v_ss, o_sn=o_sn, o_ss=o_ss,
                m_sn=m_sn, m_si=m_si, tile_skip=tile_skip, q_start=q_start, kv_start=kv_start,
                alibi_mode=alibi_mode, alibi_sq=alibi_sq, alibi_skv=alibi_skv, invalid_rows=invalid_rows,
                total_rows=total_rows, scale=scale, rkeep=rkeep), arg)


def head_context(spec, dt, gb, md, n, slope):
    """The record the cell math (score, pse, masks, dropout) reads for query head n of batch md.b."""
    return ns(spec=spec, dt=dt, scale=md.scale, rkeep=md.rkeep, pse=gb.pse, mask=gb.mask, drop=gb.drop,
              dpse=getattr(gb, "dpse", None), pse_head=md.pse_off + n * md.p_sn, p_si=md.p_si,
              mask_head=md.mask_off + n * md.m_sn, m_si=md.m_si, drop_head=md.drop0 + n * md.sq * md.skv,
              skv=md.skv, pre=md.pre, nxt=md.nxt, prefix=md.prefix, q_start=md.q_start, kv_start=md.kv_start,
              alibi_mode=md.alibi_mode, alibi_sq=md.alibi_sq, alibi_skv=md.alibi_skv, slope=slope)
