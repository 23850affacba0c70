"""target="llvm": TVM-compiled CPU kernels (AVX-512 or AVX2 chosen from the CPU's flags, never
mcpu=native), one fused forward and one fused backward kernel per specialisation.

Files: hw.py (CPU description), fwd.py / bwd.py (kernel generators), microkernels.py (register-blocked
micro-kernels, packing), workspace.py (ws layout), launch.py (argument packing), measure.py (tuning
measurements); the schedule template is schedules/llvm.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ... import _tvm
from ...core.abi import param_names
from ...core.spec import KernelSpec
from ..base import MAIN, Target
from . import hw as cpu

_HERE = Path(__file__).resolve().parent


def compile_for_cpu(funcs: dict[str, Any], cpu_target: dict) -> Any:
    """One executable of `funcs` for an explicit LLVM CPU target (never mcpu=native)."""
    tvm = _tvm.import_tvm()
    return tvm.compile(tvm.IRModule(dict(funcs)), target=tvm.target.Target(dict(cpu_target)))


class CpuLibrary:
    """Export and load of CPU shared libraries, with the TVM runtime library shipped in packages (every
    target whose kernels run on the host CPU)."""

    def export(self, executable: Any, path: str) -> None:
        executable.export_library(path)

    def load(self, path: str) -> Any:
        return _tvm.load_module(path)

    def runtime_files(self) -> dict[str, str]:
        return {"libtvm_runtime.so": _tvm.runtime_library_path()}

    def load_runtime(self, files: dict[str, str]) -> None:
        _tvm.load_runtime(files.get("libtvm_runtime.so"))


class LLVMTarget(CpuLibrary, Target):
    name = "llvm"
    description = "CPU kernels compiled by TVM's LLVM backend (explicit CPU model, AVX-512 or AVX2)"

    # ---- availability and hardware -------------------------------------------------------------
    def availability(self) -> tuple[bool, str]:
        try:
            t = cpu.cpu_target()
        except Exception as e:  # noqa: BLE001 - e.g. a bad FAG_TVM_MCPU
            return False, str(e)
        return True, (f"{cpu.cpu_model()}: mcpu={t['mcpu']}, {cpu.vector_lanes(t) * 32}-bit vectors, "
                      f"{_tvm.num_threads()} threads")

    def hw(self) -> dict:
        return cpu.cpu_target()

    def hw_tag(self, hw: dict) -> str:
        return cpu.hw_tag(hw)

    def hw_mismatch(self, recorded: dict, current: dict) -> list[str]:
        if not isinstance(recorded, dict):
            return [f"no hardware description ({recorded!r})"]
        if recorded.get("mcpu") != current.get("mcpu") or \
                cpu.vector_lanes(recorded) != cpu.vector_lanes(current):
            return [f"target mcpu {recorded.get('mcpu')} != {current.get('mcpu')}"]
        return []

    def machine(self) -> str:
        return cpu.cpu_model()

    def host_check(self, hw: dict) -> list[str]:
        if not isinstance(hw, dict) or hw.get("mcpu") not in cpu.KNOWN_MCPUS:
            return [f"unknown CPU model in {hw!r}"]
        missing = [f for f in cpu.required_flags(hw) if f not in cpu.cpu_flags()]
        return [f"built for mcpu={hw['mcpu']}; this CPU lacks {missing}"] if missing else []

    # ---- sources and schedule ------------------------------------------------------------------
    @property
    def schedule(self) -> Any:
        from ...schedules import llvm  # installed from the top-level schedules/ folder

        return llvm

    def source_files(self) -> list[Path]:
        own = [_HERE / f for f in ("fwd.py", "bwd.py", "microkernels.py", "workspace.py")]
        return own + [Path(self.schedule.__file__)]

    def default_knobs(self, spec: KernelSpec, hw: dict) -> Any:
        return self.schedule.default_knobs(spec, vec=cpu.vector_lanes(hw), l2=cpu.l2_bytes())

    def prune(self, spec: KernelSpec, knobs: Any, hw: dict, strict_cache: bool = False) -> tuple[bool, str]:
        """Feasibility of `knobs` for `spec` on `hw` (the L2 budget only with strict_cache: it is a
        heuristic, not a correctness rule)."""
        if knobs.vec != cpu.vector_lanes(hw):
            return False, f"vec={knobs.vec} != {cpu.vector_lanes(hw)} lanes of mcpu={hw.get('mcpu')}"
        sch = self.schedule
        return sch.prune(spec, knobs, cpu.l2_bytes() if strict_cache else sch.UNBOUNDED_L2)

    def candidate_space(self, spec: KernelSpec, hw: dict) -> dict[str, list[int]]:
        return self.schedule.candidate_space(spec, cpu.vector_lanes(hw))

    def features(self, spec: KernelSpec, workload: dict, knobs: Any, hw: dict) -> list[float]:
        return self.schedule.features(spec, workload, knobs, threads=hw.get("num-cores", 1), l2=cpu.l2_bytes())

    @property
    def feature_names(self) -> list[str]:
        return list(self.schedule.FEATURE_NAMES)

    # ---- kernels -------------------------------------------------------------------------------
    def param_names(self, spec: KernelSpec, phase: str = MAIN) -> list[str]:
        return param_names(spec)

    def knobs_from_tag(self, tag: str) -> Any:
        return self.schedule.from_tag(tag)

    def make_funcs(self, spec: KernelSpec, knobs: Any, hw: dict) -> dict[str, Any]:
        _tvm.import_tvm()
        ok, why = self.prune(spec, knobs, hw)
        if not ok:
            raise ValueError(f"infeasible knobs {knobs} for {spec.key(self.name)}: {why}")
        name = self.entry_name(spec, knobs, hw)
        if spec.direction == "bwd":
            from .bwd import make_bwd

            return {name: make_bwd(spec, knobs, name=name)}
        from .fwd import make_fwd

        return {name: make_fwd(spec, knobs, name=name)}

    def compile(self, funcs: dict[str, Any], hw: dict) -> Any:
        return compile_for_cpu(funcs, hw)

    # ---- calls ---------------------------------------------------------------------------------
    def forward_arrays(self, cfg, a, kernels):
        from .launch import forward_arrays

        return forward_arrays(cfg, a, kernels)

    def backward_arrays(self, cfg, a, kernels):
        from .launch import backward_arrays

        return backward_arrays(cfg, a, kernels)

    def prepare(self, cfg, direction, a, kernels):
        from .launch import launch_for

        return launch_for(cfg, direction, a, kernels)

    def workspace_bytes(self, cfg) -> int:
        from .launch import workspace_bytes

        return workspace_bytes(cfg)

    # ---- tuning ----------------------------------------------------------------------------------
    def measurement_args(self, task: dict, seed: int = 0):
        from .measure import kernel_args

        return kernel_args(task, seed)

    def make_runner(self, task: dict, options: dict) -> Any:
        from .measure import make_runner

        return make_runner(task, options)


TARGET = LLVMTarget()
