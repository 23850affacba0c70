"""The LLVM launcher: pack a validated call's NumPy arrays into the ABI (flat, 64-byte aligned buffers +
bmeta/iparams/fparams) and run the fused kernel (same contract as the reference target)."""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...config import FLT_MAX, OpConfig
from ...core.abi import STATS_LANES, kernel_spec, runtime_params, total_rows
from ...core.buffers import ALIGN, aligned_empty, aligned_empty_group, data_ptr, ensure_aligned, kernel_view
from ..base import MAIN, KernelProvider
from .workspace import workspace_floats

_F32_MAX = np.float32(FLT_MAX)
_F32 = np.dtype(np.float32)
_U16 = np.dtype(np.uint16)


_PARAMS: dict[tuple, tuple] = {}
_PARAMS_MAX = 256
_PARAMS_LOCK = threading.Lock()


def _aligned_params(cfg: OpConfig, a: dict[str, Any], tile_skip: bool):
    """(bmeta, iparams, fparams) of a call, flat and 64-byte aligned; cached per (config, mask/pse shapes,
    tile_skip) since they depend on nothing else (the kernels only read them). A hit takes no lock (one
    dict lookup is atomic); a full cache is simply emptied."""
    mask, pse = a.get("atten_mask"), a.get("pse_shift")
    key = (cfg, tile_skip, None if mask is None else mask.shape, None if pse is None else pse.shape)
    p = _PARAMS.get(key)
    if p is None:
        p = tuple(ensure_aligned(x).reshape(-1) for x in runtime_params(cfg, mask, pse, tile_skip))
        with _PARAMS_LOCK:
            if len(_PARAMS) >= _PARAMS_MAX:
                _PARAMS.clear()
            _PARAMS[key] = p
    return p


def _flat_input(x: np.ndarray | None) -> np.ndarray | None:
    """An input as the kernel reads it: 1-D, C-contiguous, bool as uint8, bf16 as its uint16 bits (copied
    only when not contiguous; alignment is checked, and fixed, where the arguments are handed over)."""
    if x is None:
        return None
    if x.dtype.kind not in "fiu":
        x = kernel_view(x)
    elif not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return x.reshape(-1)


def _optional_inputs(spec, a: dict[str, Any]) -> list[np.ndarray]:
    """pse, atten_mask, drop_mask in ABI order, each only when the specialisation reads it."""
    out = []
    if spec.pse != "none":
        out.append(_flat_input(a.get("pse_shift")))
    if spec.full_mask:
        out.append(_flat_input(a.get("atten_mask")))
    if spec.dropout:
        out.append(_flat_input(a.get("drop_mask")))
    return out


def _call(run, args: list[np.ndarray], n_inputs: int) -> None:
    """Run the kernel on flat arguments: the first `n_inputs` are the caller's (any alignment: copied to
    aligned memory when unaligned, an unaligned pointer would fault in the aligned vector loads), the rest
    are aligned by construction (cached metadata, aligned_empty outputs, workspace). A compiled Kernel's
    function takes the NumPy arrays directly (tvm-ffi converts them through DLPack: no per-argument
    Python conversion); any other provider (a tuning capture, a test double) is called with them."""
    args[:n_inputs] = [x if data_ptr(x) % ALIGN == 0 else ensure_aligned(x) for x in args[:n_inputs]]
    fn = getattr(run, "functions", None)
    if fn is None:
        run(*args)
    else:
        fn[MAIN](*args)


def _dy_shape(cfg: OpConfig, q: np.ndarray) -> tuple[int, ...]:
    if cfg.layout in ("BSH", "SBH"):
        return (*q.shape[:2], cfg.N1 * cfg.Dv)
    return (*q.shape[:-1], cfg.Dv)


def _kernel(kernels: KernelProvider, cfg: OpConfig, direction: str):
    """The provider's kernel for this call; the JIT provider keeps them per config (one lookup per call)."""
    memo = getattr(kernels, "by_config", None)
    if memo is None:
        return kernels(kernel_spec(cfg, direction))
    key = (cfg, direction)
    run = memo.get(key)
    if run is None:
        run = memo[key] = kernels(kernel_spec(cfg, direction))
    return run


_WS_REUSE_BYTES = 1 << 20
_WS = threading.local()


