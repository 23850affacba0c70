"""target="llvm": run validated calls on TVM-compiled CPU kernels (same contract as fag_tvm.reference)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .config import FLT_MAX, OpConfig
from .kernels.abi import kernel_spec, runtime_params

_F32_MAX = np.float32(FLT_MAX)


def _flat_in(x: np.ndarray | None) -> np.ndarray | None:
    """Contiguous, 64-byte aligned, flat view (copied only when needed; SPEC A9)."""
    from ._tvm import ensure_aligned

    if x is None:
        return None
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    return ensure_aligned(np.ascontiguousarray(x)).reshape(-1)


def _aligned_params(cfg: OpConfig, a: dict[str, Any], tile_skip: bool):
    from ._tvm import ensure_aligned

    return tuple(ensure_aligned(x) for x in runtime_params(cfg, a.get("atten_mask"), a.get("pse_shift"), tile_skip))


def jit_kernel(spec):
    """Kernel provider of the JIT path: build (or load from the cache) the kernel for `spec`."""
    from .build import build_kernel

    return build_kernel(spec)


def forward_arrays(cfg: OpConfig, a: dict[str, Any], provider=jit_kernel) -> dict[str, np.ndarray]:
    """Forward: attention_out (input dtype) and fp32 softmax_max / softmax_sum [..., 8]."""
    from ._tvm import aligned_empty

    run = provider(kernel_spec(cfg, "fwd"))
    spec = run.spec
    q, k, v = (_flat_in(a[n]) for n in ("query", "key", "value"))
    pse = _flat_in(a.get("pse_shift")) if spec.pse != "none" else None
    mask = _flat_in(a.get("atten_mask")) if spec.full_mask else None
    drop = _flat_in(a.get("drop_mask")) if spec.dropout else None
    dy_shape = (*a["query"].shape[:-1], cfg.Dv) if cfg.layout not in ("BSH", "SBH") else \
        (*a["query"].shape[:2], cfg.N1 * cfg.Dv)
    rows = (cfg.T if cfg.tnd else cfg.B * cfg.Sq) * cfg.N1
    out = aligned_empty(dy_shape, a["query"].dtype)
    smax = aligned_empty((rows * 8,), np.float32)
    ssum = aligned_empty((rows * 8,), np.float32)
    for tile_skip in (True, False):
        bmeta, ip, fp = _aligned_params(cfg, a, tile_skip)
        args = [q, k, v] + [x for x in (pse, mask, drop) if x is not None] + [
            bmeta.reshape(-1), ip, fp, out.reshape(-1), smax, ssum]
        run(*args)
        # A fully masked row without invalid-line handling has uniform P over ALL Skv columns, including
        # tiles the band rule skipped: recompute without skipping (rare; SPEC §8).
        if cfg.invalid_rows or not cfg.band or not np.any(smax[::8] == -_F32_MAX):
            break
    stat_shape = (cfg.T, cfg.N1, 8) if cfg.tnd else (cfg.B, cfg.N1, cfg.Sq, 8)
    return {"attention_out": out, "softmax_max": smax.reshape(stat_shape), "softmax_sum": ssum.reshape(stat_shape)}


def backward_arrays(cfg: OpConfig, a: dict[str, Any], provider=jit_kernel) -> dict[str, np.ndarray | None]:
    """Backward with supplied stats: dq, dk, dv (input dtypes) and dpse (pse dtype) or None."""
    from ._tvm import aligned_empty
    from .kernels.spec import bwd_workspace_floats

    run = provider(kernel_spec(cfg, "bwd"))
    spec = run.spec
    q, k, v, dy, o = (_flat_in(a[n]) for n in ("query", "key", "value", "dy", "attention_in"))
    smax, ssum = _flat_in(a["softmax_max"]), _flat_in(a["softmax_sum"])
    pse_in = a.get("pse_shift")
    pse = _flat_in(pse_in) if spec.pse != "none" else None
    mask = _flat_in(a.get("atten_mask")) if spec.full_mask else None
    drop = _flat_in(a.get("drop_mask")) if spec.dropout else None
    # Rows that are fully masked but carry ordinary stats (max=-FLT_MAX, sum<FLT_MAX) have uniform P over
    # every column, skipped tiles included: then no tile may be skipped.
    m8, s8 = smax[::8], ssum[::8]
    tile_skip = not np.any((m8 == -_F32_MAX) & (s8 != _F32_MAX))
    bmeta, ip, fp = _aligned_params(cfg, a, tile_skip)
    dq = aligned_empty(a["query"].shape, a["query"].dtype)
    dk = aligned_empty(a["key"].shape, a["key"].dtype)
    dv = aligned_empty(a["value"].shape, a["value"].dtype)
    rows = int(ip[21])
    ws = aligned_empty((max(1, bwd_workspace_floats(spec, rows)),), np.float32)
    dpse_acc = None
    if spec.dpse:
        dpse_acc = aligned_empty(pse_in.shape, np.float32)
        dpse_acc[...] = 0.0
    args = [q, k, v, dy, o, smax, ssum] + [x for x in (pse, mask, drop) if x is not None] + [
        bmeta.reshape(-1), ip, fp, dq.reshape(-1), dk.reshape(-1), dv.reshape(-1)]
    if dpse_acc is not None:
        args.append(dpse_acc.reshape(-1))
    args.append(ws)
    run(*args)
    dpse = None if dpse_acc is None else dpse_acc.astype(pse_in.dtype)
    return {"dq": dq, "dk": dk, "dv": dv, "dpse": dpse}
