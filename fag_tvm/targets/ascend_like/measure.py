"""The ascend-like tuning runner: meta-schedule's Runner interface returning the pipeline model's time of each
built candidate (the candidate is a real kernel: the builder ran make_funcs, whose capacity checks it passed;
its CPU run time would mean nothing). The same search + XGBoost loop as on the llvm target then learns the
model."""
from __future__ import annotations

import os
from typing import Any


def make_model_runner(task: dict, target: Any):
    """A PyRunner whose result for a candidate is [predicted seconds] (its knobs read from the artifact's name,
    which the builder writes as tune.records.knobs_tag)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    from ...core.spec import KernelSpec
    from ...tune.records import knobs_from_tag

    spec = KernelSpec(**task["spec"])

    @derived_object
    class ModelRunner(ms.runner.PyRunner):
        def __init__(self):
            super().__init__()

        def run(self, runner_inputs):
            out = []
            for inp in runner_inputs:
                tag = os.path.splitext(os.path.basename(str(inp.artifact_path)))[0]
                try:
                    knobs = knobs_from_tag(target, tag)
                    if knobs is None:
                        raise ValueError(f"artifact {tag!r} carries no knob tag")
                    p = target.predict(spec, task["workload"], knobs, task["hw"])
                    out.append(LocalRunnerFuture(res=[float(p["time_s"])], error_message=None))
                except Exception as e:  # noqa: BLE001 - a result per candidate, never a crashed run
                    out.append(LocalRunnerFuture(res=None, error_message=f"model: {type(e).__name__}: {e}"))
            return out

    return ModelRunner()
