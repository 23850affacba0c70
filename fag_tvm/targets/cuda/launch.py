"""The CUDA targets' launcher: the llvm launcher's packing (one ABI for every target) plus what the CUDA
backward adds -- the dQ mode in iparams (workspace.I_DETERMINISTIC: the call's `deterministic=True` or the
schedule's dq="kernel") and its workspace (Di, poison flags, the fp32 dQ accumulator) -- and the phase
sequence of one backward call: preprocess -> dK/dV -> (deterministic: dQ) -> postprocess."""
from __future__ import annotations

from typing import Any

import numpy as np

from ...config import OpConfig
from ...core.abi import kernel_spec, pad16, param_names, total_rows
from ..base import KernelProvider
from ..llvm.launch import Launch, launch_for
from . import workspace as W
from .bwd import grids
from .workspace import I_DETERMINISTIC

OUTPUTS = ("dq", "dk", "dv", "dpse_acc")


def deterministic(cfg: OpConfig, knobs: Any) -> bool:
    """Whether a call runs the separate dQ kernel (no float atomics): asked for by the call, or the schedule's."""
    return bool(cfg.deterministic) or getattr(knobs, "dq", "atomic") == "kernel"


def workspace_floats(cfg: OpConfig) -> int:
    spec = kernel_spec(cfg, "bwd")
    return int(W.layout(total_rows(cfg), cfg.B * cfg.N2, pad16(spec.d))["total"])


class Backward:
    """The MAIN function of a compiled CUDA backward: called with the ABI arrays in order, it runs the phases
    with their grids (from iparams) on `program` (an opencl.Program for cuda-sim)."""

    def __init__(self, program: Any, entry: str, spec: Any, knobs: Any) -> None:
        self.program, self.entry, self.spec, self.knobs = program, entry, spec, knobs
        self.names = param_names(spec)

    def __call__(self, *arrays: Any) -> None:
        a = {n: np.asarray(x) for n, x in zip(self.names, arrays)}
        ip = a["iparams"]
        grid = grids(self.spec, self.knobs, ip)
        phases = ["pre", "dkdv"] + (["dq"] if ip[I_DETERMINISTIC] else []) + ["post"]
        launches = [(f"{self.entry}_{ph}_kernel", grid[ph], self.knobs.threads,
                     {"grid_x": grid[ph][0], "grid_y": grid[ph][1]}) for ph in phases]
        self.program.run(launches, a, tuple(n for n in OUTPUTS if n in a))


class CudaLaunch(Launch):
    """A Launch whose backward carries the dQ mode and this target's workspace size."""

    def __init__(self, cfg: OpConfig, direction: str, a: dict[str, Any], kernels: KernelProvider) -> None:
        super().__init__(cfg, direction, a, kernels)
        if direction != "bwd":
            return
        det = deterministic(cfg, getattr(self.kernel, "knobs", None))
        self.set_iparam(I_DETERMINISTIC, 1 if det else 0)
        self.deterministic = det
        self.workspace_floats = max(1, workspace_floats(cfg))


def forward_kernels(kernels: KernelProvider) -> KernelProvider:
    """The forward runs the llvm target's kernel (the CUDA forward kernel is not written yet): under the JIT,
    the llvm provider itself."""
    sibling = getattr(kernels, "provider_for", None)
    if sibling is None:
        from ...errors import unsupported  # noqa: PLC0415

        raise unsupported("target", "a cuda-sim forward outside the JIT (its forward is the llvm target's kernel; "
                                    "packages of cuda-sim hold no forward kernel)")
    return sibling("llvm")


def launch(cfg: OpConfig, direction: str, a: dict[str, Any], kernels: KernelProvider) -> Launch:
    if direction == "fwd":
        return launch_for(cfg, "fwd", a, forward_kernels(kernels))
    return launch_for(cfg, "bwd", a, kernels, CudaLaunch)
