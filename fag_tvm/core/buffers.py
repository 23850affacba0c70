"""64-byte aligned, C-contiguous NumPy buffers: what every compiled kernel assumes (TVM_NOTES: an
unaligned pointer segfaults in the kernels' aligned vector loads). NumPy only."""
from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

_BF16_KIND = "V"  # ml_dtypes.bfloat16 registers as a void-kind NumPy dtype

ALIGN = 64
_POISON = {"on": False}  # tests: fill fresh float buffers with NaN so an unwritten element cannot pass


def set_poison(on: bool) -> bool:
    """Fill every buffer `aligned_empty` returns with NaN (float dtypes) from now on; returns the previous
    setting. For tests (fag_tvm.testing.poisoned_outputs): outputs a kernel forgets to write then show up
    as NaN instead of as the zeros fresh memory usually holds."""
    old = _POISON["on"]
    _POISON["on"] = bool(on)
    return old


def poisoning() -> bool:
    """Whether fresh float outputs are being NaN-filled (set_poison): allocators outside this module follow it."""
    return _POISON["on"]


_char_at = ctypes.c_char.from_buffer


def data_ptr(a: np.ndarray) -> int:
    """Address of the array's first element. Through the buffer protocol (~0.4 us; `a.ctypes.data` and
    `__array_interface__` cost 2-3 us, which adds up on the per-call path), falling back to `ctypes.data`
    for what cannot export a writable contiguous buffer (read-only or strided views)."""
    try:
        return ctypes.addressof(_char_at(a))
    except (TypeError, ValueError, BufferError):
        return a.ctypes.data


def is_aligned(a: np.ndarray) -> bool:
    return data_ptr(a) % ALIGN == 0


def aligned_empty(shape: Any, dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is 64-byte aligned."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(map(int, shape))
    n = math.prod(shape)
    nbytes = max(1, n) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, dtype=np.uint8)
    off = (-data_ptr(buf)) % ALIGN
    out = buf[off:off + n * dtype.itemsize].view(dtype).reshape(shape)
    if _POISON["on"] and (dtype.kind == "f" or dtype.name == "bfloat16"):
        out[...] = np.nan
    return out


def aligned_empty_group(specs: list[tuple[tuple[int, ...], Any]]) -> list[np.ndarray]:
    """Several uninitialised 64-byte aligned arrays carved from ONE allocation (the outputs of a call: one
    allocation instead of one each, which matters for small calls). They share the allocation's lifetime.
    The layout of a list of (shape, dtype) is computed once."""
    try:
        key = tuple(specs)
        layout = _GROUP_LAYOUTS.get(key)
    except TypeError:  # unhashable shapes (lists)
        key, layout = None, None
    if layout is None:
        parts, total = [], 0
        for shape, dtype in specs:
            shape, dtype = tuple(map(int, shape)), np.dtype(dtype)
            parts.append((total, shape, dtype, dtype.kind == "f" or dtype.name == "bfloat16"))
            total += (math.prod(shape) * dtype.itemsize + ALIGN - 1) // ALIGN * ALIGN
        layout = (max(1, total) + ALIGN, tuple(parts))
        if key is not None:
            if len(_GROUP_LAYOUTS) > 1024:
                _GROUP_LAYOUTS.clear()
            _GROUP_LAYOUTS[key] = layout
    nbytes, parts = layout
    buf = np.empty(nbytes, dtype=np.uint8)
    off = (-data_ptr(buf)) % ALIGN
    out = [np.ndarray(shape, dtype, buf, off + start) for start, shape, dtype, _ in parts]
    if _POISON["on"]:
        for a, part in zip(out, parts):
            if part[3]:
                a[...] = np.nan
    return out


_GROUP_LAYOUTS: dict[tuple, tuple] = {}


def aligned_zeros(shape: Any, dtype: Any) -> np.ndarray:
    a = aligned_empty(shape, dtype)
    a[...] = 0
    return a


def ensure_aligned(arr: np.ndarray) -> np.ndarray:
    """`arr` itself if C-contiguous and 64-byte aligned, else an aligned contiguous copy."""
    arr = np.asarray(arr)
    if arr.flags.c_contiguous and is_aligned(arr):
        return arr
    out = aligned_empty(arr.shape, arr.dtype)
    out[...] = arr
    return out


def flat_aligned(x: np.ndarray | None) -> np.ndarray | None:
    """Contiguous, 64-byte aligned, flat view of an input (copied only when needed; SPEC A9)."""
    if x is None:
        return None
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    return ensure_aligned(np.ascontiguousarray(x)).reshape(-1)


def kernel_view(arr: np.ndarray) -> np.ndarray:
    """The array as a kernel sees it: bool -> uint8, bfloat16 -> uint16 (kernels store bf16 as raw bits;
    DLPack cannot export ml_dtypes bf16), always 1-D. No copy (the caller made it aligned+contiguous)."""
    kind = arr.dtype.kind
    if kind == "b":
        arr = arr.view(np.uint8)
    elif kind == _BF16_KIND:
        arr = arr.view(np.uint16)
    return arr.reshape(-1)


def check_kernel_arg(arr: Any, index: int) -> None:
    """Refuse what would crash a kernel: non-arrays, non-contiguous or unaligned buffers."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"argument #{index}: expected a numpy array, got {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"argument #{index}: not C-contiguous")
    if arr.size and not is_aligned(arr):
        raise ValueError(f"argument #{index}: data pointer not {ALIGN}-byte aligned (use ensure_aligned)")
