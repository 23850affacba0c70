"""The LLVM launcher: pack a validated call's NumPy arrays into the ABI (flat, 64-byte aligned buffers +
bmeta/iparams/fparams) and run the fused kernel (same contract as the reference target)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ...config import FLT_MAX, OpConfig
from ...core.abi import STATS_LANES, kernel_spec, runtime_params, total_rows
from ...core.buffers import aligned_empty, ensure_aligned, flat_aligned
from ..base import KernelProvider
from .workspace import workspace_floats

_F32_MAX = np.float32(FLT_MAX)


_PARAMS: "OrderedDict[tuple, tuple]" = OrderedDict()
_PARAMS_MAX = 256
_PARAMS_LOCK = threading.Lock()


def _aligned_params(cfg: OpConfig, a: dict[str, Any], tile_skip: bool):
    """(bmeta, iparams, fparams) of a call, 64-byte aligned; cached per (config, mask/pse shapes, tile_skip)
    since they depend on nothing else (the kernels only read them)."""
    mask, pse = a.get("atten_mask"), a.get("pse_shift")
    key = (cfg, tile_skip, None if mask is None else mask.shape, None if pse is None else pse.shape)
    with _PARAMS_LOCK:
        p = _PARAMS.get(key)
        if p is not None:
            _PARAMS.move_to_end(key)
            return p
    p = tuple(ensure_aligned(x) for x in runtime_params(cfg, mask, pse, tile_skip))
    with _PARAMS_LOCK:
        _PARAMS[key] = p
        if len(_PARAMS) > _PARAMS_MAX:
            _PARAMS.popitem(last=False)
    return p


def _optional_inputs(spec, a: dict[str, Any]) -> list[np.ndarray]:
    """pse, atten_mask, drop_mask in ABI order, each only when the specialisation reads it."""
    out = []
    if spec.pse != "none":
        out.append(flat_aligned(a.get("pse_shift")))
    if spec.full_mask:
        out.append(flat_aligned(a.get("atten_mask")))
    if spec.dropout:
        out.append(flat_aligned(a.get("drop_mask")))
    return out


def _dy_shape(cfg: OpConfig, q: np.ndarray) -> tuple[int, ...]:
    if cfg.layout in ("BSH", "SBH"):
        return (*q.shape[:2], cfg.N1 * cfg.Dv)
    return (*q.shape[:-1], cfg.Dv)


def forward_arrays(cfg: OpConfig, a: dict[str, Any], kernels: KernelProvider) -> dict[str, np.ndarray]:
    """Forward: attention_out (input dtype) and fp32 softmax_max / softmax_sum [..., 8]."""
    run = kernels(kernel_spec(cfg, "fwd"))
    q, k, v = (flat_aligned(a[n]) for n in ("query", "key", "value"))
    opt = _optional_inputs(run.spec, a)
    rows = total_rows(cfg)
    out = aligned_empty(_dy_shape(cfg, a["query"]), a["query"].dtype)
    smax = aligned_empty((rows * STATS_LANES,), np.float32)
    ssum = aligned_empty((rows * STATS_LANES,), np.float32)
    for tile_skip in (True, False):
        bmeta, ip, fp = _aligned_params(cfg, a, tile_skip)
        run(q, k, v, *opt, bmeta.reshape(-1), ip, fp, out.reshape(-1), smax, ssum)
        # A fully masked row without invalid-line handling has uniform P over ALL Skv columns, including
        # tiles the band rule skipped: recompute without skipping (rare; SPEC §8).
        if cfg.invalid_rows or not cfg.band or not np.any(smax[::STATS_LANES] == -_F32_MAX):
            break
    stat_shape = (cfg.T, cfg.N1, STATS_LANES) if cfg.tnd else (cfg.B, cfg.N1, cfg.Sq, STATS_LANES)
    return {"attention_out": out, "softmax_max": smax.reshape(stat_shape), "softmax_sum": ssum.reshape(stat_shape)}


def backward_arrays(cfg: OpConfig, a: dict[str, Any], kernels: KernelProvider) -> dict[str, np.ndarray | None]:
    """Backward with supplied stats: dq, dk, dv (input dtypes) and dpse (pse dtype) or None."""
    run = kernels(kernel_spec(cfg, "bwd"))
    spec = run.spec
    q, k, v, dy, o = (flat_aligned(a[n]) for n in ("query", "key", "value", "dy", "attention_in"))
    smax, ssum = flat_aligned(a["softmax_max"]), flat_aligned(a["softmax_sum"])
    # Rows that are fully masked but carry ordinary stats (max=-FLT_MAX, sum<FLT_MAX) have uniform P over
    # every column, skipped tiles included: then no tile may be skipped.
    m8, s8 = smax[::STATS_LANES], ssum[::STATS_LANES]
    tile_skip = not np.any((m8 == -_F32_MAX) & (s8 != _F32_MAX))
    bmeta, ip, fp = _aligned_params(cfg, a, tile_skip)
    dq = aligned_empty(a["query"].shape, a["query"].dtype)
    dk = aligned_empty(a["key"].shape, a["key"].dtype)
    dv = aligned_empty(a["value"].shape, a["value"].dtype)
    ws = aligned_empty((max(1, workspace_floats(spec, total_rows(cfg))),), np.float32)
    pse_in = a.get("pse_shift")
    dpse_acc = None
    args = [q, k, v, dy, o, smax, ssum, *_optional_inputs(spec, a), bmeta.reshape(-1), ip, fp,
            dq.reshape(-1), dk.reshape(-1), dv.reshape(-1)]
    if spec.dpse:
        dpse_acc = aligned_empty(pse_in.shape, np.float32)
        dpse_acc[...] = 0.0
        args.append(dpse_acc.reshape(-1))
    args.append(ws)
    run(*args)
    dpse = None if dpse_acc is None else dpse_acc.astype(pse_in.dtype)
    return {"dq": dq, "dk": dk, "dv": dv, "dpse": dpse}


def workspace_bytes(cfg: OpConfig) -> int:
    """Bytes of the backward's fp32 scratch (Di + dq accumulator) for `cfg`."""
    return 4 * workspace_floats(kernel_spec(cfg, "bwd"), total_rows(cfg))
