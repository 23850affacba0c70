"""fp32 <-> storage conversions of a kernel dtype: fp16 through casts, bf16 as raw uint16 bits with
round-to-nearest-even (NumPy bf16 arrays pass zero-copy; DLPack cannot export ml_dtypes bf16)."""
from __future__ import annotations

from .finite import sat_out
from .tir import T, tirx


class DType:
    """Expression builders for one kernel dtype (pass simple expressions, e.g. buffer loads)."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.storage = "uint16" if dtype == "bfloat16" else dtype
        self.lowp = dtype != "float32"

    def ld(self, buf, idx):
        """buf[idx] widened to fp32."""
        return self.widen(buf[idx])

    def widen(self, x):
        if self.dtype == "float32":
            return x
        if self.dtype == "float16":
            return T.Cast("float32", x)
        return T.reinterpret("float32", T.shift_left(T.Cast("uint32", x), tirx.const(16, "uint32")))

    def _rne_bits(self, x):
        u = T.reinterpret("uint32", x)
        return u + tirx.const(0x7FFF, "uint32") + T.bitwise_and(
            T.shift_right(u, tirx.const(16, "uint32")), tirx.const(1, "uint32"))

    def st(self, x):
        """fp32 -> storage type (round to nearest even)."""
        if self.dtype == "float32":
            return x
        if self.dtype == "float16":
            return T.Cast("float16", x)
        return T.Cast("uint16", T.shift_right(self._rne_bits(x), tirx.const(16, "uint32")))

    def st_sat(self, x):
        """An output value: saturated to the dtype's finite range (overflow of undefined sign -> 0), stored."""
        return self.st(sat_out(x, self.dtype))

    def rnd(self, x):
        """fp32 value rounded to the kernel dtype and widened back (identity for fp32)."""
        if self.dtype == "float32":
            return x
        if self.dtype == "float16":
            return T.Cast("float32", T.Cast("float16", x))
        return T.reinterpret("float32", T.bitwise_and(self._rne_bits(x), tirx.const(0xFFFF0000, "uint32")))
