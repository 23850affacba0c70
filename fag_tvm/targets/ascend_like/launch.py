"""The ascend-like launcher: the llvm launcher's packing (one ABI for every CPU-run target) plus what this
target adds -- the accumulation mode in iparams (I_DETERMINISTIC: the call's `deterministic=True`, or the
kernel's accumulate knob) and the workspace of its layout (workspace.py: per-core hand-off slots, one
accumulator slot per core in deterministic mode)."""
from __future__ import annotations

import functools
from typing import Any

from ...config import OpConfig
from ...core.abi import kernel_spec, pad16, total_rows
from ..base import KernelProvider
from ..llvm.launch import Launch, launch_for
from . import workspace as W
from .workspace import I_DETERMINISTIC


def deterministic(cfg: OpConfig, knobs: Any) -> bool:
    """Whether a call accumulates in per-core slots: asked for by the call, or chosen by the schedule."""
    return bool(cfg.deterministic) or getattr(knobs, "accumulate", "atomic") == "deterministic"


def workspace_floats(cfg: OpConfig, knobs: Any, cores: int) -> int:
    """fp32 elements of ws for a backward call of `cfg` under `knobs` on a machine with `cores` cube cores."""
    spec = kernel_spec(cfg, "bwd")
    det = deterministic(cfg, knobs)
    lay = W.layout(total_rows(cfg), cfg.B * cfg.N2, cfg.B * cfg.N2 * cfg.Skv, pad16(spec.d), pad16(spec.dv),
                   cores if det else 1, cores, knobs.cv_s1 * knobs.cv_s2)
    return int(lay["total"])


class AscendLaunch(Launch):
    """A Launch whose backward carries the accumulation mode and this target's workspace size."""

    def __init__(self, cfg: OpConfig, direction: str, a: dict[str, Any], kernels: KernelProvider, cores: int) -> None:
        """cores: the machine's cube cores (the kernels were built for this machine: hw_mismatch refuses any
        other)."""
        super().__init__(cfg, direction, a, kernels)
        if direction != "bwd":
            return
        knobs = getattr(self.kernel, "knobs", None)
        det = deterministic(cfg, knobs)
        self.set_iparam(I_DETERMINISTIC, 1 if det else 0)
        self.deterministic = det
        self.workspace_floats = max(1, workspace_floats(cfg, knobs, cores))


def forward_kernels(kernels: KernelProvider) -> KernelProvider:
    """The forward is the llvm target's kernel: under the JIT, the llvm provider itself (one compile serves
    both targets); a package's provider holds its own copy (built by make_funcs under this target's name)."""
    sibling = getattr(kernels, "provider_for", None)  # the JIT's providers reach their siblings
    return sibling("llvm") if sibling is not None else kernels


def launch(cfg: OpConfig, direction: str, a: dict[str, Any], kernels: KernelProvider, cores: int) -> Launch:
    if direction == "fwd":
        return launch_for(cfg, "fwd", a, forward_kernels(kernels))
    return launch_for(cfg, "bwd", a, kernels, functools.partial(AscendLaunch, cores=cores))
