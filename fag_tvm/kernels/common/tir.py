"""TVM handles and constants of the kernel generators (TVM imported through fag_tvm._tvm)."""
from __future__ import annotations

from types import SimpleNamespace

from ..._tvm import tirx_script

tirx, T = tirx_script()

FLT_MAX = 3.4028234663852886e38  # exactly float32 max (0x7F7FFFFF)


def ns(**kw) -> SimpleNamespace:
    """A plain Python record passed as a macro argument (TVMScript cannot assign Python objects, but
    evaluates them inline as call arguments)."""
    return SimpleNamespace(**kw)


def f32(x: float):
    return tirx.const(x, "float32")


def neg_flt_max():
    return tirx.const(-FLT_MAX, "float32")


def pos_flt_max():
    return tirx.const(FLT_MAX, "float32")
