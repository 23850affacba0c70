"""The cost model: meta-schedule's XGBModel on the target's analytic features (knob vector + features
of the workload: tiles under the mask, padding, register blocks, cache budget, parallel balance ...).
Points already measured score 0 so the evolutionary search does not re-measure them (a resumed run
starts informed: `pretrain` feeds it the workload's earlier records)."""
from __future__ import annotations

import functools

import numpy as np

from .. import _tvm
from ..targets.base import Target
from .space import knobs_of_mod, trace_for_knobs
from .task import spec_of, task_of_mod


@functools.lru_cache(maxsize=None)
def ms_classes() -> dict[str, type]:
    _tvm.import_tvm()
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class KnobFeatures(ms.feature_extractor.PyFeatureExtractor):
        """One feature row per candidate: the target's features of the annotated knobs."""

        def __init__(self, target_name: str):
            super().__init__()
            self.target_name = target_name

        def extract_from(self, context, candidates):
            from .. import targets

            t = targets.get(self.target_name)
            out = []
            task = None
            for c in candidates:
                mod = c.sch.mod
                task = task or task_of_mod(mod)
                k = knobs_of_mod(t, mod)
                row = t.features(spec_of(task), task["workload"], k, task["hw"]) if (task and k) else \
                    [0.0] * len(t.feature_names)
                out.append(tvm.runtime.tensor(np.array([row], dtype="float32")))
            return out

    @derived_object
    class DedupXGB(ms.cost_model.PyCostModel):
        """XGBModel; points already in the database (this run or an earlier one) score 0."""

        def __init__(self, target_name: str, xgb, measured: set):
            super().__init__()
            self.target_name, self.xgb, self.measured = target_name, xgb, measured

        def load(self, path):
            self.xgb.load(path)

        def save(self, path):
            self.xgb.save(path)

        def _knobs(self, c):
            from .. import targets

            return knobs_of_mod(targets.get(self.target_name), c.sch.mod)

        def update(self, context, candidates, results):
            self.xgb.update(context, candidates, results)
            for c in candidates:
                k = self._knobs(c)
                if k is not None:
                    self.measured.add(k)

        def predict(self, context, candidates):
            s = np.asarray(self.xgb.predict(context, candidates), dtype="float64")
            for i, c in enumerate(candidates):
                if self._knobs(c) in self.measured:
                    s[i] = 0.0
            return s

    return {"KnobFeatures": KnobFeatures, "DedupXGB": DedupXGB}


def xgb_model(target: Target, num_warmup_samples: int = 8, seed: int = 0):
    """meta-schedule's XGBoost cost model with the target's feature extractor."""
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    return XGBModel(extractor=ms_classes()["KnobFeatures"](target.name), num_warmup_samples=num_warmup_samples,
                    num_tuning_cores=_tvm.num_threads(), early_stopping_rounds=50, verbose_eval=0)


def dedup_model(target: Target, xgb, measured: set):
    return ms_classes()["DedupXGB"](target.name, xgb, measured)


def pretrain(target: Target, xgb, task: dict, stub, tgt, records: list[dict]) -> None:
    """Feed a workload's existing successful records to the XGBoost model (resumed runs)."""
    from tvm.s_tir.meta_schedule import TuneContext
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import RunnerResult
    from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate
    from tvm.s_tir.schedule import Schedule

    from .ms_env import no_tensor_intrin

    recs = [r for r in records if r["ok"]]
    if len(recs) < 2:
        return
    ai = ArgInfo.from_prim_func(stub["main"])
    cands, res = [], []
    for r in recs:
        tr = trace_for_knobs(target, task, stub, r["knobs"])
        if tr is None:
            continue
        sch = Schedule(stub)
        tr.apply_to_schedule(sch, remove_postproc=False)
        cands.append(MeasureCandidate(sch, ai))
        res.append(RunnerResult(r["run_secs"], None))
    with no_tensor_intrin():
        ctx = TuneContext(mod=stub, target=tgt, task_name="main")
    xgb.update(ctx, cands, res)
