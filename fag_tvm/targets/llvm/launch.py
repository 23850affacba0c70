"""The LLVM launcher: pack a validated call's arrays into the ABI (flat, 64-byte aligned buffers +
bmeta/iparams/fparams) and run the fused kernel (same contract as the reference target). A `Launch` binds
everything static about one call signature once; `forward_arrays` / `backward_arrays` drive it on NumPy."""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...config import FLT_MAX, OpConfig
from ...core.abi import STATS_LANES, kernel_spec, runtime_params, total_rows
from ...core.buffers import ALIGN, aligned_empty, aligned_empty_group, data_ptr, ensure_aligned, kernel_view
from ...core.memo import BoundedMemo
from ..base import MAIN, KernelProvider
from .workspace import workspace_floats

_F32_MAX = np.float32(FLT_MAX)
_F32 = np.dtype(np.float32)
_U16 = np.dtype(np.uint16)


_PARAMS = BoundedMemo(256)


def _aligned_params(cfg: OpConfig, a: dict[str, Any], tile_skip: bool):
    """(bmeta, iparams, fparams) of a call, flat and 64-byte aligned; cached per (config, mask/pse shapes,
    tile_skip) since they depend on nothing else (the kernels only read them)."""
    mask, pse = a.get("atten_mask"), a.get("pse_shift")
    key = (cfg, tile_skip, None if mask is None else mask.shape, None if pse is None else pse.shape)
    p = _PARAMS.get(key)
    if p is None:
        p = _PARAMS.put(key, tuple(ensure_aligned(x).reshape(-1) for x in runtime_params(cfg, mask, pse, tile_skip)))
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


def _dy_shape(cfg: OpConfig, q_shape: tuple[int, ...]) -> tuple[int, ...]:
    if cfg.layout in ("BSH", "SBH"):
        return (*q_shape[:2], cfg.N1 * cfg.Dv)
    return (*q_shape[:-1], cfg.Dv)


def _kernel(kernels: KernelProvider, cfg: OpConfig, direction: str):
    """The provider's kernel for this call; the JIT provider keeps them per config (one lookup per call)."""
    memo = getattr(kernels, "by_config", None)
    if memo is None:
        return kernels(kernel_spec(cfg, direction))
    key = (cfg, direction)
    run = memo.get(key)
    if run is None:
        run = _put(memo, key, kernels(kernel_spec(cfg, direction)))
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


def _host(x: Any) -> np.ndarray:
    """A buffer of any DLPack kind (NumPy, torch, ...) as NumPy, zero-copy: for the rare data-dependent checks."""
    return x if isinstance(x, np.ndarray) else np.from_dlpack(x)


def _kernel_dtype(dt: np.dtype) -> np.dtype:
    """The dtype a kernel reads/writes for an array dtype (bf16 as its uint16 bits: what DLPack can carry)."""
    return _U16 if dt.kind not in "fiu" else dt


class Launch:
    """One validated call's launch with everything static resolved once: the compiled function, the packed
    metadata for both tile-skip choices, the outputs' shapes and kernel dtypes, the workspace size, and which
    data-dependent checks apply at all. A bound launch is what a repeated call of one signature reuses
    (api.prepared, the torch op); `forward_arrays` / `backward_arrays` are its NumPy drivers.

    Calling it takes flat, C-contiguous, 64-byte aligned buffers of any DLPack kind (NumPy arrays, torch
    tensors) in ABI order -- the caller's inputs named by `input_names`, then fresh outputs shaped by
    `outputs` (bf16 as uint16 bits) -- and returns the fp32 dpse accumulator (or None)."""

    def __init__(self, cfg: OpConfig, direction: str, a: dict[str, Any], kernels: KernelProvider,
                 tile_skip: bool | None = None) -> None:
        run = _kernel(kernels, cfg, direction)
        self.kernel = run
        self.cfg, self.direction, self.spec = cfg, direction, run.spec
        fn = getattr(run, "functions", None)
        self.function = None if fn is None else fn[MAIN]  # the tvm-ffi function (None: not a compiled Kernel)
        self._fn = run if fn is None else self.function  # any other provider (a tuning capture) is called
        self.params = {ts: _aligned_params(cfg, a, ts if tile_skip is None else tile_skip) for ts in (True, False)}
        spec = self.spec
        optional = (("pse_shift",) if spec.pse != "none" else ()) + (("atten_mask",) if spec.full_mask else ()) \
            + (("drop_mask",) if spec.dropout else ())
        q, k, v = (a[n] for n in ("query", "key", "value"))
        if direction == "fwd":
            self.input_names = ("query", "key", "value", *optional)
            stats = (cfg.T, cfg.N1, STATS_LANES) if cfg.tnd else (cfg.B, cfg.N1, cfg.Sq, STATS_LANES)
            self.outputs = ((_dy_shape(cfg, q.shape), q.dtype), (stats, _F32), (stats, _F32))
            # A fully masked row without invalid-line handling has uniform P over ALL Skv columns, including
            # tiles the band rule skipped: such a call is recomputed without skipping (rare; SPEC §8).
            self.row_check = cfg.band and not cfg.invalid_rows
            self.workspace_floats = 0
        else:
            self.input_names = ("query", "key", "value", "dy", "attention_in", "softmax_max", "softmax_sum",
                                *optional)
            self.outputs = ((q.shape, q.dtype), (k.shape, k.dtype), (v.shape, v.dtype))
            self.row_check = False
            self.workspace_floats = max(1, workspace_floats(spec, total_rows(cfg)))
        self.kernel_dtypes = tuple(_kernel_dtype(np.dtype(dt)) for _, dt in self.outputs)
        # tiles are only ever skipped under a band rule: without one, either choice runs the same code
        self.band = cfg.band
        self.dpse_shape = a["pse_shift"].shape if spec.dpse else None

    def set_iparam(self, slot: int, value: int) -> None:
        """Give this launch its own iparams with `slot` set (the packed metadata is shared between launches of
        one signature: never written in place). Targets use the ABI's reserved slots for runtime modes."""
        params = {}
        for ts, (bm, ip, fp) in self.params.items():
            own = aligned_empty(ip.shape, ip.dtype)
            own[...] = ip
            own[slot] = value
            params[ts] = (bm, own, fp)
        self.params = params

    def __call__(self, inputs: list[Any], outputs: list[Any]) -> np.ndarray | None:
        if self.direction == "fwd":
            for tile_skip in (True, False):
                self._fn(*inputs, *self.params[tile_skip], *outputs)
                if not self.row_check or not np.any(_host(outputs[1])[::STATS_LANES] == -_F32_MAX):
                    break
            return None
        tile_skip = True
        if self.band:
            # Rows that are fully masked but carry ordinary stats (max=-FLT_MAX, sum<FLT_MAX) have uniform P
            # over every column, skipped tiles included: then no tile may be skipped. (The min() test is the
            # cheap common case: no row at -FLT_MAX at all.)
            m8 = _host(inputs[5])[::STATS_LANES]
            tile_skip = m8.min(initial=0.0) > -_F32_MAX or not np.any(
                (m8 == -_F32_MAX) & (_host(inputs[6])[::STATS_LANES] != _F32_MAX))
        dpse = None
        if self.dpse_shape is not None:
            dpse = aligned_empty(self.dpse_shape, np.float32)
            dpse[...] = 0.0
            outputs = [*outputs, dpse.reshape(-1)]
        self._fn(*inputs, *self.params[tile_skip], *outputs, _workspace(self.workspace_floats))
        return dpse


