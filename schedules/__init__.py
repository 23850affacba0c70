"""Per-target schedule templates: the knobs (tile sizes, micro-kernel shape, ...) of the kernels in
fag_tvm/kernels, their default heuristics, analytic pruning and the tuner's candidate space."""
from . import llvm  # noqa: F401

__all__ = ["llvm"]
