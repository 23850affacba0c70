"""Auto-tuning of the shipped LLVM kernels with TVM meta-schedule (DESIGN §5).

The kernels are hand-written TIR generated from Python with the schedule knobs of
`schedules/llvm.py` as closure constants, so schedule primitives cannot retile them. Meta-schedule
drives the search over exactly those knobs instead:

* **Workload (task).** A tiny s_tir PrimFunc with one sblock `fag_kernel` whose function attribute
  `fag_tvm.task` holds the task identity as JSON: kernel spec (without knobs), the workload shape,
  direction, target, CPU model, TVM version and the kernel-source hash. The JSON database keys records
  by the structural hash of that module, so records are per (spec, workload, source, TVM, CPU).
* **Space.** A `ScheduleFn` that samples every knob with `sample_categorical` over the template's
  `candidate_space` (reduced to values that occur in at least one feasible point) and annotates the
  decisions on the block. A Postproc rejects infeasible combinations with `schedules.llvm.prune`
  before anything is built; a mutator moves one knob to a neighbouring value (evolutionary search).
* **Builder.** `LocalBuilder(f_build=...)`: decodes the annotations, generates the REAL kernel with
  `build.make_func(spec, knobs)` and compiles it to a shared library.
* **Runner.** `LocalRunner` (or `RPCRunner` for `--rpc-tracker`) with argument construction from the
  workload through the same packing as the runtime (`llvm_backend`): random inputs, finite stats.
* **Cost model.** meta-schedule's `XGBModel` with a feature extractor that returns the knob vector
  plus analytic features (tile counts under the mask, padding waste, register blocks of the five
  products, scratch vs L2, parallel balance). Already measured points score 0, so a resumed run does
  not re-measure them.
* **Files.** `<log-dir>/llvm/<spec key>/database_workload.json` + `database_tuning_record.json`
  (TVM's JSONDatabase, one line per record) and `best.json` (readable summary with metadata, written
  atomically). Every measurement is also appended (fsync) to `journal.jsonl` the moment it finishes;
  a run killed at any point (SIGKILL) re-commits journal entries missing from the database when it is
  resumed, so no completed measurement is lost. `--trials N` is the total number of records of the
  workload: a resumed run only measures what is missing.

The build path (`build.knobs_for`) reads `best.json` through `tuned_knobs` below; entries whose
metadata does not match (source hash, TVM version, target, CPU model) are ignored with a logged
reason.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, _tvm

FORMAT = "fag_tvm-tuning/1"
TARGET_DIR = "llvm"
BLOCK = "fag_kernel"
TASK_ATTR = "fag_tvm.task"
ANN = "fag_tvm.knob."
ENTRY = "fag_tvm_tune_entry"
TUNED_KNOBS = ("block_q", "block_kv", "mr", "nr")
ALL_KNOBS = ("block_q", "block_kv", "mr", "nr", "vec", "acc_regs")
DB_WORKLOAD = "database_workload.json"
DB_RECORD = "database_tuning_record.json"
BEST = "best.json"
JOURNAL = "journal.jsonl"
FAILED_SECS = 1e10

log = logging.getLogger("fag_tvm.tuning")
_ROOT = Path(__file__).resolve().parent.parent


# ================================================================================================
# metadata, paths


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    import platform

    return platform.processor() or platform.machine()


def default_log_dir() -> Path:
    return Path(os.environ.get("FAG_TVM_TUNING_LOGS") or str(_ROOT / "tuning_logs"))


def family_dir(log_dir, spec) -> Path:
    return Path(log_dir) / TARGET_DIR / spec.key("llvm")


def current_meta(target: dict | None = None) -> dict:
    from .build import source_hash

    return {"fag_tvm_version": __version__, "tvm_version": _tvm.tvm_version(),
            "tvm_ffi_version": _tvm.tvm_ffi_version(), "target": dict(target or _tvm.cpu_target()),
            "cpu_model": cpu_model(), "source_hash": source_hash()}


def meta_mismatch(meta: dict, cur: dict) -> list[str]:
    """Reasons why a record's metadata does not apply here ([] if it does). Hard keys: kernel source
    hash (the compute/template changed), TVM version (codegen), target mcpu/vector width, CPU model.
    fag_tvm version and date are informational (the source hash covers the kernel code)."""
    out = []
    if meta.get("source_hash") != cur["source_hash"]:
        out.append(f"stale: kernel source hash {str(meta.get('source_hash'))[:12]} != current "
                   f"{cur['source_hash'][:12]} (kernels/schedules changed since tuning; re-tune)")
    if meta.get("tvm_version") != cur["tvm_version"]:
        out.append(f"TVM version {meta.get('tvm_version')} != {cur['tvm_version']}")
    t, ct = meta.get("target") or {}, cur["target"]
    if t.get("mcpu") != ct.get("mcpu") or _tvm.vector_lanes(t) != _tvm.vector_lanes(ct):
        out.append(f"target mcpu {t.get('mcpu')} != {ct.get('mcpu')}")
    if meta.get("cpu_model") != cur["cpu_model"] and os.environ.get("FAG_TVM_TUNING_ANY_CPU") != "1":
        out.append(f"tuned on CPU {meta.get('cpu_model')!r}, this is {cur['cpu_model']!r} "
                   "(set FAG_TVM_TUNING_ANY_CPU=1 to accept)")
    return out


# ================================================================================================
# workloads and tasks


def canonical_workload(w: dict) -> dict:
    from .workloads import DTYPE_ALIASES, REQUIRED

    out = {k: w[k] for k in REQUIRED}
    for k in ("B", "N1", "N2", "Sq", "Skv", "D", "Dv", "sparse_mode"):
        out[k] = int(out[k])
    out["dtype"] = DTYPE_ALIASES.get(str(out["dtype"]), str(out["dtype"]))
    for k in ("pse", "keep_prob", "pse_type", "mask"):
        if k in w and w[k] is not None:
            out[k] = w[k]
    if float(out.get("keep_prob", 1.0)) == 1.0:
        out.pop("keep_prob", None)
    return out


def workload_id(w: dict) -> str:
    """The suite id (S1..S9) of a workload with a suite shape, else a readable shape name."""
    from .workloads import SUITE

    if w.get("id"):
        return str(w["id"])
    c = canonical_workload(w)
    for sid, sw in SUITE.items():
        if canonical_workload(sw) == c:
            return sid
    return (f"B{c['B']}_N{c['N1']}x{c['N2']}_S{c['Sq']}x{c['Skv']}_D{c['D']}x{c['Dv']}_{c['input_layout']}_"
            f"{c['dtype']}_m{c['sparse_mode']}")


def shape_key(w: dict) -> tuple:
    return tuple(int(w[k]) for k in ("B", "N1", "N2", "Sq", "Skv"))


def flops(w: dict, direction: str = "bwd") -> float:
    """DESIGN's convention: backward 2.5·4·B·N·Sq·Skv·D, forward 2·2·B·N·Sq·Skv·D; halved for causal."""
    causal = int(w["sparse_mode"]) in (2, 3)
    per = 2.5 * 4 if direction == "bwd" else 4.0
    return per * w["B"] * w["N1"] * w["Sq"] * w["Skv"] * w["D"] * (0.5 if causal else 1.0)