def launch_for(cfg: OpConfig, direction: str, a: dict[str, Any], kernels: KernelProvider,
               cls: type = Launch) -> Launch:
    """The call's Launch (`cls`: a target's subclass); the JIT provider keeps them per (config, mask and pse
    shapes)."""
    memo = getattr(kernels, "by_config", None)
    if memo is None:
        return cls(cfg, direction, a, kernels)
    mask, pse = a.get("atten_mask"), a.get("pse_shift")
    key = ("launch", cfg, direction, None if mask is None else mask.shape, None if pse is None else pse.shape)
    run = memo.get(key)
    if run is None:
        run = _put(memo, key, cls(cfg, direction, a, kernels))
    return run


def _put(memo: dict, key: tuple, value: Any) -> Any:
    """Store in a provider's memo: bounded (BoundedMemo.put) where it is one, a plain dict otherwise."""
    put = getattr(memo, "put", None)
    if put is not None:
        return put(key, value)
    memo[key] = value
    return value


def run_arrays(launch: Launch, a: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """A Launch on NumPy arrays: inputs flattened (unaligned ones copied to aligned memory: an unaligned
    pointer would fault in the kernels' aligned vector loads), outputs in one aligned allocation."""
    ins = []
    for name in launch.input_names:
        x = _flat_input(a[name])
        ins.append(x if data_ptr(x) % ALIGN == 0 else ensure_aligned(x))
    outs = aligned_empty_group([(shape, kdt) for (shape, _), kdt in zip(launch.outputs, launch.kernel_dtypes)])
    dpse = launch(ins, [o.reshape(-1) for o in outs])
    outs = [o if o.dtype == dt else o.view(dt) for o, (_, dt) in zip(outs, launch.outputs)]
    if launch.direction == "fwd":
        return dict(zip(("attention_out", "softmax_max", "softmax_sum"), outs))
    pse = a.get("pse_shift")
    return {"dq": outs[0], "dk": outs[1], "dv": outs[2],
            "dpse": None if dpse is None else dpse.astype(pse.dtype)}


def forward_arrays(cfg: OpConfig, a: dict[str, Any], kernels: KernelProvider) -> dict[str, np.ndarray]:
    """Forward: attention_out (input dtype) and fp32 softmax_max / softmax_sum [..., 8]."""
    return run_arrays(launch_for(cfg, "fwd", a, kernels), a)


def backward_arrays(cfg: OpConfig, a: dict[str, Any], kernels: KernelProvider) -> dict[str, np.ndarray | None]:
    """Backward with supplied stats: dq, dk, dv (input dtypes) and dpse (pse dtype) or None."""
    return run_arrays(launch_for(cfg, "bwd", a, kernels), a)


def workspace_bytes(cfg: OpConfig) -> int:
    """Bytes of the backward's fp32 scratch (Di + dq accumulator) for `cfg`."""
    return 4 * workspace_floats(kernel_spec(cfg, "bwd"), total_rows(cfg))
