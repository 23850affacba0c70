"""The host <-> kernel ABI of every target (ABI.md), TVM-free: the ONE definition of the metadata
slots, the buffer list of a specialisation, and OpConfig -> (KernelSpec, bmeta / iparams / fparams).

Every layout becomes flat buffers + per-batch offsets + strides, so one compiled kernel serves every
layout and every B/Sq/Skv/T. Kernel generators import the slot constants from here (never literals)."""
from __future__ import annotations

import numpy as np

from ..config import ALIBI_ROWS, INT32_MAX, OpConfig
from .spec import KernelSpec

# bmeta columns (int64 [B, BMETA_WIDTH])
SQ, SKV, Q_OFF, K_OFF, V_OFF, O_OFF, ROW0, DROP0, PRE, NEXT, PREFIX, MASK_OFF, PSE_OFF, P_SN, P_SI = range(15)
BMETA_WIDTH = 16
# iparams slots (int64 [IPARAMS_LEN])
(I_B, I_N2, I_Q_SN, I_Q_SS, I_K_SN, I_K_SS, I_V_SN, I_V_SS, I_O_SN, I_O_SS, I_M_SN, I_M_SI, _I12, _I13,
 I_TILE_SKIP, I_Q_START, I_KV_START, I_ALIBI_MODE, I_ALIBI_SQ, I_ALIBI_SKV, I_INVALID_ROWS, I_TOTAL_ROWS,
 I_MAX_SQ, I_MAX_SKV) = range(24)
IPARAMS_LEN = 32
# fparams slots (float32 [FPARAMS_LEN])
F_SCALE, F_KEEP, F_RKEEP = range(3)
FPARAMS_LEN = 4
STATS_LANES = 8  # softmax_max / softmax_sum hold 8 equal floats per row (SPEC §7)
PAD = 16  # head dims are padded to a multiple of this inside tiles and workspaces

# the ABI buffers in call order (ABI.md "Buffers"); optional ones exist only when the spec enables them
BWD_PARAMS = ("q", "k", "v", "dy", "o", "smax", "ssum", "pse", "atten_mask", "drop_mask", "bmeta", "iparams",
              "fparams", "dq", "dk", "dv", "dpse_acc", "ws")
FWD_PARAMS = ("q", "k", "v", "pse", "atten_mask", "drop_mask", "bmeta", "iparams", "fparams", "o", "smax", "ssum")


def pad16(x: int) -> int:
    """x rounded up to a multiple of PAD."""
    return (x + PAD - 1) // PAD * PAD


def param_names(spec: KernelSpec) -> list[str]:
    """ABI argument names of this specialisation, in call order (disabled optional buffers dropped)."""
    skip = set()
    if spec.pse == "none":
        skip.add("pse")
    if not spec.full_mask:
        skip.add("atten_mask")
    if not spec.dropout:
        skip.add("drop_mask")
    if not spec.dpse:
        skip.add("dpse_acc")
    return [p for p in (BWD_PARAMS if spec.direction == "bwd" else FWD_PARAMS) if p not in skip]


def total_rows(cfg: OpConfig) -> int:
    """Number of softmax-stat rows of a call (T*N1 for TND, B*Sq*N1 otherwise)."""
    return (cfg.T if cfg.tnd else cfg.B * cfg.Sq) * cfg.N1

_PSE_KIND = {"BNSS": "ext", "1NSS": "ext", "BN1S": "ext", "TND_BNSS": "ext", "TND_BN1S": "ext",
             "BNHS": "alibi_c", "1NHS": "alibi_c", "slopes_N": "slopes", "slopes_BN": "slopes"}


def kernel_spec(cfg: OpConfig, direction: str) -> KernelSpec:
    """The compile-time specialisation a call needs (everything else is a runtime argument)."""
    pse = _PSE_KIND.get(cfg.pse_form, "none")
    if pse == "slopes" and cfg.pse_type == 3:
        pse = "slopes_sqrt"
    dpse = direction == "bwd" and cfg.dpse_computed
    return KernelSpec(
        direction=direction, dtype=cfg.dtype, d=cfg.D, dv=cfg.Dv, group=cfg.G, band=cfg.band,
        full_mask=cfg.full_mask, pse=pse, pse_add_first=(cfg.pse_type == 1), dropout=cfg.dropout, dpse=dpse,
        dpse_sum_b=dpse and cfg.pse_form == "1NSS" and cfg.B > 1)


