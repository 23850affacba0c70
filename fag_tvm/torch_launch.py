"""The torch op's per-call path: a repeated call of one signature hands its tensors straight to the target's
bound launch (Target.prepare) -- flat views in, fresh torch outputs out, no NumPy round trip, no validation
(everything it reads is in the key). Targets without a bound launch and empty calls go through the API's
NumPy path instead.

The key holds every scalar (typed by the caller), each tensor's shape and dtype, and the compressed mask's
buffer (validated by content); the tensors themselves are checked per call for what a kernel relies on:
C-contiguous and 64-byte aligned, else copied (torch's CPU allocator aligns to 64 bytes, so tensors torch
allocated need no copy; ones wrapping NumPy memory may)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from . import api
from .arrays import numpy_to_torch, torch_to_numpy
from .core.buffers import ALIGN, poisoning
from .core.memo import BoundedMemo

FWD_OUTPUTS = ("attention_out", "softmax_max", "softmax_sum")
BWD_OUTPUTS = ("dq", "dk", "dv", "dpse")

# the dtype a kernel reads and writes for a tensor dtype (bf16 as its raw bits, bool masks as bytes)
_KERNEL_VIEW = {torch.bfloat16: torch.uint16, torch.bool: torch.uint8}


class _Bound:
    """A prepared signature on the torch side: the target's launch and its outputs as torch dtypes."""

    __slots__ = ("launch", "names", "outputs", "pse_dtype")

    def __init__(self, p: api.Prepared, tensors: dict[str, Optional[Tensor]]) -> None:
        self.launch = p.launch
        self.names = p.launch.input_names
        dtypes = [tensors["query"].dtype, torch.float32, torch.float32] if p.launch.direction == "fwd" else \
            [tensors[n].dtype for n in ("query", "key", "value")]
        self.outputs = tuple((tuple(shape), dt) for (shape, _), dt in zip(p.launch.outputs, dtypes))
        pse = tensors.get("pse_shift")
        self.pse_dtype = None if pse is None else pse.dtype

    def __call__(self, tensors: dict[str, Optional[Tensor]]) -> Optional[list[Optional[Tensor]]]:
        """The outputs (dpse last for a backward, None where not computed), or None when a tensor is not a CPU
        tensor or an output cannot be allocated aligned (then the NumPy path runs)."""
        ins = []
        for name in self.names:
            t = tensors[name]
            if t.device.type != "cpu":
                return None
            if t.requires_grad:
                t = t.detach()
            if not t.is_contiguous() or t.data_ptr() % ALIGN:  # a kernel reads aligned vectors: an aligned copy
                t = torch.empty(t.shape, dtype=t.dtype).copy_(t)
            view = _KERNEL_VIEW.get(t.dtype)
            ins.append((t if view is None else t.view(view)).view(-1))
        outs, flat = [], []
        for shape, dt in self.outputs:
            o = torch.empty(shape, dtype=dt)
            if o.data_ptr() % ALIGN:  # not torch's CPU allocator (a custom one): the NumPy path aligns
                return None
            if poisoning():
                o.fill_(float("nan"))
            view = _KERNEL_VIEW.get(dt)
            outs.append(o)
            flat.append((o if view is None else o.view(view)).view(-1))
        dpse = api.guard_memory(self.launch, ins, flat)
        if self.launch.direction == "bwd":
            outs.append(None if dpse is None else numpy_to_torch(dpse).to(self.pse_dtype))
        return outs


_BOUND = BoundedMemo(256)


def numpy_arrays(tensors: dict[str, Optional[Tensor]]) -> dict[str, np.ndarray]:
    """The given tensors as NumPy (zero copy), absent ones left out."""
    return {n: torch_to_numpy(t, n) for n, t in tensors.items() if t is not None}


def call(direction: str, tensors: dict[str, Optional[Tensor]], scalar_key: tuple,
         scalars: Callable[[], dict[str, Any]]) -> Optional[list[Optional[Tensor]]]:
    """A forward's (attention_out, softmax_max, softmax_sum) or a backward's (dq, dk, dv, dpse or None) for
    `tensors` (API argument names, always in the same order for a direction; absent ones None) and the
    caller's hashable `scalar_key` (`scalars()` gives the API keywords). None for an empty call (the caller
    takes the API's full path)."""
    mask = tensors.get("atten_mask")
    key = (direction, scalar_key, *[None if t is None else (t.shape, t.dtype) for t in tensors.values()],
           None if mask is None else mask.data_ptr())
    bound = _BOUND.get(key)
    if bound is None:
        a = numpy_arrays(tensors)
        p = api.prepared(direction, a, scalar_key, scalars)
        if p is None:
            return None
        if p.launch is None:  # a target without a bound launch: its NumPy driver
            return _from_numpy(direction, api.guard_memory(p.run, a))
        bound = _BOUND.put(key, _Bound(p, tensors))
    outs = bound(tensors)
    if outs is None:  # tensors the launch cannot take as they are: the NumPy path copies and aligns them
        r = api.run_prepared(direction, numpy_arrays(tensors), scalar_key, scalars)
        return None if r is None else _from_numpy(direction, r)
    return outs


def _from_numpy(direction: str, r: dict[str, Any]) -> list[Optional[Tensor]]:
    names = FWD_OUTPUTS if direction == "fwd" else BWD_OUTPUTS
    return [None if r[n] is None else numpy_to_torch(r[n]) for n in names]
