"""One tuning run of one workload on one target: resume, baseline, meta-schedule search, confirmation.

    1. resume   journal entries of an interrupted run missing from the database are committed first
    2. baseline the template default is measured first (the curve's and best.json's reference)
    3. search   meta-schedule (ScheduleFn space, evolutionary search, XGBoost) until the database holds
                `trials` distinct points of this workload
    4. confirm  the fastest points and the default are re-measured side by side, interleaved (noise on a
                shared machine hits all alike); best.json keeps the default unless a point is >2% faster

Every measurement is fsync-appended to the journal the moment it exists, so a run killed at any point
(SIGKILL) loses nothing; best.json is rewritten atomically after every batch."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import _tvm, targets
from ..core.files import file_lock
from ..targets.base import Target
from ..workloads import flops, workload_id
from . import cost_model, space
from .builder import ms_build, ms_export, tag_of_artifact
from .database import DB_RECORD, DB_WORKLOAD, FAILED_SECS, JOURNAL, journal_append, journal_read, read_family
from .database import repair_json_lines
from .ms_env import no_tensor_intrin, quiet_ms_logs
from .progress import Progress
from .records import BEST, aggregate, default_log_dir, family_dir, knobs_from_tag, knobs_tag, read_best, write_best
from .task import make_task, spec_of, structural_hash, stub_mod

log = logging.getLogger("fag_tvm.tuning")


@contextlib.contextmanager
def family_lock(fdir: Path):
    """One tuning run per kernel family at a time (a second one fails at once, saying so)."""
    fdir.mkdir(parents=True, exist_ok=True)
    lock = fdir / ".lock"
    try:
        with file_lock(lock, timeout=0):
            yield
    except TimeoutError:
        raise RuntimeError(f"another tuning run holds {lock}") from None
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # no stray files in the committed log folders


def parse_tracker(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--rpc-tracker must be HOST:PORT, got {s!r}")
    return host, int(port)


class _Session:
    """The state of one tuning run, shared explicitly by its callbacks (never through module globals)."""

    def __init__(self, t: Target, task: dict, fdir: Path, db, wl, tgt, args_info, progress: Progress | None):
        from tvm.s_tir.meta_schedule.database import TuningRecord

        self.t, self.task, self.fdir = t, task, fdir
        self.db, self.wl, self.tgt, self.args_info = db, wl, tgt, args_info
        self.stub = wl.mod
        self.shash = structural_hash(self.stub)
        self.progress = progress
        self._record = TuningRecord

    def commit(self, knobs, secs) -> bool:
        tr = space.trace_for_knobs(self.t, self.task, self.stub, knobs)
        if tr is None:
            return False
        self.db.commit_tuning_record(self._record(tr, self.wl, secs if secs else [FAILED_SECS], self.tgt,
                                                  self.args_info))
        return True

    def records(self) -> list[dict]:
        for e in read_family(self.fdir, self.t):
            if e["shash"] == self.shash:
                return e["records"]
        return []

    def journal(self, knobs, secs, err, **extra) -> None:
        journal_append(self.fdir, {"workload_hash": self.shash, "knobs": knobs_tag(knobs) if knobs else "",
                                   "run_secs": secs, "error": (err or "")[-500:] if secs is None else None,
                                   "time": time.time(), **extra})

    def on_result(self, knobs, secs, err) -> None:
        self.journal(knobs, secs, err)
        self.progress.update(knobs, secs, err)


def _progress_runner(sess: _Session, inner):
    """A runner that measures candidates one at a time through `inner` (local, RPC or a model), journals
    each result durably the moment it exists, and drives the progress bar."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    @derived_object
    class ProgressRunner(ms.runner.PyRunner):
        def __init__(self):
            super().__init__()

        def run(self, runner_inputs):
            futs = []
            for inp in runner_inputs:
                r = inner.run([inp])[0].result()
                secs = [float(x) for x in r.run_secs] if r.run_secs is not None else None
                err = None if r.error_msg is None else str(r.error_msg)
                sess.on_result(knobs_from_tag(sess.t, tag_of_artifact(inp.artifact_path)), secs, err)
                futs.append(LocalRunnerFuture(res=secs, error_message=None) if secs is not None
                            else LocalRunnerFuture(res=None, error_message=err or "no result"))
            return futs

    return ProgressRunner()


def _best_json_callback(fn):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class BestJsonCallback(ms.measure_callback.PyMeasureCallback):
        """After each batch: rewrite best.json atomically."""

        def __init__(self):
            super().__init__()

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            fn()

    return BestJsonCallback()


