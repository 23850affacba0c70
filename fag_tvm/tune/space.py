"""The search space of one tuning task, generic over the target's knob dataclass.

The space function samples every knob of the target's `candidate_space` with `sample_categorical`
(factors >= 2 or categorical values only: TVM_NOTES §2) and annotates the decisions on the stub's block;
nothing names a particular knob. A postproc rejects what the target's analytic `prune` calls infeasible
before anything is built; a mutator moves one knob to a neighbouring value (evolutionary search)."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import random
from typing import Any

from ..core.memo import BoundedMemo
from ..targets.base import Target
from .codes import decode, encode
from .task import ANN, BLOCK, spec_of, task_of_mod


def knob_fields(target: Target) -> list[str]:
    return [f.name for f in dataclasses.fields(target.schedule.Knobs)]


_SPACES = BoundedMemo(64)


def space_values(target: Target, task: dict) -> dict[str, list[int]]:
    """Per-knob values (encoded) of the candidate space that occur in at least one feasible point, or the
    target's own tuning_values where enumerating the space is too slow. Memoized per (target, task): the driver
    asks again for every point it commits, and the enumeration prunes every point of the space."""
    key = (target.name, id(target), json.dumps(task, sort_keys=True))
    values = _SPACES.get(key)
    if values is None:
        values = _SPACES.put(key, _space_values(target, task))
    return {n: list(v) for n, v in values.items()}


def _space_values(target: Target, task: dict) -> dict[str, list[int]]:
    spec, hw = spec_of(task), task["hw"]
    own = target.tuning_values(spec, hw)
    if own is not None:
        return {n: [encode(target, task, n, v) for v in vals] for n, vals in own.items()}
    sp = target.candidate_space(spec, hw)
    names = knob_fields(target)
    cls = target.schedule.Knobs
    feas = [k for k in (cls(**dict(zip(names, vals))) for vals in itertools.product(*(sp[n] for n in names)))
            if target.prune(spec, k, hw, strict_cache=True)[0]]
    if not feas:
        raise ValueError(f"{spec.key(target.name)}: no feasible knob setting in the candidate space")
    return {n: [encode(target, task, n, v) for v in sp[n] if any(getattr(c, n) == v for c in feas)] for n in names}


def make_space_fn(values: dict[str, list[int]]):
    """The ScheduleFn body: sample (or fix) every knob and annotate it on the stub block."""

    def space(sch) -> None:
        blk = sch.get_sblock(BLOCK)
        for name, vals in values.items():
            if len(vals) == 1:
                sch.annotate(blk, ANN + name, int(vals[0]))
            else:
                rv = sch.sample_categorical([int(v) for v in vals], [1.0 / len(vals)] * len(vals))
                sch.annotate(blk, ANN + name, rv)

    return space


def knobs_of_mod(target: Target, mod) -> Any:
    """The knobs annotated on a scheduled stub (None if it carries none)."""
    from tvm.s_tir.schedule import Schedule

    sch = Schedule(mod)
    ann = sch.get(sch.get_sblock(BLOCK)).annotations
    vals = {}
    for k in knob_fields(target):
        if ANN + k not in ann:
            return None
        vals[k] = decode(target, task_of_mod(mod) or {}, k, int(ann[ANN + k]))
    return target.schedule.Knobs(**vals)


def trace_for_knobs(target: Target, task: dict, stub, knobs) -> Any:
    """A trace of the design space whose decisions select `knobs` (None if outside the space)."""
    from tvm.s_tir.schedule import Schedule, Trace

    values = space_values(target, task)
    sch = Schedule(stub)
    make_space_fn(values)(sch)
    tr = sch.trace
    dec = {}
    it = iter([k for k, v in values.items() if len(v) > 1])
    for inst in tr.insts:
        if inst.kind.name == "SampleCategorical":
            name = next(it)
            v = encode(target, task, name, getattr(knobs, name))
            if v not in values[name]:
                return None
            dec[inst] = values[name].index(v)
    return Trace(tr.insts, dec)


@functools.lru_cache(maxsize=None)
def ms_classes() -> dict[str, type]:
    """meta-schedule plug-ins of the space (created lazily: importing this module imports no TVM)."""
    from .. import _tvm

    _tvm.import_tvm()
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class FeasiblePostproc(ms.postproc.PyPostproc):
        """Rejects knob combinations the target's analytic rules call infeasible (nothing is built)."""

        def __init__(self, target_name: str, task: dict):
            super().__init__()
            self.target_name, self.task = target_name, task

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch) -> bool:
            from .. import targets

            t = targets.get(self.target_name)
            k = knobs_of_mod(t, sch.mod)
            return k is not None and t.prune(spec_of(self.task), k, self.task["hw"], strict_cache=True)[0]

        def clone(self):
            return FeasiblePostproc(self.target_name, self.task)

    @derived_object
    class MutateKnob(ms.mutator.PyMutator):
        """Moves one sampled knob to a neighbouring candidate value (or, rarely, any other value)."""

        def __init__(self, seed: int = 0):
            super().__init__()
            self.seed = seed
            self.rng = random.Random(seed)

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, trace, _):
            insts = [i for i in trace.insts if i.kind.name == "SampleCategorical"]
            if not insts:
                return None
            inst = self.rng.choice(insts)
            n = len(inst.attrs[0])
            cur = int(trace.decisions[inst]) if inst in trace.decisions else 0
            if self.rng.random() < 0.8:
                new = cur + self.rng.choice((-1, 1))
                if not 0 <= new < n:
                    new = cur - (new - cur)
            else:
                new = self.rng.randrange(n)
            if new == cur or not 0 <= new < n:
                return None
            return trace.with_decision(inst, new, True)

        def clone(self):
            return MutateKnob(self.seed + 1)

    return {"FeasiblePostproc": FeasiblePostproc, "MutateKnob": MutateKnob}
