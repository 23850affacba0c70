"""Finite in, finite out; non-finite in, NaN out (SPEC A10 + our decision, README "Decisions").

* Poison: a task whose inputs hold a NaN or ±Inf writes NaN to every output element it owns (see
  fag_tvm.targets.reference.poisoned_tasks for the exact input set). Kernels count non-finite inputs
  with `nonfinite` while scanning them, then either run normally or write NaN.
* Saturation: with finite inputs, scores that overflow fp32 are clamped to ±FLT_MAX (`sat`, NaN ->
  -FLT_MAX: the sign of an inf - inf overflow is undefined; such a score counts as masked), 1/sum is bounded
  so P stays finite, and every output is clamped to its dtype's finite range with an undefined overflow
  giving 0 (`sat_out`): an overflow inside a product may produce inf/NaN in a tile, never in an output, so
  no finite input ever produces NaN or Inf. (Clamping every intermediate instead cost 5-10% at D=64.)

TVM's simplifier folds x*0 and x != x, so non-finiteness is tested with |x| <= FLT_MAX and isnan."""
from __future__ import annotations

from .tir import FLT_MAX, T

DTYPE_MAX = {"float32": FLT_MAX, "float16": 65504.0, "bfloat16": 3.3895313892515355e38}


def nonfinite(x):
    """1.0 if x is NaN or ±Inf, else 0.0 (fp32; sums of these count non-finite inputs)."""
    return T.Select(T.abs(x) <= T.float32(FLT_MAX), T.float32(0), T.float32(1))


def sat(x, bound: float = FLT_MAX):
    """x clamped to [-bound, bound]; NaN (an overflow of undefined sign) -> -bound."""
    return T.min(T.max(x, T.float32(-bound)), T.float32(bound))


def sat_keep_nan(x, bound: float = FLT_MAX):
    """x clamped to [-bound, bound], NaN kept (accumulators that may hold poison)."""
    return T.Select(x > T.float32(bound), T.float32(bound), T.Select(x < T.float32(-bound), T.float32(-bound), x))


def sat_out(x, dtype: str):
    """An output value clamped to the finite range of `dtype`; an overflow of undefined sign (NaN) -> 0."""
    return T.Select(T.isnan(x), T.float32(0), sat(x, DTYPE_MAX[dtype]))


def nan32():
    return T.float32(float("nan"))