def _workspace(floats: int) -> np.ndarray:
    """The backward's fp32 scratch: the kernel initialises every element it reads, so small workspaces are
    reused per thread instead of allocated per call; large ones are allocated (and freed) per call."""
    if floats * 4 > _WS_REUSE_BYTES:
        return aligned_empty((floats,), np.float32)
    ws = getattr(_WS, "buf", None)
    if ws is None or ws.size < floats:
        ws = _WS.buf = aligned_empty((max(floats, 4096),), np.float32)
    return ws


def _outputs(specs: list[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """Aligned outputs in one allocation, bf16 ones allocated as their uint16 bits (what DLPack can carry;
    the caller gets them back viewed as bf16 by `_as_dtype`)."""
    return aligned_empty_group([(shape, _U16 if dt.kind not in "fiu" else dt) for shape, dt in specs])


def _as_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return x if x.dtype == dtype else x.view(dtype)


def forward_arrays(cfg: OpConfig, a: dict[str, Any], kernels: KernelProvider) -> dict[str, np.ndarray]:
    """Forward: attention_out (input dtype) and fp32 softmax_max / softmax_sum [..., 8]."""
    run = _kernel(kernels, cfg, "fwd")
    qa = a["query"]
    ins = [_flat_input(qa), _flat_input(a["key"]), _flat_input(a["value"]), *_optional_inputs(run.spec, a)]
    rows = total_rows(cfg)
    out, smax, ssum = _outputs([(_dy_shape(cfg, qa), qa.dtype), ((rows * STATS_LANES,), _F32),
                                ((rows * STATS_LANES,), _F32)])
    for tile_skip in (True, False):
        _call(run, [*ins, *_aligned_params(cfg, a, tile_skip), out.reshape(-1), smax, ssum], len(ins))
        # A fully masked row without invalid-line handling has uniform P over ALL Skv columns, including
        # tiles the band rule skipped: recompute without skipping (rare; SPEC §8).
        if cfg.invalid_rows or not cfg.band or not np.any(smax[::STATS_LANES] == -_F32_MAX):
            break
    stat_shape = (cfg.T, cfg.N1, STATS_LANES) if cfg.tnd else (cfg.B, cfg.N1, cfg.Sq, STATS_LANES)
    return {"attention_out": _as_dtype(out, qa.dtype), "softmax_max": smax.reshape(stat_shape),
            "softmax_sum": ssum.reshape(stat_shape)}


def backward_arrays(cfg: OpConfig, a: dict[str, Any], kernels: KernelProvider) -> dict[str, np.ndarray | None]:
    """Backward with supplied stats: dq, dk, dv (input dtypes) and dpse (pse dtype) or None."""
    run = _kernel(kernels, cfg, "bwd")
    spec = run.spec
    qa, ka, va = a["query"], a["key"], a["value"]
    ins = [_flat_input(a[n]) for n in ("query", "key", "value", "dy", "attention_in", "softmax_max",
                                       "softmax_sum")]
    ins += _optional_inputs(spec, a)
    # Rows that are fully masked but carry ordinary stats (max=-FLT_MAX, sum<FLT_MAX) have uniform P over
    # every column, skipped tiles included: then no tile may be skipped. (The min() test is the cheap
    # common case: no row at -FLT_MAX at all.)
    m8 = ins[5][::STATS_LANES]
    tile_skip = m8.min(initial=0.0) > -_F32_MAX or not np.any((m8 == -_F32_MAX) & (ins[6][::STATS_LANES] != _F32_MAX))
    dq, dk, dv = _outputs([(qa.shape, qa.dtype), (ka.shape, ka.dtype), (va.shape, va.dtype)])
    args = [*ins, *_aligned_params(cfg, a, tile_skip), dq.reshape(-1), dk.reshape(-1), dv.reshape(-1)]
    pse_in = a.get("pse_shift")
    dpse_acc = None
    if spec.dpse:
        dpse_acc = aligned_empty(pse_in.shape, np.float32)
        dpse_acc[...] = 0.0
        args.append(dpse_acc.reshape(-1))
    args.append(_workspace(max(1, workspace_floats(spec, total_rows(cfg)))))
    _call(run, args, len(ins))
    dpse = None if dpse_acc is None else dpse_acc.astype(pse_in.dtype)
    return {"dq": _as_dtype(dq, qa.dtype), "dk": _as_dtype(dk, ka.dtype), "dv": _as_dtype(dv, va.dtype),
            "dpse": dpse}


def workspace_bytes(cfg: OpConfig) -> int:
    """Bytes of the backward's fp32 scratch (Di + dq accumulator) for `cfg`."""
    return 4 * workspace_floats(kernel_spec(cfg, "bwd"), total_rows(cfg))
