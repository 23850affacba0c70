"""Knob values as the integers meta-schedule samples and stores in its traces (TVM-free): ints as themselves,
bools as 0/1, anything else (strings such as ascend-like's dkdv / accumulate) as its index in the target's
candidate space. Each knob's kind is its dataclass declaration."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..core.spec import KernelSpec


def _kinds(target: Any) -> dict[str, str]:
    return {f.name: (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
            for f in dataclasses.fields(target.schedule.Knobs)}


def _codebook(target: Any, task: dict, name: str) -> list:
    return list(target.candidate_space(KernelSpec(**task["spec"]), task["hw"])[name])


def encode(target: Any, task: dict, name: str, value: Any) -> int:
    kind = _kinds(target)[name]
    if kind == "bool":
        return int(bool(value))
    if kind == "int":
        return int(value)
    return _codebook(target, task, name).index(value)


def decode(target: Any, task: dict, name: str, code: int) -> Any:
    kind = _kinds(target)[name]
    if kind == "bool":
        return bool(code)
    if kind == "int":
        return int(code)
    return _codebook(target, task, name)[int(code)]


def knobs_from_codes(target: Any, task: dict, codes: dict[str, int]) -> Any:
    """The target's knobs from a trace's decoded integers (ValueError/IndexError/KeyError if they do not fit)."""
    return target.knobs_from_dict({n: decode(target, task, n, c) for n, c in codes.items()})
