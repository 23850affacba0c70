"""Array interchange (SPEC A9): NumPy in → NumPy out, DLPack tensors (torch …) in → same kind out."""
from __future__ import annotations

import functools
from typing import Any, Callable

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", BF16: "bfloat16"}
NAME_TO_DTYPE = {v: k for k, v in DTYPE_NAMES.items()}
SHORT_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
MASKED_ARRAY_RULE = "masked arrays (numpy.ma) are not supported; pass .filled(...) or .data"


def _is_torch(x: Any) -> bool:
    return str(getattr(type(x), "__module__", "") or "").startswith("torch")


def torch_to_numpy(t: Any, param: str) -> np.ndarray:
    """A CPU tensor's data as NumPy, zero-copy (bf16 through its int16 bits; non-contiguous tensors as strided
    views). The one tensor -> array conversion (the API and the torch op)."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        from .errors import invalid

        raise invalid(param, f"tensor on device {t.device}; only CPU tensors are accepted by this target")
    bf16, i16 = _torch_dtypes()
    if t.dtype == bf16:
        return t.contiguous().view(i16).numpy().view(BF16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray) -> Any:
    """A NumPy result as a CPU tensor, zero-copy when contiguous (bf16, a void-kind NumPy dtype, through its
    int16 bits). The one array -> tensor conversion."""
    import torch  # noqa: PLC0415 - only reached with torch tensors in hand

    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    if a.dtype.kind == "V":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@functools.lru_cache(maxsize=None)
def _torch_dtypes() -> tuple[Any, Any]:
    import torch  # noqa: PLC0415 - torch stays optional: imported once the first tensor arrives

    return torch.bfloat16, torch.int16


_TORCH_TENSOR_TYPES: set[type] = set()  # types seen to be torch tensors (the per-call check is one lookup)


def to_numpy(x: Any, param: str) -> np.ndarray | None:
    """Return a NumPy view/copy of `x` (None stays None). Raises FagError for unknown objects.

    Masked arrays are refused: the kernels would read the raw data while NumPy semantics would honour the
    mask, so no target could give the answer the caller means."""
    if x is None or type(x) is np.ndarray:  # the common case first (a plain ndarray is never masked)
        return x
    if type(x) in _TORCH_TENSOR_TYPES:
        return torch_to_numpy(x, param)
    from .errors import invalid

    if isinstance(x, np.ma.MaskedArray):
        raise invalid(param, MASKED_ARRAY_RULE)
    if isinstance(x, np.ndarray):
        return x
    if _is_torch(x):
        _TORCH_TENSOR_TYPES.add(type(x))
        return torch_to_numpy(x, param)
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is a user input problem
            raise invalid(param, f"cannot import through DLPack: {exc}") from None
    if isinstance(x, (list, tuple)) and param in ("prefix", "actual_seq_qlen", "actual_seq_kvlen"):
        return np.asarray(x)
    raise invalid(param, f"expected a NumPy array or a DLPack tensor, got {type(x).__name__}")


def output_converter(like: Any) -> Callable[[np.ndarray | None], Any]:
    """A function turning a NumPy result into the same kind of array as `like` (the query)."""
    if _is_torch(like):
        return lambda a: None if a is None else numpy_to_torch(a)
    return lambda a: a
