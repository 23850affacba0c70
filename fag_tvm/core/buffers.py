"""64-byte aligned, C-contiguous NumPy buffers: what every compiled kernel assumes (TVM_NOTES: an
unaligned pointer segfaults in the kernels' aligned vector loads). NumPy only."""
from __future__ import annotations

from typing import Any

import numpy as np

ALIGN = 64
_POISON = {"on": False}  # tests: fill fresh float buffers with NaN so an unwritten element cannot pass


def set_poison(on: bool) -> bool:
    """Fill every buffer `aligned_empty` returns with NaN (float dtypes) from now on; returns the previous
    setting. For tests (fag_tvm.testing.poisoned_outputs): outputs a kernel forgets to write then show up
    as NaN instead of as the zeros fresh memory usually holds."""
    old = _POISON["on"]
    _POISON["on"] = bool(on)
    return old


def is_aligned(a: np.ndarray) -> bool:
    return a.ctypes.data % ALIGN == 0


def aligned_empty(shape: Any, dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is 64-byte aligned."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = max(1, n) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, dtype=np.uint8)
    off = (-buf.ctypes.data) % ALIGN
    out = buf[off:off + n * dtype.itemsize].view(dtype).reshape(shape)
    if _POISON["on"] and (dtype.kind == "f" or dtype.name == "bfloat16"):
        out[...] = np.nan
    return out


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
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    elif arr.dtype.kind == "V" or arr.dtype.name == "bfloat16":
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
