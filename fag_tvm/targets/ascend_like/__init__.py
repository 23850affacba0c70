"""target="ascend-like": a simulated 910B-class AI core. Its backward is CANN's FAG structure written as TIR
with the AI core's memory scopes and capacities (bwd.py), lowered through LLVM and run on this CPU as a
functional simulation; its time is the analytic pipeline model's (pipeline_model.py, calibrated in
calibration.py), which the tuner optimises through measure.py's runner and `explore` prints (Target.timing =
"model"). The machine is data (machines.json, machine.py; FAG_TVM_ASCEND_MACHINE picks a variant); the schedule
template is schedules/ascend_like.py; workspace.py lays out the GM workspace, launch.py packs a call.

The forward (FlashAttentionScore, not this project's operator) runs the llvm target's forward kernel: the
backward consumes its stats and output, and nothing of the AI core's structure is claimed for it."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from ... import _tvm
from ...core.abi import param_names
from ...core.spec import KernelSpec
from ..base import MAIN, Target
from ..llvm import CpuLibrary, compile_for_cpu
from ..llvm import hw as cpu

_HERE = Path(__file__).resolve().parent
_LLVM = _HERE.parent / "llvm"
MACHINE_ENV = "FAG_TVM_ASCEND_MACHINE"


@functools.lru_cache(maxsize=None)
def _machine(name: str) -> dict:
    from . import machine

    d = dataclasses.asdict(machine.load(name))
    d.pop("sources")
    return d


class AscendLikeTarget(CpuLibrary, Target):
    name = "ascend-like"
    timing = "model"
    simulated = True
    description = ("simulated 910B-class AI core: CANN-structured TIR with the AI core's buffer scopes, run on "
                   "the CPU (functional); times from the analytic pipeline model")

    # ---- availability and hardware -------------------------------------------------------------
    def availability(self) -> tuple[bool, str]:
        try:
            m = self.hw()
        except Exception as e:  # noqa: BLE001 - a bad machine name or CPU description
            return False, str(e)
        return True, (f"machine {m['machine']['name']} ({m['machine']['aic_cores']} cube cores) simulated on "
                      f"{cpu.cpu_model()} (mcpu={m['host']['mcpu']}); timing: pipeline model")

    def hw(self) -> dict:
        return {"machine": self._machine(), "host": cpu.cpu_target()}

    @staticmethod
    def _machine() -> dict:
        from .machine import DEFAULT_MACHINE

        return _machine(os.environ.get(MACHINE_ENV) or DEFAULT_MACHINE)

    def hw_tag(self, hw: dict) -> str:
        return f"{hw['machine']['name'].lower()}_{cpu.hw_tag(hw['host'])}"

    def hw_mismatch(self, recorded: dict, current: dict) -> list[str]:
        if not isinstance(recorded, dict) or not isinstance(recorded.get("machine"), dict) or \
                not isinstance(recorded.get("host"), dict):
            return [f"no ascend-like hardware description ({recorded!r})"]
        out = []
        if recorded["machine"] != current["machine"]:
            out.append(f"built for machine {recorded['machine'].get('name')}, this is {current['machine']['name']} "
                       f"(or its parameters changed)")
        h0, h1 = recorded["host"], current["host"]
        if h0.get("mcpu") != h1.get("mcpu") or cpu.vector_lanes(h0) != cpu.vector_lanes(h1):
            out.append(f"simulation host mcpu {h0.get('mcpu')} != {h1.get('mcpu')}")
        return out

    def machine(self) -> str:
        return f"{self.hw()['machine']['name']} (pipeline model)"

    def host_check(self, hw: dict) -> list[str]:
        """The simulation runs on the host CPU it was built for: the llvm target's check of hw["host"]."""
        from ..llvm import TARGET as LLVM

        host = hw.get("host") if isinstance(hw, dict) else None
        return [f"simulation host: {p}" for p in LLVM.host_check(host)]

    # ---- sources and schedule ------------------------------------------------------------------
    @property
    def schedule(self) -> Any:
        from ...schedules import ascend_like

        return ascend_like

    def source_files(self) -> list[Path]:
        own = [_HERE / "bwd.py", _HERE / "workspace.py"]
        forward = [_LLVM / f for f in ("fwd.py", "microkernels.py")] + [Path(self._llvm_schedule().__file__)]
        return own + forward + [Path(self.schedule.__file__)]

    @staticmethod
    def _llvm_schedule():
        from ...schedules import llvm

        return llvm

    def default_knobs(self, spec: KernelSpec, hw: dict) -> Any:
        """CANN's own tiling (schedules/ascend_like.cann_default) for a long sequence: one kernel serves every
        length, so the length-dependent small-S fit is left to tuning."""
        return self.schedule.cann_default(spec, 4096, 4096, spec.band, hw["machine"])

    def prune(self, spec: KernelSpec, knobs: Any, hw: dict, strict_cache: bool = False) -> tuple[bool, str]:
        if spec.direction == "fwd":
            return True, ""
        ok, why = self.schedule.prune(spec, knobs, hw["machine"])
        if not ok:
            return ok, why
        from .bwd import capacity_problems

        probs = capacity_problems(spec, knobs, hw["machine"])
        return (False, "; ".join(probs)) if probs else (True, "")

    def candidate_space(self, spec: KernelSpec, hw: dict) -> dict[str, list]:
        return self.schedule.candidate_space(spec, hw["machine"])

    def tuning_values(self, spec: KernelSpec, hw: dict) -> dict[str, list] | None:
        return self.schedule.tuning_values(spec, hw["machine"], self.default_knobs(spec, hw))

    def tvm_target(self, hw: dict) -> dict:
        return hw["host"]

    def features(self, spec: KernelSpec, workload: dict, knobs: Any, hw: dict) -> list[float]:
        return self.schedule.features(spec, workload, knobs, hw["machine"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.schedule.FEATURE_NAMES)

    def knobs_from_tag(self, tag: str) -> Any:
        return self.schedule.from_tag(tag)

    def knobs_from_dict(self, d: dict) -> Any:
        return self.schedule.from_dict(d)

    # ---- kernels -------------------------------------------------------------------------------
    def param_names(self, spec: KernelSpec, phase: str = MAIN) -> list[str]:
        return param_names(spec)

    def make_funcs(self, spec: KernelSpec, knobs: Any, hw: dict) -> dict[str, Any]:
        """The PrimFuncs of `spec`; infeasible knobs (a buffer over its scope's capacity, a fractal or alignment
        rule broken) are refused here, before anything is built."""
        _tvm.import_tvm()
        ok, why = self.prune(spec, knobs, hw)
        if not ok:
            raise ValueError(f"infeasible knobs {knobs} for {spec.key(self.name)}: {why}")
        name = self.entry_name(spec, knobs, hw)
        if spec.direction == "bwd":
            from .bwd import make_bwd

            return {name: make_bwd(spec, knobs, hw["machine"], name=name)}
        from ..llvm.fwd import make_fwd

        llvm_knobs = self._llvm_schedule().default_knobs(spec, vec=cpu.vector_lanes(hw["host"]), l2=cpu.l2_bytes())
        return {name: make_fwd(spec, llvm_knobs, name=name)}

    def compile(self, funcs: dict[str, Any], hw: dict) -> Any:
        return compile_for_cpu(funcs, hw["host"])

    # ---- calls ---------------------------------------------------------------------------------
    def forward_arrays(self, cfg, a, kernels):
        from ..llvm.launch import run_arrays

        return run_arrays(self.prepare(cfg, "fwd", a, kernels), a)

    def backward_arrays(self, cfg, a, kernels):
        from ..llvm.launch import run_arrays

        return run_arrays(self.prepare(cfg, "bwd", a, kernels), a)

    def prepare(self, cfg, direction, a, kernels):
        from .launch import launch

        return launch(cfg, direction, a, kernels, int(self._machine()["aic_cores"]))

    def predict(self, spec: KernelSpec, workload: dict, knobs: Any, hw: dict) -> dict | None:
        """The pipeline model's time of the backward under `knobs` on the workload's shape (None: forward)."""
        if spec.direction != "bwd":
            return None
        from .machine import Machine
        from .pipeline_model import predict
        from .pipeline_model import model_inputs

        shape, _, _ = model_inputs(workload)
        m = Machine(**hw["machine"])
        p = predict(shape, self.schedule.to_tiling(knobs), m)
        return {"time_s": p.total_s, "tflops": p.tflops, "utilisation": p.utilisation,
                "peak_tflops": m.peak_flops / 1e12, "memory_gbytes_per_s": m.hbm_bytes_per_s / 1e9,
                "binding": p.main_binding, "items": p.items,
                "stages": {st: {"binding": getattr(p, st).binding, "cycles": getattr(p, st).cycles,
                                "pipes": dict(getattr(p, st).pipes)} for st in ("cube1", "vector", "cube2")}}

    # ---- tuning ----------------------------------------------------------------------------------
    def report_section(self, entries: list[dict], out_dir: str) -> dict | None:
        """Per tuned shape: CANN's default next to the tuned tiling, per-stage cycles and binding pipes,
        utilisation vs the cube peak (targets/ascend_like/model_report.py), HTML + PNG."""
        from .machine import Machine
        from .model_report import tuned_results, write_results

        if not entries:
            return None
        m = Machine(**self._machine())
        summary = write_results(out_dir, tuned_results(entries, m), m, "tuned")
        return dict(summary, index="index.html")

    def make_runner(self, task: dict, options: dict) -> Any:
        """The pipeline model as meta-schedule's runner (measure.py)."""
        from .measure import make_model_runner

        return make_model_runner(task, self)

    def workspace_bytes(self, cfg) -> int:
        """The backward's scratch under the default schedule (a tuned schedule's CV block may differ)."""
        from ...core.abi import kernel_spec
        from .launch import workspace_floats

        hw = self.hw()
        return 4 * workspace_floats(cfg, self.default_knobs(kernel_spec(cfg, "bwd"), hw), hw["machine"]["aic_cores"])


TARGET = AscendLikeTarget()
