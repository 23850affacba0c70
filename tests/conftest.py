"""Shared test machinery: markers and the `target` fixture that runs a case list on every compiled target.

A target that is registered but not usable here (no GPU, no OpenCL, ...) is an explicit skip with the
target's own reason, never a silent pass."""
from __future__ import annotations

import pytest

from fag_tvm import targets
from fag_tvm.testing import poisoned_outputs


def compiled_target_names() -> list[str]:
    """Every registered target that compiles kernels (the reference is the oracle, not a subject)."""
    return [n for n in targets.names() if targets.get(n).compiled]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: long-running (tuning, subprocess-heavy) tests")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "sim: runs a GPU target's kernels in a CPU simulator (OpenCL/POCL)")


@pytest.fixture(params=compiled_target_names())
def target(request) -> str:
    """The name of a compiled target; skipped (with the target's reason) where it is not usable here."""
    ok, why = targets.get(request.param).availability()
    if not ok:
        pytest.skip(f"target {request.param} not available here: {why}")
    return request.param


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every test runs with NaN-poisoned output buffers (an unwritten element can never pass as a zero)."""
    with poisoned_outputs():
        yield