def task_spec(w: dict, direction: str = "bwd"):
    from .kernels.abi import kernel_spec
    from .workloads import configs

    fcfg, bcfg = configs(w)
    return kernel_spec(bcfg if direction == "bwd" else fcfg, direction)


def make_task(w: dict, direction: str = "bwd", target: dict | None = None) -> dict:
    """The identity of one tuning task (stored in the workload stub; JSON-serialisable)."""
    spec = task_spec(w, direction)
    meta = current_meta(target)
    meta.pop("fag_tvm_version")  # informational only (best.json records the writer's version)
    return {"format": FORMAT, "direction": direction, "spec": asdict(spec), "family": spec.key("llvm"),
            "workload": canonical_workload(w), **meta}


def spec_of(task: dict):
    from .kernels.spec import KernelSpec

    return KernelSpec(**task["spec"])


def stub_mod(task: dict):
    """The meta-schedule workload: a one-sblock PrimFunc whose attrs identify the task."""
    tvm = _tvm.import_tvm()
    from tvm import te

    a = te.placeholder((1,), "float32", name="A")
    b = te.compute((1,), lambda i: a[i], name=BLOCK)
    func = te.create_prim_func([a, b]).with_attr(TASK_ATTR, json.dumps(task, sort_keys=True))
    return tvm.IRModule({"main": func})


def task_of_mod(mod) -> dict | None:
    try:
        func = mod["main"]
        s = func.attrs[TASK_ATTR] if func.attrs is not None and TASK_ATTR in func.attrs else None
    except Exception:  # noqa: BLE001
        return None
    return json.loads(str(s)) if s is not None else None


# ================================================================================================
# the space


def space_values(spec, vec: int) -> dict[str, list[int]]:
    """Per-knob values of the template's candidate space that occur in at least one feasible point."""
    from schedules.llvm import candidate_space, candidates

    sp = candidate_space(spec, vec)
    feas = candidates(spec, vec)
    if not feas:
        raise ValueError(f"{spec.key('llvm')}: no feasible knob setting in the candidate space")
    return {k: [v for v in sp[k] if any(getattr(c, k) == v for c in feas)] for k in ALL_KNOBS}


def make_space_fn(values: dict[str, list[int]]):
    def space(sch) -> None:
        blk = sch.get_sblock(BLOCK)
        for name in ALL_KNOBS:
            vals = values[name]
            if len(vals) == 1:
                sch.annotate(blk, ANN + name, int(vals[0]))
            else:
                rv = sch.sample_categorical([int(v) for v in vals], [1.0 / len(vals)] * len(vals))
                sch.annotate(blk, ANN + name, rv)

    return space


def knobs_of_mod(mod):
    """LLVMKnobs from the annotations of a scheduled stub (None if it carries none)."""
    from tvm.s_tir.schedule import Schedule

    from schedules.llvm import LLVMKnobs

    sch = Schedule(mod)
    ann = sch.get(sch.get_sblock(BLOCK)).annotations
    vals = {}
    for k in ALL_KNOBS:
        if ANN + k not in ann:
            return None
        vals[k] = int(ann[ANN + k])
    return LLVMKnobs(**vals)


def knobs_of_trace(trace, stub):
    from tvm.s_tir.schedule import Schedule

    sch = Schedule(stub)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return knobs_of_mod(sch.mod)


def trace_for_knobs(task: dict, knobs):
    """A trace of the design space whose decisions select `knobs` (None if outside the space)."""
    from tvm.s_tir.schedule import Schedule, Trace

    spec = spec_of(task)
    values = space_values(spec, knobs.vec)
    sch = Schedule(stub_mod(task))
    make_space_fn(values)(sch)
    tr = sch.trace
    dec = {}
    it = iter([k for k in ALL_KNOBS if len(values[k]) > 1])
    for inst in tr.insts:
        if inst.kind.name == "SampleCategorical":
            name = next(it)
            v = getattr(knobs, name)
            if v not in values[name]:
                return None
            dec[inst] = values[name].index(v)
    return Trace(tr.insts, dec)


def knobs_tag(k) -> str:
    return f"k_{k.block_q}_{k.block_kv}_{k.mr}_{k.nr}_{k.vec}_{k.acc_regs}"


def knobs_from_tag(s: str):
    from schedules.llvm import LLVMKnobs

    m = re.search(r"k_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)", s)
    return LLVMKnobs(*map(int, m.groups())) if m else None


def LLVMKnobs_from(d: dict):  # noqa: N802
    from schedules.llvm import LLVMKnobs

    return LLVMKnobs(**{f: int(d[f]) for f in ALL_KNOBS})


def knob_dict(k) -> dict:
    return {f: getattr(k, f) for f in ALL_KNOBS}


# ================================================================================================
# analytic features (cost model)


