"""target="cuda-sim": the CUDA target's backward kernels (FA2 structure, bwd.py; schedule template
schedules/cuda.py) with the same grid, block and shared-memory schedule, rendered by TVM's OpenCL codegen and
executed on this CPU by POCL (opencl.py): correctness of the GPU kernels without a GPU.

What the simulation cannot see: real tensor cores, warp-level behaviour, most races (POCL runs work-items in
a fixed order), timing. Its forward is the llvm target's kernel (the CUDA forward is not written yet).

Files: bwd.py (kernel factories per phase), tiles.py (shared tiles, SIMT products), cells.py (the tile's softmax
gradient), workspace.py, launch.py (argument packing, the phase sequence), opencl.py (the POCL runner), nvcc.py +
resources.py (CUDA source, nvcc and ptxas's resources for sm_80 / sm_90); architectures in schedules/cuda.ARCHS."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ... import _tvm
from ...core.files import atomic_write_text
from ...core.spec import KernelSpec
from ..base import MAIN, Target

_HERE = Path(__file__).resolve().parent
ARCH_ENV = "FAG_TVM_CUDA_ARCH"
DEFAULT_ARCH = "sm_90"


def _float_constants(funcs: dict[str, Any]) -> list[float]:
    """Every float32 immediate of the PrimFuncs, read from their TVMScript (which prints them exactly);
    opencl.exact_literals restores them in the OpenCL source."""
    out: set[float] = set()
    for f in funcs.values():
        for m in re.finditer(r"T\.float32\(([^()]+)\)", f.script()):
            try:
                out.add(float(m.group(1)))
            except ValueError:
                pass
    return sorted(out)


class SimModule:
    """A compiled cuda-sim library: the OpenCL source of its kernels and the entries it holds."""

    def __init__(self, source: str, entries: list[str]) -> None:
        from .opencl import Program

        self.source, self.entries = source, list(entries)
        self.program = Program(source)

    def __getitem__(self, entry: str) -> Any:
        if entry not in self.entries:
            raise KeyError(entry)
        return self.program


class CudaSimTarget(Target):
    name = "cuda-sim"
    description = ("the CUDA target's kernels (same grid, blocks, shared memory) run on the CPU through TVM's "
                   "OpenCL codegen and POCL: correctness without a GPU, no timing")
    library_suffix = ".cl.json"
    simulated = True
    timing = "none"  # a CPU simulation of GPU kernels: its clock says nothing about the GPU

    # ---- availability and hardware -------------------------------------------------------------
    def availability(self) -> tuple[bool, str]:
        from .opencl import platform_info

        ok, why = platform_info()
        return ok, (f"{self.hw()['arch']} schedule simulated on {why}" if ok else why)

    def hw(self) -> dict:
        arch = os.environ.get(ARCH_ENV) or DEFAULT_ARCH
        if arch not in self.schedule.ARCHS:
            from ...errors import invalid

            raise invalid(ARCH_ENV, f"unknown architecture {arch!r}; expected one of {', '.join(self.schedule.ARCHS)}")
        return {"arch": arch, "runner": "pocl"}

    def hw_tag(self, hw: dict) -> str:
        return f"{hw['arch']}_pocl"

    # ---- sources and schedule ------------------------------------------------------------------
    @property
    def schedule(self) -> Any:
        from ...schedules import cuda

        return cuda

    def source_files(self) -> list[Path]:
        own = [_HERE / f for f in ("bwd.py", "tiles.py", "cells.py", "workspace.py", "opencl.py")]
        return own + [Path(self.schedule.__file__)]

    def default_knobs(self, spec: KernelSpec, hw: dict) -> Any:
        return self.schedule.default_knobs(spec, hw["arch"])

    def prune(self, spec: KernelSpec, knobs: Any, hw: dict, strict_cache: bool = False) -> tuple[bool, str]:
        if spec.direction == "fwd":
            return True, ""
        return self.schedule.prune(spec, knobs, hw["arch"], strict=strict_cache)

    def candidate_space(self, spec: KernelSpec, hw: dict) -> dict[str, list]:
        return self.schedule.candidate_space(spec, hw["arch"])

    def features(self, spec: KernelSpec, workload: dict, knobs: Any, hw: dict) -> list[float]:
        return self.schedule.features(spec, workload, knobs, hw["arch"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.schedule.FEATURE_NAMES)

    def knobs_from_tag(self, tag: str) -> Any:
        return self.schedule.from_tag(tag)

    def knobs_from_dict(self, d: dict) -> Any:
        return self.schedule.from_dict(d)

    # ---- kernels -------------------------------------------------------------------------------
    def param_names(self, spec: KernelSpec, phase: str = MAIN) -> list[str]:
        from ...core.abi import param_names

        return param_names(spec)

    def make_funcs(self, spec: KernelSpec, knobs: Any, hw: dict) -> dict[str, Any]:
        from ...errors import unsupported

        if spec.direction != "bwd":
            raise unsupported("target", "a cuda-sim forward kernel or package (cuda-sim's forward is the llvm target's "
                                        "kernel, run through the JIT)")
        _tvm.import_tvm()
        ok, why = self.prune(spec, knobs, hw)
        if not ok:
            raise ValueError(f"infeasible knobs {knobs} for {spec.key(self.name)}: {why}")
        from .bwd import make_phases

        return make_phases(spec, knobs, "shared", self.entry_name(spec, knobs, hw))

    def compile(self, funcs: dict[str, Any], hw: dict) -> Any:
        tvm = _tvm.import_tvm()
        from .opencl import exact_literals

        ex = tvm.compile(tvm.IRModule(dict(funcs)), target=tvm.target.Target("opencl", host="llvm"))
        entries = sorted({n.rsplit("_", 1)[0] for n in funcs})
        return SimModule(exact_literals(ex.mod.imports[0].inspect_source(), _float_constants(funcs)), entries)

    def export(self, executable: Any, path: str) -> None:
        atomic_write_text(path, json.dumps({"format": "fag_tvm.cuda-sim/1", "entries": executable.entries,
                                            "source": executable.source}))

    def load(self, path: str) -> Any:
        d = json.loads(Path(path).read_text())
        if not isinstance(d, dict) or d.get("format") != "fag_tvm.cuda-sim/1":
            raise ValueError(f"{path}: not a cuda-sim library")
        return SimModule(d["source"], d["entries"])

    def functions(self, module: Any, spec: KernelSpec, knobs: Any, hw: dict) -> dict:
        from .launch import Backward

        name = self.entry_name(spec, knobs, hw)
        return {MAIN: Backward(module[name], name, spec, knobs)}

    # ---- calls ---------------------------------------------------------------------------------
    def forward_arrays(self, cfg, a, kernels):
        from ..llvm.launch import run_arrays

        return run_arrays(self.prepare(cfg, "fwd", a, kernels), a)

    def backward_arrays(self, cfg, a, kernels):
        from ..llvm.launch import run_arrays

        return run_arrays(self.prepare(cfg, "bwd", a, kernels), a)

    def prepare(self, cfg, direction, a, kernels):
        from .launch import launch

        return launch(cfg, direction, a, kernels)

    def workspace_bytes(self, cfg) -> int:
        from .launch import workspace_floats

        return 4 * workspace_floats(cfg)


SIM_TARGET = CudaSimTarget()
