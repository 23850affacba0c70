"""Softmax pieces: a vectorizable exp, and the row statistics of the backward (SPEC §3, A5)."""
from __future__ import annotations

from .tir import FLT_MAX, T, f32


EXP_MAX = 2.3982e38  # fexp's largest value (exp of its upper clamp 88.376)
RR_MAX = 1.4189  # 1/softmax_sum is bounded by FLT_MAX / EXP_MAX so P = exp(S - max) / sum stays finite; any
# sum a forward produces is >= 1 (its max element contributes exp(0)), so only inconsistent stats are affected


def fexp(x):
    """exp(x) in fp32 as a vectorizable polynomial (Cephes expf: ~1 ulp), exactly 0 for x < -87.34
    (including -inf), so masked scores give P == 0 exactly. TVM lowers T.exp to scalar expf calls."""
    lo, hi = -87.3365478515625, 88.3762626647949
    xc = T.max(T.min(x, f32(hi)), f32(lo))
    n = T.floor(xc * f32(1.44269504088896341) + f32(0.5))
    r = xc - n * f32(0.693359375) + n * f32(2.12194440e-4)
    p = f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f32(c)
    p = p * r * r + r + f32(1.0)
    e = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return T.Select(x < f32(lo), f32(0.0), p * e)


def invalid_row(smax, ssum):
    """A row whose supplied stats are the invalid-line sentinels (-FLT_MAX, +FLT_MAX): P is exactly 0."""
    return T.And(smax == T.float32(-FLT_MAX), ssum == T.float32(FLT_MAX))


def row_max_for_p(smax, ssum):
    """The max to subtract when rebuilding P (FLT_MAX for invalid rows, so every exp underflows)."""
    return T.Select(invalid_row(smax, ssum), T.float32(FLT_MAX), smax)


def row_rsum_for_p(smax, ssum):
    """1 / sum when rebuilding P (0 for invalid rows: their P is exactly 0)."""
    return T.Select(invalid_row(smax, ssum), T.float32(0), T.float32(1) / ssum)
