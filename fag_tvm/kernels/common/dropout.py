"""Dropout from CANN's bit-packed mask (SPEC §6): bit e = DROP0 + (n*Sq_b + i)*Skv_b + j, LSB-first."""
from __future__ import annotations

from .tir import T, f32


def drop_keep_factor(c, gi, gj):
    """1/keep_prob if the dropout bit of (b, n, gi, gj) is set, else 0 (fp32)."""
    e = c.drop_head + gi * c.skv + gj
    byte = T.Cast("int32", c.drop[T.shift_right(e, T.int64(3))])
    bit = T.bitwise_and(T.shift_right(byte, T.Cast("int32", T.bitwise_and(e, T.int64(7)))), 1)
    return T.Select(bit != 0, c.rkeep, f32(0.0))
