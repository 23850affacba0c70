"""Exhaustive search of the ascend-like schedule space under the pipeline model: for a workload, every
feasible knob setting (schedules/ascend_like.prune) priced by the model, against CANN's own default for the
shape. The model is cheap (no build, no run), so the whole space fits in seconds; this is what the
meta-schedule runner will return per candidate once the target is registered, and what a performance
engineer reads to see which pipe binds where."""
from __future__ import annotations

import dataclasses
from typing import Any

from ...schedules import ascend_like as sched
from .machine import Machine, load
from .pipeline_model import Prediction, model_inputs, predict

# what the search varies by default: the knobs the model prices (base tiles and sub-tiles only have to fit)
SEARCH_FIXED = dict(base_m=128, base_n=128, base_k=64, vec_rows=32, vec_cols=256, db_l1=2, db_l0=2, db_ub=2,
                    db_l0c=2, accumulate="atomic")


@dataclasses.dataclass(frozen=True)
class SearchResult:
    default: sched.Knobs
    default_prediction: Prediction
    best: sched.Knobs
    best_prediction: Prediction
    points: int  # feasible points priced

    @property
    def speedup(self) -> float:
        return self.default_prediction.total_s / self.best_prediction.total_s


def search(w: dict[str, Any], machine: Machine | None = None, fixed: dict | None = None) -> SearchResult:
    """The model-best feasible knobs for workload `w` (with `fixed` knobs held; SEARCH_FIXED by default) next
    to CANN's default for the shape."""
    m = machine or load()
    shape, spec, sparse = model_inputs(w)
    default = sched.cann_default(spec, shape.s1, shape.s2, sparse, m)
    dpred = predict(shape, sched.to_tiling(default), m)
    pts = sched.feasible_points(spec, m, fixed=SEARCH_FIXED if fixed is None else fixed)
    best, bpred = default, dpred
    for k in pts:
        p = predict(shape, sched.to_tiling(k), m)
        if p.total_s < bpred.total_s:
            best, bpred = k, p
    return SearchResult(default, dpred, best, bpred, len(pts))
