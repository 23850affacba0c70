"""Tuning records as the build path and reports use them — TVM-free.

    tuning_logs/<target>/<kernel family>/best.json    readable summary, one entry per (direction,
                                                      workload, hardware), written atomically

A best.json entry names the chosen knobs of one workload on one hardware description, with its
metadata (source hash, TVM version, hardware, machine). The build path (`tuned_knobs`) applies an entry
only when that metadata matches this environment; everything else is ignored with a logged reason, never
applied silently. Entries of other hardware coexist with this machine's (a log can hold records of
several machines)."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write_json, read_json
from ..core.spec import KernelSpec
from ..targets.base import Target
from ..version import __version__
from ..workloads import flops, shape_key, workload_id
from .database import read_family
from .task import FORMAT, current_meta

BEST = "best.json"
MARGIN = 0.02  # a tuned point replaces the template default only if it is more than 2% faster
log = logging.getLogger("fag_tvm.tuning")
_ROOT = Path(__file__).resolve().parent.parent.parent


def default_log_dir() -> Path:
    """tuning_logs of the checkout (or $FAG_TVM_TUNING_LOGS)."""
    return Path(os.environ.get("FAG_TVM_TUNING_LOGS") or str(_ROOT / "tuning_logs"))


def family_dir(log_dir: Any, target: Target, spec: KernelSpec) -> Path:
    return Path(log_dir) / target.name / spec.key(target.name)


def knobs_tag(knobs: Any) -> str:
    """A stable string of a knob point (all fields, in dataclass order)."""
    return "k_" + "_".join(str(v) for v in asdict(knobs).values())


def knobs_from_tag(target: Target, tag: str) -> Any:
    """Inverse of knobs_tag (None if `tag` is not one of this target's): each field typed by its declaration
    (int, bool as True/False, str)."""
    import dataclasses

    fields = dataclasses.fields(target.schedule.Knobs)
    parts = str(tag).split("_")
    if len(parts) != len(fields) + 1 or parts[0] != "k":
        return None
    vals = {}
    for f, p in zip(fields, parts[1:]):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "bool":
            if p not in ("True", "False"):
                return None
            vals[f.name] = p == "True"
        elif kind == "int":
            if not p.isdigit():
                return None
            vals[f.name] = int(p)
        else:
            vals[f.name] = p
    return target.schedule.Knobs(**vals)


def meta_mismatch(target: Target, meta: dict, cur: dict) -> list[str]:
    """Reasons why a record's metadata does not apply here ([] if it does). Hard keys: the target's source
    hash (its kernels/schedule/ABI changed), TVM version (codegen), hardware, measuring machine (override
    with FAG_TVM_TUNING_ANY_CPU=1). fag_tvm version and date are informational."""
    out = []
    if meta.get("source_hash") != cur["source_hash"]:
        out.append(f"stale: kernel source hash {str(meta.get('source_hash'))[:12]} != current "
                   f"{cur['source_hash'][:12]} ({target.name} kernels/schedule changed since tuning; re-tune)")
    if meta.get("tvm_version") != cur["tvm_version"]:
        out.append(f"TVM version {meta.get('tvm_version')} != {cur['tvm_version']}")
    out += target.hw_mismatch(meta.get("hw"), cur["hw"])
    if meta.get("machine") != cur["machine"] and os.environ.get("FAG_TVM_TUNING_ANY_CPU") != "1":
        out.append(f"measured on {meta.get('machine')!r}, this is {cur['machine']!r} "
                   "(set FAG_TVM_TUNING_ANY_CPU=1 to accept)")
    return out


def _median(x: list[float]) -> float:
    return float(np.median(x)) if x else float("inf")


def aggregate(records: list[dict]) -> dict:
    """knobs -> {"secs": all successful measurements, "n": records, "t": median} (a point re-measured by
    the confirmation step has several records; the median over all of them is its time)."""
    out: dict = {}
    for r in records:
        if r["ok"] and r["knobs"] is not None:
            a = out.setdefault(r["knobs"], {"secs": [], "n": 0})
            a["secs"] += r["run_secs"]
            a["n"] += 1
    for a in out.values():
        a["t"] = _median(a["secs"])
    return out


def summarize_entry(target: Target, ent: dict) -> dict | None:
    """The best.json entry of one workload: the fastest point (median over all its measurements); the
    template default stays the choice unless that point is more than MARGIN faster than the default."""
    task = ent["task"]
    agg = aggregate(ent["records"])
    if not agg:
        return None
    spec = KernelSpec(**task["spec"])
    dk = target.default_knobs(spec, task["hw"])
    fastest = min(agg, key=lambda k: agg[k]["t"])
    chosen = fastest
    if dk in agg and agg[dk]["t"] <= agg[fastest]["t"] * (1 + MARGIN):
        chosen = dk
    fl = flops(task["workload"], task["direction"])
    t = agg[chosen]["t"]
    out = {"id": workload_id(task["workload"]), "direction": task["direction"], "workload": task["workload"],
           "hw_tag": target.hw_tag(task["hw"]), "knobs": asdict(chosen), "kernel": spec.key(target.name, chosen),
           "run_ms": t * 1e3, "gflops": fl / t / 1e9, "measurements": len(agg[chosen]["secs"]),
           "fastest_knobs": asdict(fastest), "fastest_ms": agg[fastest]["t"] * 1e3,
           "trials": len(agg), "records": len(ent["records"]),
           "measured_ms": {knobs_tag(k): round(a["t"] * 1e3, 4) for k, a in sorted(agg.items(), key=lambda x: x[1]["t"])},
           "failed": sum(1 for r in ent["records"] if not r["ok"]), "default_knobs": asdict(dk)}
    if dk in agg:
        td = agg[dk]["t"]
        out.update(default_ms=td * 1e3, default_gflops=fl / td / 1e9, speedup_vs_default=td / t)
    out["meta"] = {k: task.get(k) for k in ("tvm_version", "tvm_ffi_version", "hw", "machine", "source_hash")}
    out["meta"]["fag_tvm_version"] = __version__
    out["meta"]["workload_hash"] = ent["shash"]
    return out


def _entry_key(e: dict) -> tuple:
    return (e.get("direction"), json.dumps(e.get("workload"), sort_keys=True), e.get("hw_tag"))


def write_best(target: Target, fdir: Path, hw: dict | None = None) -> dict:
    """Regenerate `best.json` of a family from its database (atomically). One entry per (direction,
    workload, hardware): the identity that matches this environment if the database has one, else the
    newest."""
    cur = current_meta(target, hw)
    ents = read_family(fdir, target)
    chosen: dict[tuple, dict] = {}
    for ent in ents:  # file order: later identities win unless the current one was seen
        t = ent["task"]
        key = (t["direction"], json.dumps(t["workload"], sort_keys=True), target.hw_tag(t["hw"]))
        prev = chosen.get(key)
        if prev is not None and not meta_mismatch(target, prev["task"], cur) and meta_mismatch(target, t, cur):
            continue
        chosen[key] = ent
    entries = [s for s in (summarize_entry(target, e) for e in chosen.values()) if s is not None]
    doc = {"format": FORMAT, "family": fdir.name, "target": target.name,
           "spec": ents[0]["task"]["spec"] if ents else None,
           "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "written_by": f"fag_tvm {__version__}",
           "entries": sorted(entries, key=lambda e: (e["direction"], e["id"], e["hw_tag"]))}
    for e in doc["entries"]:
        e["meta"]["date"] = doc["written"] if not meta_mismatch(target, e["meta"], cur) else e["meta"].get("date")
    old = read_best(fdir / BEST)
    if old:  # keep the tuning date of entries that did not change
        olds = {_entry_key(o): o for o in old.get("entries", []) if isinstance(o, dict)}
        for e in doc["entries"]:
            o = olds.get(_entry_key(e))
            if o and o.get("knobs") == e["knobs"] and o.get("trials") == e["trials"] and \
                    o.get("meta", {}).get("workload_hash") == e["meta"]["workload_hash"]:
                e["meta"]["date"] = o.get("meta", {}).get("date", e["meta"]["date"])
    atomic_write_json(fdir / BEST, doc)
    return doc


def read_best(path: Path) -> dict | None:
    """A best.json document, or None (missing, a FIFO or other non-file, unreadable, not a JSON object)."""
    d = read_json(path)
    return d if isinstance(d, dict) else None


# ------------------------------------------------------------------------------------------------
# the build path: choose tuned knobs

_LOGGED: set = set()


def _note(path: Any, reason: str) -> None:
    key = (str(path), reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning("fag_tvm tuning record %s ignored: %s", path, reason)


@functools.lru_cache(maxsize=64)
def _best_cached(path: str, mtime: float, size: int) -> dict | None:
    return read_best(Path(path))


def tuned_knobs(target: Target, spec: KernelSpec, hw: dict, shape: Any = None, log_dir: Any = None):
    """(knobs, origin) from `<log_dir>/<target>/<spec key>/best.json`, or None (then use the defaults).

    Entries whose metadata does not match this environment, or whose knobs are malformed or infeasible,
    are ignored with a logged reason. With `shape` (a workload or an OpConfig) the entry of the same shape
    is used, else the nearest; without it one setting for the whole family (`_family_choice`)."""
    path = family_dir(log_dir or default_log_dir(), target, spec) / BEST
    try:
        st = path.stat()
    except OSError:
        return None
    doc = _best_cached(str(path), st.st_mtime, st.st_size)
    if doc is None:
        _note(path, "unreadable best.json (not a regular JSON file)")
        return None
    if doc.get("format") != FORMAT:
        _note(path, f"format {doc.get('format')!r} != {FORMAT!r}")
        return None
    cur = current_meta(target, hw)
    usable = []
    for e in doc.get("entries", []):
        if not isinstance(e, dict) or e.get("direction") != spec.direction:
            continue
        why = meta_mismatch(target, e.get("meta", {}) if isinstance(e.get("meta"), dict) else {}, cur)
        if why:
            _note(f"{path}#{e.get('id')}", "; ".join(why))
            continue
        try:
            k = target.knobs_from_dict(e["knobs"])
        except (KeyError, TypeError, ValueError):
            _note(f"{path}#{e.get('id')}", "malformed knobs")
            continue
        ok, reason = target.prune(spec, k, hw)
        if not ok:
            _note(f"{path}#{e.get('id')}", f"infeasible knobs {k}: {reason}")
            continue
        usable.append((e, k))
    if not usable:
        return None
    if shape is not None:
        sk = shape_key(shape)

        def dist(e):
            return sum(abs(math.log(max(1, a)) - math.log(max(1, b))) for a, b in zip(sk, shape_key(e["workload"])))

        e, k = min(usable, key=lambda ek: dist(ek[0]))
    else:
        e, k = _family_choice(usable)
    return k, f"tuned:{path}#{e['id']}"


def _family_choice(usable: list) -> tuple:
    """One knob setting for every shape of a kernel family (no shape known): among the settings the
    family's entries chose, the one with the best geometric-mean time relative to each entry's choice,
    counting only settings measured on every entry (the confirmation step measures siblings' choices);
    if none qualifies, the choice of the largest workload."""
    if len({k for _, k in usable}) == 1:
        return usable[0]
    best, best_score = None, None
    for e, k in usable:
        tag = knobs_tag(k)
        rel = [x.get("measured_ms", {}).get(tag, float("nan")) / x["run_ms"] for x, _ in usable]
        if any(not math.isfinite(r) for r in rel):
            continue
        score = math.exp(sum(math.log(r) for r in rel) / len(rel))
        if best_score is None or score < best_score - 1e-12:
            best, best_score = (e, k), score
    if best is not None:
        return best
    return max(usable, key=lambda ek: flops(ek[0]["workload"], ek[0]["direction"]))


def check_logs(target: Target, log_dir: Any = None, hw: dict | None = None) -> list[dict]:
    """Every best.json entry under `<log_dir>/<target>` with the reasons it would be ignored here.
    `stale` = written for another kernel source hash or malformed: such an entry never applies anywhere
    (re-tune); other reasons (other hardware or machine) mean "not for this machine"."""
    base = Path(log_dir or default_log_dir()) / target.name
    cur = current_meta(target, hw)
    out = []
    for p in sorted(base.glob(f"*/{BEST}")):
        doc = read_best(p)
        if doc is None or doc.get("format") != FORMAT:
            out.append({"path": str(p), "id": None, "reasons": ["unreadable or unknown format"], "stale": True})
            continue
        for e in doc.get("entries", []):
            reasons = meta_mismatch(target, e.get("meta", {}), cur)
            try:
                spec = KernelSpec(**doc["spec"])
                if spec.key(target.name) != p.parent.name:
                    reasons.append(f"family dir {p.parent.name} != spec key {spec.key(target.name)}")
                k = target.knobs_from_dict(e["knobs"])
                ok, why = target.prune(spec, k, e["meta"]["hw"])
                if not ok:
                    reasons.append(f"knobs infeasible under the current template: {why}")
            except (KeyError, TypeError, ValueError) as exc:
                reasons.append(f"malformed entry: {exc}")
            out.append({"path": str(p), "id": e.get("id"), "direction": e.get("direction"),
                        "hw_tag": e.get("hw_tag"), "reasons": reasons,
                        "stale": any(r.startswith("stale") or "infeasible" in r or "malformed" in r
                                     or "family dir" in r for r in reasons)})
    return out