def _measure_one(sess: _Session, builder, runner, knobs) -> list[float] | None:
    """Build and measure one knob point outside the search (baseline); returns run seconds or None."""
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput
    from tvm.s_tir.schedule import Schedule

    sch = Schedule(sess.stub)
    tr = space.trace_for_knobs(sess.t, sess.task, sess.stub, knobs)
    if tr is None:
        raise ValueError(f"{knobs.tag()} is outside {sess.t.name}'s tuning space (the template must include it)")
    tr.apply_to_schedule(sch, remove_postproc=False)
    br = builder.build([BuilderInput(sch.mod, sess.tgt)])[0]
    if br.error_msg is not None:
        sess.on_result(knobs, None, str(br.error_msg))
        return None
    rr = runner.run([RunnerInput(br.artifact_path, sess.t.device_type, sess.args_info)])[0].result()
    with contextlib.suppress(OSError):
        os.unlink(br.artifact_path)
    return [float(x) for x in rr.run_secs] if rr.run_secs is not None else None


def tune_workload(w: dict, trials: int, log_dir: Any = None, direction: str = "bwd", target: str = "llvm",
                  rpc_tracker: str | None = None, rpc_key: str | None = None, seed: int = 0, per_iter: int = 8,
                  work_dir: str | None = None, progress: bool = True, number: int = 1, repeat: int = 3,
                  min_repeat_ms: int = 40, build_timeout: float = 120.0, run_timeout: float = 120.0,
                  confirm: int = 3, confirm_rounds: int = 2) -> dict:
    """Tune one workload until its database holds `trials` distinct measured knob points, then confirm
    the `confirm` fastest points and the template default. Returns the workload's best.json entry."""
    _tvm.set_num_threads()
    tvm = _tvm.import_tvm()
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    t = targets.get(target)
    if t.timing == "none":
        from ..errors import unsupported

        raise unsupported("--target", f"tuning {t.name}: a CPU simulation of other hardware has no time to tune on")
    hw = t.hw()
    log_dir = Path(log_dir or default_log_dir())
    task = make_task(t, w, direction, hw)
    spec = spec_of(task)
    fdir = family_dir(log_dir, t, spec)
    stub = stub_mod(task)
    tgt = tvm.target.Target(t.tvm_target(hw))
    fl = flops(task["workload"], direction)
    label = f"{workload_id(task['workload'])} {direction}"
    options = {"number": number, "repeat": repeat, "min_repeat_ms": min_repeat_ms, "run_timeout": run_timeout}
    if rpc_tracker:
        if not rpc_key:
            raise ValueError("--rpc-tracker needs --rpc-key")
        options.update(rpc_tracker=parse_tracker(rpc_tracker), rpc_key=rpc_key)

    with family_lock(fdir), contextlib.ExitStack() as stack:
        for name in (DB_WORKLOAD, DB_RECORD):
            if repair_json_lines(fdir / name):
                log.warning("%s: dropped torn line(s) left by an interrupted run", fdir / name)
        db = JSONDatabase(path_workload=str(fdir / DB_WORKLOAD), path_tuning_record=str(fdir / DB_RECORD))
        wl = db.commit_workload(stub)
        sess = _Session(t, task, fdir, db, wl, tgt, ArgInfo.from_prim_func(stub["main"]), None)

        def keep_measured(exc_type, exc, tb) -> bool:
            """An interrupted run (Ctrl-C, an error) still leaves best.json for what it had measured."""
            if exc_type is not None and sess.records():
                with contextlib.suppress(Exception):
                    write_best(t, fdir, hw)
            return False
        stack.push(keep_measured)

        # 1. measurements journaled by an interrupted run but not yet in the database
        have = list(dict.fromkeys(r["knobs"] for r in sess.records()))  # distinct points, measurement order
        recovered = 0
        for j in journal_read(fdir):
            if j.get("workload_hash") != sess.shash:
                continue
            k = knobs_from_tag(t, j.get("knobs", ""))
            if k is not None and k not in have and sess.commit(k, j.get("run_secs")):
                have.append(k)
                recovered += 1
        if recovered:
            print(f"{label}: recovered {recovered} journaled measurement(s) of an interrupted run", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.unlink(fdir / JOURNAL)
        prog = sess.progress = Progress(label, trials, len(have), fl, enabled=progress)
        stack.callback(prog.close)
        for r in sess.records():
            if r["ok"]:
                prog.seed_best(float(sorted(r["run_secs"])[len(r["run_secs"]) // 2]), r["knobs"])

        inner = t.make_runner(task, options)
        runner = _progress_runner(sess, inner)
        art_dir = tempfile.mkdtemp(prefix="fag_tune_")
        stack.callback(shutil.rmtree, art_dir, True)
        builder = ms.builder.LocalBuilder(max_workers=_tvm.cpu_count(), timeout_sec=build_timeout,
                                          f_build=ms_build, f_export=functools.partial(ms_export, art_dir))

        # 2. the template default is always the first record
        dk = t.default_knobs(spec, hw)
        if dk not in have and len(have) < trials:
            sess.commit(dk, _measure_one(sess, builder, runner, dk))
            have.append(dk)
        write_best(t, fdir, hw)
        with contextlib.suppress(OSError):
            os.unlink(fdir / JOURNAL)

        # 3. meta-schedule: ScheduleFn space, evolutionary search, XGBoost, JSON database
        remaining = trials - len(have)
        if remaining > 0:
            values = space.space_values(t, task)
            xgb = cost_model.xgb_model(t, num_warmup_samples=min(8, max(2, per_iter)), seed=seed)
            model = cost_model.dedup_model(t, xgb, set(have))
            cost_model.pretrain(t, xgb, task, stub, tgt, sess.records())
            msc = space.ms_classes()
            sp = ms.space_generator.ScheduleFn(
                space.make_space_fn(values), sch_rules=[], postprocs=[msc["FeasiblePostproc"](t.name, task)],
                mutator_probs={msc["MutateKnob"](seed): 1.0})
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=256, init_measured_ratio=0.25, init_min_unmeasured=32, max_fail_count=8,
                genetic_num_iters=3, genetic_mutate_prob=0.85, genetic_max_fail_count=10, eps_greedy=0.25)
            callbacks = ms.measure_callback.MeasureCallback.create("default") + [
                _best_json_callback(lambda: write_best(t, fdir, hw))]
            wd = work_dir or str(_work_root() / f"{fdir.name}-{workload_id(task['workload'])}")
            os.makedirs(wd, exist_ok=True)
            with quiet_ms_logs(), no_tensor_intrin():
                ms.tune_tir(stub, tgt, work_dir=wd, max_trials_global=remaining,
                            num_trials_per_iter=min(per_iter, remaining), builder=builder, runner=runner,
                            database=db, cost_model=model, measure_callbacks=callbacks,
                            task_scheduler="round-robin", space=sp, strategy=strategy,
                            num_tuning_cores=_tvm.cpu_count(), seed=seed)
        # 4. confirmation: the fastest points and the default, re-measured side by side
        if confirm > 0 and confirm_rounds > 0:
            _confirm(sess, builder, inner, dk, confirm, confirm_rounds, label, progress)
        doc = write_best(t, fdir, hw)
        with contextlib.suppress(OSError):
            os.unlink(fdir / JOURNAL)
    for e in doc["entries"]:
        if e["direction"] == direction and e["workload"] == task["workload"] and e["hw_tag"] == t.hw_tag(hw):
            return e
    raise RuntimeError(f"{label}: no successful measurement (see the tuning logs)")


def _work_root() -> Path:
    from ..jit import cache_dir

    return cache_dir() / "tune_work"


def _confirm(sess: _Session, builder, runner, dk, k: int, rounds: int, label: str, progress: bool) -> None:
    """Re-measure the k fastest points and the default `rounds` times each, interleaved (order rotated
    every round); each measurement is an ordinary record. Idempotent: points that already have
    1 + rounds records are not measured again. The knobs other workloads of the family chose are measured
    too, so the build path can pick one setting for the whole family from measurements."""
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput
    from tvm.s_tir.schedule import Schedule

    t, task = sess.t, sess.task
    agg = aggregate(sess.records())
    if not agg:
        return
    top = sorted(agg, key=lambda x: agg[x]["t"])[:k]
    if dk not in top:
        top.append(dk)
    for e in (read_best(sess.fdir / BEST) or {}).get("entries", []):
        if e.get("direction") == task["direction"] and e.get("workload") != task["workload"] and \
                e.get("hw_tag") == t.hw_tag(task["hw"]):
            try:
                sib = t.knobs_from_dict(e["knobs"])
            except (KeyError, TypeError, ValueError):
                continue
            if sib not in top and space.trace_for_knobs(t, task, sess.stub, sib) is not None:
                top.append(sib)
    need = [x for x in top if agg.get(x, {"n": 0})["n"] < rounds]
    if not need:
        return
    mods = []
    for x in top:
        sch = Schedule(sess.stub)
        space.trace_for_knobs(t, task, sess.stub, x).apply_to_schedule(sch, remove_postproc=False)
        mods.append(BuilderInput(sch.mod, sess.tgt))
    built = builder.build(mods)
    arts = {x: b.artifact_path for x, b in zip(top, built) if b.error_msg is None}
    try:
        for r in range(rounds):
            for x in top[r % len(top):] + top[:r % len(top)]:
                if x not in arts:
                    continue
                res = runner.run([RunnerInput(arts[x], t.device_type, sess.args_info)])[0].result()
                secs = [float(v) for v in res.run_secs] if res.run_secs is not None else None
                sess.journal(x, secs, None if secs else str(res.error_msg), confirm=True)
                if secs:
                    sess.commit(x, secs)
    finally:
        for a in arts.values():
            with contextlib.suppress(OSError):
                os.unlink(a)
    if progress:
        agg = aggregate(sess.records())
        parts = [f"{x.tag()}{' (default)' if x == dk else ''} {agg[x]['t'] * 1e3:.3f} ms" for x in top if x in agg]
        print(f"confirm {label}: " + ", ".join(parts), file=sys.stderr, flush=True)