def _visible_tiles(w: dict, bq: int, bkv: int) -> tuple[int, int, float]:
    """(visible tiles, partial tiles, useful cells) of one (b, head) for the workload's mask."""
    Sq, Skv, mode = int(w["Sq"]), int(w["Skv"]), int(w["sparse_mode"])
    nq, nkv = -(-Sq // bq), -(-Skv // bkv)
    if mode not in (2, 3):
        return nq * nkv, 0, float(Sq * Skv)
    off = 0 if mode == 2 else Skv - Sq  # visible iff j <= i + off
    vis = part = 0
    for ib in range(nq):
        hi = min(ib * bq + bq, Sq) - 1 + off  # last visible column of the tile's last row
        lo = ib * bq + off  # last visible column of its first row
        for jb in range(nkv):
            j0, j1 = jb * bkv, min(jb * bkv + bkv, Skv) - 1
            if j0 <= hi:
                vis += 1
                part += j1 > lo
    useful = float(sum(max(0, min(Skv, i + off + 1)) for i in range(Sq)))
    return vis, part, useful


def knob_features(task: dict, knobs) -> list[float]:
    from schedules.llvm import gemm_shape, l2_bytes, pad16, scratch_floats

    spec = spec_of(task)
    w = task["workload"]
    bq, bkv = knobs.block_q, knobs.block_kv
    threads = max(1, int(task.get("target", {}).get("num-cores", 2)))
    D, DV = spec.d, spec.dv
    vis, part, useful = _visible_tiles(w, bq, bkv)
    computed = vis * bq * bkv
    heads = w["B"] * w["N1"]
    tasks = w["B"] * w["N2"]
    balance = math.ceil(tasks / threads) * threads / tasks
    prods = [gemm_shape(knobs, bq, bkv), gemm_shape(knobs, bkv, pad16(DV)), gemm_shape(knobs, bkv, pad16(D)),
             gemm_shape(knobs, bq, pad16(D))]
    f = [bq, bkv, knobs.mr, knobs.nr, math.log2(bq), math.log2(bkv), bq / bkv,
         vis, part, part / max(1, vis), computed / max(1.0, useful),
         heads * vis, heads * part, balance,
         4 * scratch_floats(spec, knobs) / l2_bytes()]
    for m, n in prods:
        f += [m, n, m * n]
    # per-tile arithmetic intensity: 5 products of 2*bq*bkv*D flops over the q/dy/dq tile traffic
    f += [2 * bq * bkv * (2 * D + 2 * DV + D) / (4.0 * (bq * (2 * D + DV) + bkv * (D + DV))),
          -(-w["Sq"] // bq) * bq / w["Sq"], -(-w["Skv"] // bkv) * bkv / w["Skv"],
          D, DV, spec.group, 0 if spec.dtype == "float32" else 1]
    return [float(x) for x in f]


FEATURE_NAMES = (["bq", "bkv", "mr", "nr", "log2_bq", "log2_bkv", "bq_over_bkv", "tiles", "partial_tiles",
                  "partial_frac", "computed_over_useful", "tiles_total", "partial_total", "thread_balance",
                  "scratch_over_l2"]
                 + [f"{p}_{x}" for p in ("s", "dv", "dk", "dq") for x in ("mr", "nr", "acc")]
                 + ["intensity", "pad_q", "pad_kv", "D", "Dv", "group", "lowp"])


# ================================================================================================
# argument construction (runner side)


def _random_call(w: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random call arrays of a workload (same shapes/masks as `workloads.configs`)."""
    from .arrays import NAME_TO_DTYPE
    from .masks import compressed_causal_mask, compressed_prefix_mask
    from .workloads import DTYPE_ALIASES

    rng = np.random.default_rng(seed)
    dt = NAME_TO_DTYPE[DTYPE_ALIASES[str(w["dtype"])]]
    B, N1, N2, Sq, Skv, D, Dv = (int(w[k]) for k in ("B", "N1", "N2", "Sq", "Skv", "D", "Dv"))
    L, mode = w["input_layout"], int(w["sparse_mode"])

    def shp(S, N, d):
        return {"BSH": (B, S, N * d), "SBH": (S, B, N * d), "BSND": (B, S, N, d), "BNSD": (B, N, S, d),
                "TND": (B * S, N, d)}.get(L, (B, N, S, d))

    def rnd(shape, s=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(s)).astype(dt)

    qs = D ** -0.25  # scores ~ N(0, 1) with scale 1: no overflow, no denormals in exp
    a: dict[str, Any] = {"query": rnd(shp(Sq, N1, D), qs), "key": rnd(shp(Skv, N2, D), qs),
                         "value": rnd(shp(Skv, N2, Dv)), "dy": rnd(shp(Sq, N1, Dv)),
                         "attention_in": rnd(shp(Sq, N1, Dv))}
    st = (B * Sq, N1, 8) if L == "TND" else (B, N1, Sq, 8)
    a["softmax_max"] = np.full(st, 3.0, dtype=np.float32)
    a["softmax_sum"] = np.full(st, float(min(Skv, 64)), dtype=np.float32)
    if mode in (2, 3, 4, 7, 8):
        a["atten_mask"] = compressed_causal_mask()
    elif mode == 6:
        a["atten_mask"] = compressed_prefix_mask()
    elif mode in (0, 1, 5) and w.get("mask", mode != 0):
        a["atten_mask"] = np.zeros((B, 1, Sq, Skv) if mode == 5 else (Sq, Skv), np.bool_)
    if float(w.get("keep_prob", 1.0)) < 1.0:
        a["drop_mask"] = rng.integers(0, 256, ((B * N1 * Sq * Skv + 7) // 8,), dtype=np.uint8)
    pse = w.get("pse")
    if pse:
        shapes = {"BNSS": (B, N1, Sq, Skv), "1NSS": (1, N1, Sq, Skv), "BN1S": (B, N1, 1, Skv),
                  "BNHS": (B, N1, 1024, Skv), "1NHS": (1, N1, 1024, Skv), "slopes_N": (N1,), "slopes_BN": (B, N1)}
        a["pse_shift"] = (rng.standard_normal(shapes[pse], dtype=np.float32) * 0.1).astype(
            np.float32 if pse.startswith("slopes") else dt)
    return a


class _Capture:
    """A kernel provider for llvm_backend that records the packed ABI arguments instead of running."""

    def __init__(self, spec):
        self.spec = spec
        self.args = None

    def __call__(self, *args):
        if self.args is None:
            self.args = [_tvm.kernel_view(_tvm.ensure_aligned(x)) for x in args]


def kernel_args(task: dict, seed: int = 0) -> list[np.ndarray]:
    """Realistic ABI arguments (aligned NumPy, kernel views) of the task's workload."""
    from . import llvm_backend
    from .workloads import configs

    w = task["workload"]
    fcfg, bcfg = configs(w)
    spec = spec_of(task)
    cap = _Capture(spec)
    a = _random_call(w, seed)
    if task["direction"] == "bwd":
        llvm_backend.backward_arrays(bcfg, a, provider=lambda s: cap)
    else:
        llvm_backend.forward_arrays(fcfg, a, provider=lambda s: cap)
    assert cap.args is not None
    return cap.args


def _alloc(task: dict, device, alloc_repeat: int):
    import tvm

    host = kernel_args(task)
    return [[tvm.runtime.tensor(x, device) for x in host] for _ in range(max(1, alloc_repeat))]


def ms_alloc_local(task, device, args_info, alloc_repeat):  # LocalRunner f_alloc_argument
    return _alloc(task, device, alloc_repeat)


def ms_alloc_rpc(task, session, device, args_info, alloc_repeat):  # RPCRunner f_alloc_argument
    return _alloc(task, device, alloc_repeat)


def _evaluate(rt_mod, device, cfg, repeated_args) -> list[float]:
    f = rt_mod.time_evaluator(ENTRY, device, number=cfg.number, repeat=cfg.repeat, min_repeat_ms=cfg.min_repeat_ms)
    out = []
    for args in repeated_args:
        device.sync()
        out += [float(x) for x in f(*args).results]
    return out


def ms_run_local(rt_mod, device, cfg, repeated_args):
    return _evaluate(rt_mod, device, cfg, repeated_args)


def ms_run_rpc(session, rt_mod, device, cfg, repeated_args):
    return _evaluate(rt_mod, device, cfg, repeated_args)


# ================================================================================================
# builder side (runs in meta-schedule's build workers)

_LAST_TAG = {"tag": "k"}


def ms_build(mod, target, params):
    """f_build: the scheduled stub -> the real kernel for the annotated knobs, compiled."""
    from .build import make_func

    task = task_of_mod(mod)
    knobs = knobs_of_mod(mod)
    if task is None or knobs is None:
        raise ValueError("not a fag_tvm tuning stub (no task attribute / knob annotations)")
    _LAST_TAG["tag"] = knobs_tag(knobs)
    tvm = _tvm.import_tvm()
    return tvm.compile(make_func(spec_of(task), knobs, ENTRY), target=target)


def ms_export(out_dir, rt_mod) -> str:
    """f_export: a shared library (loadable locally and by an RPC server); knobs in the file name."""
    d = tempfile.mkdtemp(prefix="b", dir=out_dir)
    path = os.path.join(d, _LAST_TAG["tag"] + ".so")
    rt_mod.export_library(path)
    return path


# ================================================================================================
# files: tolerant readers, repair, atomic writes


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; the result is an ordinary readable file
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json_lines(path: Path) -> list[Any]:
    """Parsed lines of a JSON-lines file; a torn last line (writer killed mid-append) is skipped."""
    out = []
    try:
        data = path.read_bytes()
    except OSError:
        return out
    for raw in data.split(b"\n"):
        if raw.strip():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out


def repair_json_lines(path: Path) -> int:
    """Drop torn/unparseable lines (a SIGKILL during an append) so TVM's JSONDatabase can load the
    file; rewritten atomically. Returns the number of dropped lines."""
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    good, bad = [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            json.loads(raw)
            good.append(raw)
        except ValueError:
            bad += 1
    if bad or (data and not data.endswith(b"\n")):
        _atomic_write_text(path, "".join(x.decode() + "\n" for x in good))
        if bad:
            log.warning("%s: dropped %d torn line(s) left by an interrupted run", path, bad)
    return bad


def _append_journal(path: Path, obj: dict) -> None:
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write(2) of one line: never interleaved with another line
        os.fsync(fd)
    finally:
        os.close(fd)


# ================================================================================================
# reading a family's database (order-preserving; used by best.json, report and resume)


def load_family(fdir: Path) -> list[dict]:
    """Per workload of the family database: {"task", "shash", "records": [{"knobs", "run_secs", "ok"}]}
    with records in measurement (file) order."""
    _tvm.import_tvm()
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    wls = []
    for line in read_json_lines(fdir / DB_WORKLOAD):
        try:
            wl = Workload.from_json(line)
        except Exception:  # noqa: BLE001
            wls.append(None)
            continue
        task = task_of_mod(wl.mod)
        wls.append({"workload": wl, "task": task, "shash": str(line[0]), "records": []})
    for line in read_json_lines(fdir / DB_RECORD):
        try:
            idx = int(line[0])
            ent = wls[idx]
        except (ValueError, IndexError, TypeError):
            continue
        if ent is None or ent["task"] is None:
            continue
        try:
            rec = TuningRecord.from_json(line[1], ent["workload"])
            knobs = knobs_of_trace(rec.trace, ent["workload"].mod)
        except Exception:  # noqa: BLE001
            continue
        secs = [float(x) for x in (rec.run_secs or [])]
        ok = bool(secs) and all(s < FAILED_SECS for s in secs)
        ent["records"].append({"knobs": knobs, "run_secs": secs, "ok": ok})
    return [e for e in wls if e is not None and e["task"] is not None]


def _median(x: list[float]) -> float:
    return float(np.median(x)) if x else float("inf")


MARGIN = 0.02  # a tuned point replaces the template default only if it is more than 2% faster


def aggregate(records: list[dict]) -> dict:
    """knobs -> {"secs": all successful measurements, "n": records, "t": median} (a point measured again
    by the confirmation step has several records; the median over all of them is its time)."""
    out: dict = {}
    for r in records:
        if r["ok"] and r["knobs"] is not None:
            a = out.setdefault(r["knobs"], {"secs": [], "n": 0})
            a["secs"] += r["run_secs"]
            a["n"] += 1
    for a in out.values():
        a["t"] = _median(a["secs"])
    return out


def summarize_entry(ent: dict) -> dict | None:
    """The best.json entry of one workload: the fastest point (median over all its measurements); the
    template default stays the choice unless that point is more than MARGIN faster than the default."""
    from schedules.llvm import default_knobs

    task = ent["task"]
    agg = aggregate(ent["records"])
    if not agg:
        return None
    spec = spec_of(task)
    dk = default_knobs(spec, vec=_tvm.vector_lanes(task["target"]))
    fastest = min(agg, key=lambda k: agg[k]["t"])
    chosen = fastest
    if dk in agg and agg[dk]["t"] <= agg[fastest]["t"] * (1 + MARGIN):
        chosen = dk
    fl = flops(task["workload"], task["direction"])
    t = agg[chosen]["t"]
    out = {"id": workload_id(task["workload"]), "direction": task["direction"], "workload": task["workload"],
           "knobs": knob_dict(chosen), "kernel": spec.key("llvm", chosen), "run_ms": t * 1e3, "gflops": fl / t / 1e9,
           "measurements": len(agg[chosen]["secs"]),
           "fastest_knobs": knob_dict(fastest), "fastest_ms": agg[fastest]["t"] * 1e3,
           "trials": len(agg), "records": len(ent["records"]),
           "measured_ms": {knobs_tag(k): round(a["t"] * 1e3, 4) for k, a in sorted(agg.items(), key=lambda x: x[1]["t"])},
           "failed": sum(1 for r in ent["records"] if not r["ok"]), "default_knobs": knob_dict(dk)}
    if dk in agg:
        td = agg[dk]["t"]
        out.update(default_ms=td * 1e3, default_gflops=fl / td / 1e9, speedup_vs_default=td / t)
    out["meta"] = {k: task.get(k) for k in ("tvm_version", "tvm_ffi_version", "target", "cpu_model",
                                            "source_hash")}
    out["meta"]["fag_tvm_version"] = __version__
    out["meta"]["workload_hash"] = ent["shash"]
    return out


def write_best(fdir: Path, target: dict | None = None) -> dict:
    """Regenerate `best.json` of a family from its database (atomically). One entry per (direction,
    workload): the identity that matches this environment if the database has one, else the newest."""
    cur = current_meta(target)
    ents = load_family(fdir)
    chosen: dict[tuple, dict] = {}
    for ent in ents:  # file order: later identities win unless the current one was seen
        key = (ent["task"]["direction"], json.dumps(ent["task"]["workload"], sort_keys=True))
        prev = chosen.get(key)
        if prev is not None and not meta_mismatch(prev["task"], cur) and meta_mismatch(ent["task"], cur):
            continue
        chosen[key] = ent
    entries = [s for s in (summarize_entry(e) for e in chosen.values()) if s is not None]
    spec = ents[0]["task"]["spec"] if ents else None
    doc = {"format": FORMAT, "family": fdir.name, "target": TARGET_DIR, "spec": spec,
           "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "written_by": f"fag_tvm {__version__}",
           "entries": sorted(entries, key=lambda e: (e["direction"], e["id"]))}
    for e in doc["entries"]:
        e["meta"]["date"] = doc["written"] if not meta_mismatch(e["meta"], cur) else e["meta"].get("date")
    old = _read_best(fdir / BEST)
    if old:  # keep the tuning date of entries that did not change
        olds = {(o.get("direction"), json.dumps(o.get("workload"), sort_keys=True)): o for o in old.get("entries", [])}
        for e in doc["entries"]:
            o = olds.get((e["direction"], json.dumps(e["workload"], sort_keys=True)))
            if o and o.get("knobs") == e["knobs"] and o.get("trials") == e["trials"] and \
                    o.get("meta", {}).get("workload_hash") == e["meta"]["workload_hash"]:
                e["meta"]["date"] = o.get("meta", {}).get("date", e["meta"]["date"])
    _atomic_write_text(fdir / BEST, json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return doc


def _read_best(path: Path) -> dict | None:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


# ================================================================================================
# the build path: choose tuned knobs


_LOGGED: set = set()


def _note(path, reason: str) -> None:
    key = (str(path), reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning("fag_tvm tuning record %s ignored: %s", path, reason)


@functools.lru_cache(maxsize=64)
def _best_cached(path: str, mtime: float, size: int) -> dict | None:
    return _read_best(Path(path))


def tuned_knobs(spec, target: dict | None = None, shape: dict | None = None, log_dir=None):
    """(knobs, origin) from `<log_dir>/llvm/<spec key>/best.json`, or None (then use the defaults).

    Entries whose metadata does not match this environment, or whose knobs are infeasible, are ignored
    with a logged reason (never applied silently, never dropped silently). With `shape` (a workload or
    OpConfig-like mapping with B, N1, N2, Sq, Skv) the entry of the same shape is used, else the
    nearest shape; without it the entry of the largest workload (most FLOPs) represents the spec."""
    from schedules.llvm import LLVMKnobs, prune

    target = dict(target or _tvm.cpu_target())
    path = family_dir(log_dir or default_log_dir(), spec) / BEST
    try:
        st = path.stat()
    except OSError:
        return None
    doc = _best_cached(str(path), st.st_mtime, st.st_size)
    if doc is None:
        _note(path, "unreadable best.json")
        return None
    if doc.get("format") != FORMAT:
        _note(path, f"format {doc.get('format')!r} != {FORMAT!r}")
        return None
    cur = current_meta(target)
    usable = []
    for e in doc.get("entries", []):
        if e.get("direction") != spec.direction:
            continue
        why = meta_mismatch(e.get("meta", {}), cur)
        if why:
            _note(f"{path}#{e.get('id')}", "; ".join(why))
            continue
        try:
            k = LLVMKnobs(**{f: int(e["knobs"][f]) for f in ALL_KNOBS})
        except (KeyError, TypeError, ValueError):
            _note(f"{path}#{e.get('id')}", "malformed knobs")
            continue
        ok, reason = prune(spec, k, l2=1 << 40)
        if not ok or k.vec != _tvm.vector_lanes(target):
            _note(f"{path}#{e.get('id')}", f"infeasible knobs {k}: {reason}")
            continue
        usable.append((e, k))
    if not usable:
        return None
    if shape is not None:
        sk = _shape_of(shape)

        def dist(e):
            ek = shape_key(e["workload"])
            return sum(abs(math.log(max(1, a)) - math.log(max(1, b))) for a, b in zip(sk, ek))

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


def _shape_of(shape) -> tuple:
    if isinstance(shape, dict):
        return shape_key(shape)
    return tuple(int(getattr(shape, k)) for k in ("B", "N1", "N2", "Sq", "Skv"))


def check_logs(log_dir=None, target: dict | None = None) -> list[dict]:
    """Every best.json entry under `<log_dir>/llvm` with the reasons it would be ignored here
    (`stale` = recorded with another kernel source hash). Used by `fag-tvm tune --check` and the
    stale-log test."""
    from schedules.llvm import LLVMKnobs, prune

    from .kernels.spec import KernelSpec

    base = Path(log_dir or default_log_dir()) / TARGET_DIR
    cur = current_meta(target)
    out = []
    for p in sorted(base.glob(f"*/{BEST}")):
        doc = _read_best(p)
        if doc is None or doc.get("format") != FORMAT:
            out.append({"path": str(p), "id": None, "reasons": ["unreadable or unknown format"], "stale": True})
            continue
        for e in doc.get("entries", []):
            reasons = meta_mismatch(e.get("meta", {}), cur)
            try:
                spec = KernelSpec(**doc["spec"])
                if spec.key("llvm") != p.parent.name:
                    reasons.append(f"family dir {p.parent.name} != spec key {spec.key('llvm')}")
                k = LLVMKnobs(**e["knobs"])
                ok, why = prune(spec, k, l2=1 << 40)
                if not ok:
                    reasons.append(f"knobs infeasible under the current template: {why}")
            except (KeyError, TypeError, ValueError) as exc:
                reasons.append(f"malformed entry: {exc}")
            out.append({"path": str(p), "id": e.get("id"), "direction": e.get("direction"), "reasons": reasons,
                        "stale": any(r.startswith("stale") or "infeasible" in r or "malformed" in r
                                     or "family dir" in r for r in reasons)})
    return out


# ================================================================================================
# meta-schedule components (classes are created lazily: importing this module does not import TVM)


@functools.lru_cache(maxsize=None)
def _ms_classes():
    _tvm.import_tvm()
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    from schedules.llvm import prune

    @derived_object
    class FeasiblePostproc(ms.postproc.PyPostproc):
        """Rejects knob combinations the template's analytic rules call infeasible (nothing is built)."""

        def __init__(self, task: dict):
            super().__init__()
            self.task = task
            self.spec = spec_of(task)

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch) -> bool:
            k = knobs_of_mod(sch.mod)
            return k is not None and prune(self.spec, k)[0]

        def clone(self):
            return FeasiblePostproc(self.task)

    @derived_object
    class MutateKnob(ms.mutator.PyMutator):
        """Moves one sampled knob to a neighbouring candidate value (or, rarely, any other value)."""

        def __init__(self, seed: int = 0):
            super().__init__()
            import random

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

    @derived_object
    class KnobFeatures(ms.feature_extractor.PyFeatureExtractor):
        """One feature row per candidate: the knob vector + analytic features for the workload."""

        def extract_from(self, context, candidates):
            out = []
            task = None
            for c in candidates:
                mod = c.sch.mod
                task = task or task_of_mod(mod)
                k = knobs_of_mod(mod)
                row = knob_features(task, k) if (task and k) else [0.0] * len(FEATURE_NAMES)
                out.append(tvm.runtime.tensor(np.array([row], dtype="float32")))
            return out

    @derived_object
    class DedupXGB(ms.cost_model.PyCostModel):
        """meta-schedule's XGBModel (with KnobFeatures); points already in the database (this run or a
        previous one) score 0 so the evolutionary search does not re-measure them."""

        def __init__(self, xgb, measured: set):
            super().__init__()
            self.xgb = xgb
            self.measured = measured

        def load(self, path):
            self.xgb.load(path)

        def save(self, path):
            self.xgb.save(path)

        def update(self, context, candidates, results):
            self.xgb.update(context, candidates, results)
            for c in candidates:
                k = knobs_of_mod(c.sch.mod)
                if k is not None:
                    self.measured.add(k)

        def predict(self, context, candidates):
            s = np.asarray(self.xgb.predict(context, candidates), dtype="float64")
            for i, c in enumerate(candidates):
                if knobs_of_mod(c.sch.mod) in self.measured:
                    s[i] = 0.0
            return s

    @derived_object
    class ProgressRunner(ms.runner.PyRunner):
        """Runs candidates one at a time through the inner runner (local or RPC), journals each result
        durably the moment it exists, and drives the progress bar."""

        def __init__(self, inner, on_result):
            super().__init__()
            self.inner = inner
            self.on_result = on_result

        def run(self, runner_inputs):
            futs = []
            for inp in runner_inputs:
                r = self.inner.run([inp])[0].result()
                secs = [float(x) for x in r.run_secs] if r.run_secs is not None else None
                err = None if r.error_msg is None else str(r.error_msg)
                self.on_result(knobs_from_tag(os.path.basename(str(inp.artifact_path))), secs, err)
                futs.append(LocalRunnerFuture(res=secs, error_message=None) if secs is not None
                            else LocalRunnerFuture(res=None, error_message=err or "no result"))
            return futs

    @derived_object
    class BestJsonCallback(ms.measure_callback.PyMeasureCallback):
        """After each batch (and after AddToDatabase): rewrite best.json atomically."""

        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.fn()

    return {"FeasiblePostproc": FeasiblePostproc, "MutateKnob": MutateKnob, "KnobFeatures": KnobFeatures,
            "DedupXGB": DedupXGB, "ProgressRunner": ProgressRunner, "BestJsonCallback": BestJsonCallback}


def xgb_model(num_warmup_samples: int = 8, seed: int = 0):
    """meta-schedule's XGBoost cost model with the knob feature extractor."""
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    c = _ms_classes()
    return XGBModel(extractor=c["KnobFeatures"](), num_warmup_samples=num_warmup_samples,
                    num_tuning_cores=_tvm.num_threads(), early_stopping_rounds=50, verbose_eval=0)


# ================================================================================================
# progress bar


class Progress:
    def __init__(self, label: str, total: int, done: int, fl: float, enabled: bool = True, stream=None):
        self.label, self.total, self.done, self.fl = label, total, done, fl
        self.best = None
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def seed_best(self, secs: float | None, knobs) -> None:
        if secs is not None and (self.best is None or secs < self.best[0]):
            self.best = (secs, knobs)

    def update(self, knobs, secs: list[float] | None, err: str | None) -> None:
        self.done += 1
        if secs:
            self.seed_best(_median(secs), knobs)
        if not self.enabled:
            return
        width = 24
        frac = min(1.0, self.done / max(1, self.total))
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        best = (f"best {self.fl / self.best[0] / 1e9:7.1f} GFLOP/s {self.best[1].tag()}" if self.best else "best -")
        last = (f"last {self.fl / _median(secs) / 1e9:6.1f} {knobs.tag() if knobs else '?'}" if secs
                else f"last FAILED ({(err or '').strip().splitlines()[-1][:60] if err else ''})")
        line = (f"tune {self.label} [{bar}] {self.done}/{self.total}  {best}  {last}  "
                f"{time.perf_counter() - self.t0:5.0f}s")
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(200) + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ================================================================================================
# the driver


@contextlib.contextmanager
def _family_lock(fdir: Path):
    fdir.mkdir(parents=True, exist_ok=True)
    lock = fdir / ".lock"
    with open(lock, "w") as lf:
        try:
            fcntl.flock(lf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another tuning run holds {lock}") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()  # no stray files in the committed log folders
            fcntl.flock(lf, fcntl.LOCK_UN)


def _parse_tracker(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--rpc-tracker must be HOST:PORT, got {s!r}")
    return host, int(port)


def tune_workload(w: dict, trials: int, log_dir=None, direction: str = "bwd", target: dict | None = None,
                  rpc_tracker: str | None = None, rpc_key: str | None = None, seed: int = 0,
                  per_iter: int = 8, work_dir: str | None = None, progress: bool = True,
                  number: int = 1, repeat: int = 3, min_repeat_ms: int = 40, build_timeout: float = 120.0,
                  run_timeout: float = 120.0, confirm: int = 3, confirm_rounds: int = 2) -> dict:
    """Tune one workload until its database holds `trials` distinct measured knob points, then confirm
    the `confirm` fastest points and the template default by re-measuring them `confirm_rounds` times,
    interleaved (noise on a shared machine hits all of them alike). Returns the best.json entry."""
    _tvm.set_num_threads()
    _tvm.import_tvm()
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RunnerInput
    from tvm.s_tir.schedule import Schedule

    from schedules.llvm import default_knobs

    target = dict(target or _tvm.cpu_target())
    log_dir = Path(log_dir or default_log_dir())
    task = make_task(w, direction, target)
    spec = spec_of(task)
    fdir = family_dir(log_dir, spec)
    stub = stub_mod(task)
    tgt = tvm.target.Target(target)
    C = _ms_classes()
    fl = flops(task["workload"], direction)
    label = f"{workload_id(task['workload'])} {direction}"

    with _family_lock(fdir), contextlib.ExitStack() as stack:
        for name in (DB_WORKLOAD, DB_RECORD):
            repair_json_lines(fdir / name)
        db = JSONDatabase(path_workload=str(fdir / DB_WORKLOAD), path_tuning_record=str(fdir / DB_RECORD))
        wl = db.commit_workload(stub)
        args_info = ArgInfo.from_prim_func(stub["main"])

        def commit(knobs, secs):
            tr = trace_for_knobs(task, knobs)
            if tr is None:
                return False
            db.commit_tuning_record(TuningRecord(tr, wl, secs if secs else [FAILED_SECS], tgt, args_info))
            return True

        # 1. measurements journaled by an interrupted run but not yet in the database
        ent = [e for e in load_family(fdir) if e["shash"] == _shash_hex(stub)]
        have = list(dict.fromkeys(r["knobs"] for r in ent[0]["records"])) if ent else []  # distinct points
        jpath = fdir / JOURNAL
        recovered = 0
        for j in read_json_lines(jpath):
            if j.get("workload_hash") != _shash_hex(stub):
                continue
            k = knobs_from_tag(j.get("knobs", ""))
            if k is not None and k not in have:
                if commit(k, j.get("run_secs")):
                    have.append(k)
                    recovered += 1
        if recovered:
            log.warning("%s: recovered %d measurement(s) of an interrupted run from %s", label, recovered, jpath)
            print(f"{label}: recovered {recovered} journaled measurement(s) of an interrupted run", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.unlink(jpath)
        n_have = len(have)

        prog = Progress(label, trials, n_have, fl, enabled=progress)
        for e in ([e for e in load_family(fdir) if e["shash"] == _shash_hex(stub)][:1]):
            for r in e["records"]:
                if r["ok"]:
                    prog.seed_best(_median(r["run_secs"]), r["knobs"])

        def on_result(knobs, secs, err):
            _append_journal(jpath, {"workload_hash": _shash_hex(stub), "knobs": knobs_tag(knobs) if knobs else "",
                                    "run_secs": secs, "error": (err or "")[-500:] if secs is None else None,
                                    "time": time.time()})
            prog.update(knobs, secs, err)

        evaluator = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                    enable_cpu_cache_flush=False)
        if rpc_tracker:
            host, port = _parse_tracker(rpc_tracker)
            if not rpc_key:
                raise ValueError("--rpc-tracker needs --rpc-key")
            inner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                               session_timeout_sec=int(run_timeout), session_priority=1),
                evaluator_config=evaluator, f_alloc_argument=functools.partial(ms_alloc_rpc, task),
                f_run_evaluator=ms_run_rpc, max_workers=1)
        else:
            inner = ms.runner.LocalRunner(timeout_sec=run_timeout, evaluator_config=evaluator,
                                          f_alloc_argument=functools.partial(ms_alloc_local, task),
                                          f_run_evaluator=ms_run_local)
        runner = C["ProgressRunner"](inner, on_result)
        art_dir = tempfile.mkdtemp(prefix="fag_tune_")
        stack.callback(shutil.rmtree, art_dir, True)
        builder = ms.builder.LocalBuilder(max_workers=_tvm.cpu_count(), timeout_sec=build_timeout,
                                          f_build=ms_build, f_export=functools.partial(ms_export, art_dir))

        # 2. the template default is always the first record (baseline of the curve and of best.json)
        dk = default_knobs(spec, vec=_tvm.vector_lanes(target))
        if dk not in have and n_have < trials:
            sch = Schedule(stub)
            trace_for_knobs(task, dk).apply_to_schedule(sch, remove_postproc=False)
            br = builder.build([BuilderInput(sch.mod, tgt)])[0]
            if br.error_msg is None:
                rr = runner.run([RunnerInput(br.artifact_path, "cpu", args_info)])[0].result()
                secs = [float(x) for x in rr.run_secs] if rr.run_secs is not None else None
                with contextlib.suppress(OSError):
                    os.unlink(br.artifact_path)
            else:
                secs = None
                on_result(dk, None, str(br.error_msg))
            commit(dk, secs)
            have.append(dk)
        write_best(fdir, target)
        with contextlib.suppress(OSError):
            os.unlink(jpath)

        # 3. meta-schedule: ScheduleFn space, evolutionary search, XGBoost, JSON database
        remaining = trials - len(have)
        if remaining > 0:
            values = space_values(spec, dk.vec)
            measured = set(have)
            xgb = xgb_model(num_warmup_samples=min(8, max(2, per_iter)), seed=seed)
            model = C["DedupXGB"](xgb, measured)
            # warm the model with this workload's earlier records (a resumed run starts informed)
            _pretrain(xgb, task, stub, tgt, fdir)
            space = ms.space_generator.ScheduleFn(
                make_space_fn(values), sch_rules=[], postprocs=[C["FeasiblePostproc"](task)],
                mutator_probs={C["MutateKnob"](seed): 1.0})
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=256, init_measured_ratio=0.25, init_min_unmeasured=32, max_fail_count=8,
                genetic_num_iters=3, genetic_mutate_prob=0.85, genetic_max_fail_count=10, eps_greedy=0.25)
            callbacks = ms.measure_callback.MeasureCallback.create("default") + [
                C["BestJsonCallback"](lambda: write_best(fdir, target))]
            wd = work_dir or str(Path(_work_root()) / f"{fdir.name}-{workload_id(task['workload'])}")
            os.makedirs(wd, exist_ok=True)
            with _quiet_ms_logs(), _no_tensor_intrin():
                ms.tune_tir(stub, tgt, work_dir=wd, max_trials_global=remaining,
                            num_trials_per_iter=min(per_iter, remaining), builder=builder, runner=runner,
                            database=db, cost_model=model, measure_callbacks=callbacks,
                            task_scheduler="round-robin", space=space, strategy=strategy,
                            num_tuning_cores=_tvm.cpu_count(), seed=seed)
        # 4. confirmation: the fastest points and the default, re-measured side by side
        if confirm > 0 and confirm_rounds > 0:
            _confirm(task, stub, fdir, builder, inner, commit, dk, confirm, confirm_rounds, tgt, args_info,
                     label, progress, jpath)
        doc = write_best(fdir, target)
        with contextlib.suppress(OSError):
            os.unlink(jpath)
    for e in doc["entries"]:
        if e["direction"] == direction and e["workload"] == task["workload"]:
            return e
    raise RuntimeError(f"{label}: no successful measurement (see the tuning logs)")


def _confirm(task, stub, fdir, builder, runner, commit, dk, k: int, rounds: int, tgt, args_info, label,
             progress, jpath) -> None:
    """Re-measure the k fastest points and the default `rounds` times each, interleaved (order rotated
    every round); each measurement is an ordinary record. Idempotent: points that already have
    1 + rounds records are not measured again."""
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput
    from tvm.s_tir.schedule import Schedule

    ents = [e for e in load_family(fdir) if e["shash"] == _shash_hex(stub)]
    if not ents:
        return
    agg = aggregate(ents[0]["records"])
    top = sorted(agg, key=lambda x: agg[x]["t"])[:k]
    if dk not in top:
        top.append(dk)
    # the knobs other workloads of this kernel family chose: measured here too, so the build path can pick
    # one setting for the whole family from measurements (tuned_knobs without a shape)
    for e in (_read_best(fdir / BEST) or {}).get("entries", []):
        if e.get("direction") == task["direction"] and e.get("workload") != task["workload"]:
            sib = LLVMKnobs_from(e["knobs"])
            if sib not in top and sib.vec == dk.vec and trace_for_knobs(task, sib) is not None:
                top.append(sib)
    agg = {x: agg.get(x, {"n": 0, "t": float("inf")}) for x in top}
    need = [x for x in top if agg[x]["n"] < rounds]  # search points have 1 record, confirmed ones 1 + rounds
    if not need:
        return
    mods = []
    for x in top:
        sch = Schedule(stub)
        trace_for_knobs(task, x).apply_to_schedule(sch, remove_postproc=False)
        mods.append(BuilderInput(sch.mod, tgt))
    built = builder.build(mods)
    arts = {x: b.artifact_path for x, b in zip(top, built) if b.error_msg is None}
    try:
        for r in range(rounds):
            order = top[r % len(top):] + top[:r % len(top)]
            for x in order:
                if x not in arts:
                    continue
                res = runner.run([RunnerInput(arts[x], "cpu", args_info)])[0].result()
                secs = [float(v) for v in res.run_secs] if res.run_secs is not None else None
                _append_journal(jpath, {"workload_hash": _shash_hex(stub), "knobs": knobs_tag(x), "run_secs": secs,
                                        "error": None if secs else str(res.error_msg)[-500:], "time": time.time(),
                                        "confirm": True})
                if secs:
                    commit(x, secs)
    finally:
        for a in arts.values():
            with contextlib.suppress(OSError):
                os.unlink(a)
    if progress:
        agg = aggregate([e for e in load_family(fdir) if e["shash"] == _shash_hex(stub)][0]["records"])
        parts = [f"{x.tag()}{' (default)' if x == dk else ''} {agg[x]['t'] * 1e3:.3f} ms" for x in top if x in agg]
        print(f"confirm {label}: " + ", ".join(parts), file=sys.stderr, flush=True)


def _shash_hex(mod) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def _work_root() -> str:
    from .build import cache_dir

    return str(cache_dir() / "tune_work")


@contextlib.contextmanager
def _no_tensor_intrin():
    """`TuneContext.__init__` imports tvm.s_tir.tensor_intrin, which parses ~250 TVMScript tensorize
    intrinsics (CUDA/x86/ARM/...: ~20 s on this machine). The knob space never tensorizes, so in this
    process a placeholder module stands in for it while the tuning context is created (removed after;
    the build workers never import it since f_build is ours)."""
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    ph = types.ModuleType(name)
    ph.__fag_tvm_placeholder__ = True
    sys.modules[name] = ph
    try:
        yield
    finally:
        if sys.modules.get(name) is ph:
            del sys.modules[name]
            import tvm.s_tir as _s

            if getattr(_s, "tensor_intrin", None) is ph:
                delattr(_s, "tensor_intrin")


@contextlib.contextmanager
def _quiet_ms_logs():
    """meta-schedule logs every iteration at INFO to the console; keep the progress bar readable."""
    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    old = lg.level
    if os.environ.get("FAG_TVM_TUNE_VERBOSE") != "1":
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)


def _pretrain(xgb, task: dict, stub, tgt, fdir: Path) -> None:
    """Feed the workload's existing records to the XGBoost model (resumed runs)."""
    from tvm.s_tir.meta_schedule import TuneContext
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import RunnerResult
    from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate
    from tvm.s_tir.schedule import Schedule

    ents = [e for e in load_family(fdir) if e["shash"] == _shash_hex(stub)]
    recs = [r for r in (ents[0]["records"] if ents else []) if r["ok"]]
    if len(recs) < 2:
        return
    ai = ArgInfo.from_prim_func(stub["main"])
    cands, res = [], []
    for r in recs:
        tr = trace_for_knobs(task, r["knobs"])
        if tr is None:
            continue
        sch = Schedule(stub)
        tr.apply_to_schedule(sch, remove_postproc=False)
        cands.append(MeasureCandidate(sch, ai))
        res.append(RunnerResult(r["run_secs"], None))
    with _no_tensor_intrin():
        ctx = TuneContext(mod=stub, target=tgt, task_name="main")
    xgb.update(ctx, cands, res)


# ================================================================================================
# CLI


def _cmd_tune(args: argparse.Namespace) -> int:
    from .workloads import load_workloads

    if args.target != "llvm":
        print(f"target {args.target!r}: only llvm can be tuned here", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir()
    if args.check:
        rows = check_logs(log_dir)
        bad = [r for r in rows if r["reasons"]]
        for r in rows:
            state = "STALE" if r["stale"] else ("ignored" if r["reasons"] else "ok")
            print(f"{state:8s} {Path(r['path']).parent.name} {r['id']} {r.get('direction', '')}"
                  + ("".join(f"\n         - {x}" for x in r["reasons"])))
        print(f"{len(rows)} entries, {sum(r['stale'] for r in rows)} stale, {len(bad)} not applicable here")
        return 1 if any(r["stale"] for r in rows) else 0
    if not args.workload:
        print("--workload is required (S1..S9, a JSON object/list or a JSON file)", file=sys.stderr)
        return 2
    if args.trials is None:
        print("--trials is required", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workloads = load_workloads(args.workload)
    dirs = ["bwd", "fwd"] if args.direction == "both" else [args.direction]
    rows = []
    for w in workloads:
        for d in dirs:
            t0 = time.perf_counter()
            e = tune_workload(w, args.trials, log_dir, direction=d, rpc_tracker=args.rpc_tracker,
                              rpc_key=args.rpc_key, seed=args.seed, per_iter=args.per_iter, confirm=args.confirm,
                              work_dir=args.work_dir, progress=not args.no_progress)
            rows.append(e)
            sp = f"  {e['speedup_vs_default']:.2f}x vs default ({e['default_ms']:.2f} ms)" if "default_ms" in e else ""
            print(f"{e['id']} {d}: chosen {e['kernel']} {e['run_ms']:.3f} ms = {e['gflops']:.1f} GFLOP/s "
                  f"({e['trials']} points, {e['records']} records){sp}  [{time.perf_counter() - t0:.0f} s]")
    print(f"records and best.json under {log_dir / TARGET_DIR}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    return report_main(args)


def add_tuning_commands(sub) -> None:
    """Register `tune` and `report` on the `fag-tvm` subparsers."""
    s = sub.add_parser("tune", help="meta-schedule tuning of the kernel knobs for workloads (records -> tuning_logs)",
                       description=__doc__.split("\n\n")[0])
    s.add_argument("--target", default="llvm", choices=("llvm",))
    s.add_argument("--workload", help="S1..S9, a comma list of them, a JSON object/list or a JSON file")
    s.add_argument("--trials", type=int, help="distinct knob points to measure per workload, counting those already "
                                              "in the database (a resumed run only measures the missing ones; the "
                                              "template default is one of them)")
    s.add_argument("--log-dir", help="tuning log root (default: tuning_logs of the checkout, or "
                                     "$FAG_TVM_TUNING_LOGS); records go to <log-dir>/llvm/<kernel family>/")
    s.add_argument("--direction", choices=("bwd", "fwd", "both"), default="bwd")
    s.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: measure on its servers")
    s.add_argument("--rpc-key", help="device key of the RPC servers")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-iter", type=int, default=8, help="candidates per search iteration (default 8)")
    s.add_argument("--confirm", type=int, default=3,
                   help="re-measure the N fastest points and the default side by side after the search (default 3; "
                        "0: off). best.json keeps the default unless a point is confirmed >2%% faster")
    s.add_argument("--work-dir", help="meta-schedule work dir for its logs (default: under the kernel cache)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--check", action="store_true",
                   help="list best.json entries that do not apply here (stale source hash, other TVM/CPU); "
                        "exit 1 if any is stale")
    s.set_defaults(fn=_cmd_tune)
    s = sub.add_parser("report", help="tuning curves, default-vs-tuned table and XGBoost model quality (PNG + HTML)")
    s.add_argument("--log-dir", help="tuning log root (default: tuning_logs)")
    s.add_argument("--bench", help="JSON of benchmarks/tuned_vs_default.py (default: "
                                   "bench_results/tuned_vs_default.json if present)")
    s.add_argument("--out", default="tuning_report", help="output folder (PNG, HTML, JSON)")
    s.add_argument("--no-model", action="store_true", help="skip the XGBoost held-out evaluation")
    s.set_defaults(fn=_cmd_report)
