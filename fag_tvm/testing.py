"""Accuracy metrics of SPEC A10, shared by tests, the quickstart and benchmarks."""
from __future__ import annotations

import numpy as np

TOLERANCE = {"fp32": 2e-5, "float32": 2e-5, "fp16": 5e-3, "float16": 5e-3, "bf16": 3e-2, "bfloat16": 3e-2}


def tolerance(dtype: str) -> float:
    """Relative-L2 tolerance of SPEC A10 for a dtype name."""
    return TOLERANCE[dtype]


def rel_err(out, ref) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ in float64 (0 when both are exactly zero)."""
    a = np.asarray(out).astype(np.float64).ravel()
    b = np.asarray(ref).astype(np.float64).ravel()
    if not np.all(np.isfinite(a)):
        return float("inf")
    nb = np.linalg.norm(b)
    d = np.linalg.norm(a - b)
    return float(d / nb) if nb > 0 else float(d)


def cann_element_pass_ratio(out, ref) -> float:
    """Fraction of elements with |a−b| ≤ max(0.005·max(|a|,|b|), 2.5e-5) (CANN's element rule)."""
    a = np.asarray(out).astype(np.float64).ravel()
    b = np.asarray(ref).astype(np.float64).ravel()
    if a.size == 0:
        return 1.0
    ok = np.abs(a - b) <= np.maximum(0.005 * np.maximum(np.abs(a), np.abs(b)), 2.5e-5)
    return float(ok.mean())
