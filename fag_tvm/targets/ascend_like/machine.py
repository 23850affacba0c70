"""The ascend-like target's machine description: machines.json (every parameter with its unit, its label --
V read in a source, I inferred or assumed, F fitted -- and the source itself) as a typed, checked object.

A variant names its base and overrides some parameters (910B3/B4: 20 cores; 910B1, A3: 1.85 GHz). The
pipeline model (pipeline_model.py) and the schedule's capacity checks read only this object, so a
performance engineer changes an assumption in one place and sees where it came from."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ...errors import invalid

MACHINES_FILE = Path(__file__).with_name("machines.json")
DEFAULT_MACHINE = "910B2"
LABELS = {"V": "read in the cited source", "I": "inferred or assumed", "F": "fitted"}


@dataclasses.dataclass(frozen=True)
class Machine:
    """One AI-core chip: counts, rates (per core unless the name says otherwise) and buffer sizes."""

    name: str
    aic_cores: int
    aiv_per_aic: int
    freq_hz: float
    cube_macs_f16: int
    cube_macs_f32: int
    fractal: int
    fractal_k_f32: int
    mmad_efficiency: float
    vector_bytes_per_repeat: int
    vector_repeat_max: int
    vector_ops_per_element: float
    l2_read_rate: float
    l2_write_rate: float
    gm_rate: float
    fixpipe_rate: float
    l1_to_l0a_rate: float
    l1_to_l0b_rate: float
    ub_to_l2_rate: float
    hbm_bytes_per_s: float
    l2_bytes: int
    l1_bytes: int
    l0a_bytes: int
    l0b_bytes: int
    l0c_bytes: int
    ub_bytes: int
    ub_usable_bytes: int
    ub_block_bytes: int
    gm_align_bytes: int
    flag_latency_cycles: float
    launch_s: float
    syncall_s: float
    sources: tuple[tuple[str, str, str, str], ...] = ()  # (parameter, unit, label, source)

    @property
    def peak_flops(self) -> float:
        """The chip's fp16 cube peak in FLOP/s (2 FLOP per MAC): 353.9 TFLOPS for the 910B2."""
        return 2.0 * self.cube_macs_f16 * self.aic_cores * self.freq_hz

    @property
    def vector_lanes_f32(self) -> int:
        return self.vector_bytes_per_repeat // 4

    def with_params(self, **changes: Any) -> "Machine":
        """A copy with some parameters changed (what-if studies; `sources` then marks them as F)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)} - {"name"}
        if unknown:
            raise invalid("machine", f"unknown machine parameters {sorted(unknown)}")
        src = tuple((p, u, "F" if p in changes else lab, s) for p, u, lab, s in self.sources)
        return dataclasses.replace(self, **changes, sources=src)


_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(Machine) if f.name not in ("name", "sources"))


def _raw(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise invalid("machine", f"machine description {path} unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("machines"), dict):
        raise invalid("machine", f"{path}: not a format-1 machine description")
    return doc["machines"]


def _params(machines: dict, name: str, seen: tuple[str, ...] = ()) -> dict[str, dict]:
    if name not in machines:
        raise invalid("machine", f"unknown machine {name!r}; expected one of {', '.join(sorted(machines))}")
    if name in seen:
        raise invalid("machine", f"machine {name!r}: variant cycle {' -> '.join(seen + (name,))}")
    m = machines[name]
    base = _params(machines, m["base"], seen + (name,)) if m.get("base") else {}
    return {**base, **m.get("params", {})}


def load(name: str = DEFAULT_MACHINE, path: Path | None = None) -> Machine:
    """The machine `name` from machines.json (or `path`), variants resolved; every parameter of Machine must
    be present with a numeric value, a unit, a label in V/I/F and a source."""
    params = _params(_raw(path or MACHINES_FILE), name)
    missing = [p for p in _PARAM_FIELDS if p not in params]
    if missing:
        raise invalid("machine", f"machine {name!r} lacks {', '.join(missing)}")
    values, sources = {}, []
    for p in _PARAM_FIELDS:
        entry = params[p]
        ok = isinstance(entry, dict) and isinstance(entry.get("value"), (int, float)) and \
            not isinstance(entry.get("value"), bool) and entry.get("label") in LABELS and \
            isinstance(entry.get("source"), str) and entry["source"] and isinstance(entry.get("unit"), str)
        if not ok or entry["value"] <= 0:
            raise invalid("machine", f"machine {name!r}: parameter {p} needs a positive value, a unit, a label "
                                     f"(V/I/F) and a source; got {entry!r}")
        values[p] = entry["value"]
        sources.append((p, entry["unit"], entry["label"], entry["source"]))
    return Machine(name=name, sources=tuple(sources), **values)


def names(path: Path | None = None) -> list[str]:
    return sorted(_raw(path or MACHINES_FILE))