def _strides(cfg: OpConfig, n_heads: int, d: int, kv: bool) -> tuple[list[int], int, int]:
    """(per-batch element offsets, head stride, row stride) of a q-like or k-like tensor."""
    L = cfg.layout
    S = cfg.Skv if kv else cfg.Sq
    B = cfg.B
    if L == "BNSD":
        return [b * n_heads * S * d for b in range(B)], S * d, d
    if L in ("BSND", "BSH"):
        return [b * S * n_heads * d for b in range(B)], d, n_heads * d
    if L == "SBH":
        return [b * n_heads * d for b in range(B)], d, B * n_heads * d
    rows = [bi.kv_row0 if kv else bi.q_row0 for bi in cfg.batches]  # TND
    return [r * n_heads * d for r in rows], d, n_heads * d


def runtime_params(cfg: OpConfig, atten_mask: np.ndarray | None, pse: np.ndarray | None,
                   tile_skip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bmeta [B,16] int64, iparams [32] int64, fparams [4] float32 for one call."""
    B, N1 = cfg.B, cfg.N1
    bmeta = np.zeros((B, BMETA_WIDTH), dtype=np.int64)
    ip = np.zeros(IPARAMS_LEN, dtype=np.int64)
    qo, ip[I_Q_SN], ip[I_Q_SS] = _strides(cfg, N1, cfg.D, False)
    ko, ip[I_K_SN], ip[I_K_SS] = _strides(cfg, cfg.N2, cfg.D, True)
    vo, ip[I_V_SN], ip[I_V_SS] = _strides(cfg, cfg.N2, cfg.Dv, True)
    oo, ip[I_O_SN], ip[I_O_SS] = _strides(cfg, N1, cfg.Dv, False)
    drop0 = 0
    for b, bi in enumerate(cfg.batches):
        row0 = (bi.q_row0 if cfg.tnd else b * cfg.Sq) * N1
        bmeta[b, [SQ, SKV, Q_OFF, K_OFF, V_OFF, O_OFF, ROW0, DROP0]] = (
            bi.sq, bi.skv, qo[b], ko[b], vo[b], oo[b], row0, drop0)
        bmeta[b, [PRE, NEXT, PREFIX]] = (bi.pre, bi.next, bi.prefix) if cfg.band else (INT32_MAX, INT32_MAX, 0)
        bmeta[b, [PSE_OFF, P_SN, P_SI]] = _pse_addr(cfg, b, drop0, pse)
        drop0 += N1 * bi.sq * bi.skv
    if cfg.full_mask:
        ms = atten_mask.shape
        width = ms[-1]
        ip[I_M_SI] = width
        if cfg.mask_form == "B1SS":
            bmeta[:, MASK_OFF] = np.arange(B) * ms[-2] * width
        elif cfg.mask_form == "BNSS":
            bmeta[:, MASK_OFF] = np.arange(B) * N1 * ms[-2] * width
            ip[I_M_SN] = ms[-2] * width
    ip[I_B], ip[I_N2] = B, cfg.N2
    ip[I_TILE_SKIP] = 1 if tile_skip else 0
    ip[I_Q_START], ip[I_KV_START] = cfg.q_start, cfg.kv_start
    if cfg.pse_alibi_compressed:
        ip[I_ALIBI_MODE] = 1 if cfg.tnd else 0
        ip[I_ALIBI_SQ], ip[I_ALIBI_SKV] = cfg.Sq, pse.shape[-1]
    ip[I_INVALID_ROWS] = 1 if cfg.invalid_rows else 0
    ip[I_TOTAL_ROWS] = total_rows(cfg)
    ip[I_MAX_SQ], ip[I_MAX_SKV] = cfg.Sq, cfg.Skv
    fp = np.zeros(FPARAMS_LEN, dtype=np.float32)
    fp[F_SCALE], fp[F_KEEP], fp[F_RKEEP] = cfg.scale, cfg.keep_prob, 1.0 / cfg.keep_prob
    return bmeta, ip, fp


def _pse_addr(cfg: OpConfig, b: int, drop0: int, pse: np.ndarray | None) -> tuple[int, int, int]:
    """(PSE_OFF, P_SN, P_SI) of batch b for the config's pse form."""
    f, N1, bi = cfg.pse_form, cfg.N1, cfg.batches[b]
    Sq, Skv = cfg.Sq, cfg.Skv
    if f == "BNSS":
        return b * N1 * Sq * Skv, Sq * Skv, Skv
    if f == "1NSS":
        return 0, Sq * Skv, Skv
    if f == "BN1S":
        return b * N1 * Skv, Skv, 0
    if f == "TND_BNSS":
        return drop0, bi.sq * bi.skv, bi.skv  # same packing as the dropout bits
    if f == "TND_BN1S":
        return N1 * bi.kv_row0, bi.skv, 0
    if f in ("BNHS", "1NHS"):
        W = pse.shape[-1]
        return (b * N1 * ALIBI_ROWS * W if f == "BNHS" else 0), ALIBI_ROWS * W, W
    if f == "slopes_N":
        return 0, 1, 0
    if f == "slopes_BN":
        return b * N1, 1, 0
    return 0, 0, 0
