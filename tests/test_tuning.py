"""Tuning workflow (fag_tvm.tune, `fag-tvm tune/compile/report`): meta-schedule over the shipped
template's knobs, crash safety (a deterministic interrupted-run recovery and a real SIGKILL), the build
path applying records (and the tuned kernels computing the right thing), RPC measurement, the committed
logs read by the loader itself, stale logs.

CI-sized: one small workload (B=1, N=2, S=256, D=64, causal) and few trials (one real kernel build per
trial). No assertion depends on timing."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fag_tvm
from fag_tvm import jit, targets
from fag_tvm.core.spec import KernelSpec
from fag_tvm.testing import rel_err
from fag_tvm.tune import database as DB
from fag_tvm.tune import records as R
from fag_tvm.tune import task as TK
from fag_tvm.workloads import SUITE, random_call

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tuning")]  # one worker: the module fixture tunes once
ROOT = Path(__file__).resolve().parent.parent
LLVM = targets.get("llvm")
SMALL = {"B": 1, "N1": 2, "N2": 2, "Sq": 256, "Skv": 256, "D": 64, "Dv": 64, "input_layout": "BNSD",
         "dtype": "fp32", "sparse_mode": 3}
TRIALS = 6


def _env(**kw) -> dict:
    env = dict(os.environ)
    env.setdefault("TVM_NUM_THREADS", "2")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _tune_cmd(log_dir, trials, *extra, workload=SMALL) -> list[str]:
    # --confirm 0: every record is a search trial here (the confirmation re-measurements add duplicates)
    return [sys.executable, "-m", "fag_tvm.cli", "tune", "--workload", json.dumps(workload), "--trials",
            str(trials), "--log-dir", str(log_dir), "--work-dir", str(Path(log_dir).parent / "ms_work"),
            "--confirm", "0", "--no-progress", *extra]


def _spec(w=SMALL) -> KernelSpec:
    return TK.task_spec(LLVM, w)


def _family(log_dir) -> Path:
    return R.family_dir(log_dir, LLVM, _spec())


def _records(log_dir) -> list[dict]:
    """Records of SMALL's current workload in the database (measurement order), read without TVM."""
    task = TK.make_task(LLVM, SMALL)
    for e in DB.read_family(_family(log_dir), LLVM.knobs_from_dict):
        if e["task"] == task:
            return e["records"]
    return []


def _lines(path: Path) -> int:
    try:
        return sum(1 for x in path.read_bytes().split(b"\n") if x.strip())
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------------
# fast unit checks


def test_space_is_the_shipped_template():
    """The space samples exactly the template's knob values; feasibility = the target's prune."""
    from fag_tvm.tune import space as SP

    task = TK.make_task(LLVM, SUITE["S2"])
    spec, hw = TK.spec_of(task), task["hw"]
    vals = SP.space_values(LLVM, task)
    cs = LLVM.candidate_space(spec, hw)
    for k, v in vals.items():
        assert set(v) <= set(cs[k]) and v, k
        assert all(x >= 2 for x in v) or k == "nr"  # nr=1 is an annotation value, not a loop factor
    d = LLVM.default_knobs(spec, hw)
    assert all(getattr(d, k) in v for k, v in vals.items())
    stub = TK.stub_mod(task)
    tr = SP.trace_for_knobs(LLVM, task, stub, d)
    from tvm.s_tir.schedule import Schedule

    sch = Schedule(stub)
    tr.apply_to_schedule(sch, remove_postproc=False)
    assert SP.knobs_of_mod(LLVM, sch.mod) == d
    # the TVM-free decoder reads the same knobs from the trace's JSON form
    as_json = json.loads(json.dumps(tr.as_json(), default=lambda o: getattr(o, "value", str(o))))
    assert DB.decode_knob_values(as_json) == {k: getattr(d, k) for k in vals}
    assert len(LLVM.features(spec, task["workload"], d, hw)) == len(LLVM.feature_names)
    # the stub identity keys records per (target, spec, workload, source, TVM, hardware)
    assert TK.task_of_mod(stub) == task
    assert TK.structural_hash(stub) != TK.structural_hash(TK.stub_mod(TK.make_task(LLVM, SUITE["S8"])))


def test_torn_database_line_is_repaired(tmp_path):
    p = tmp_path / "database_tuning_record.json"
    p.write_bytes(b'[0, ["a"]]\n[1, ["b"]]\n[0, ["tr')  # writer killed mid-line
    from fag_tvm.core.files import read_json_lines

    assert [x[0] for x in read_json_lines(p)] == [0, 1]
    assert DB.repair_json_lines(p) == 1
    assert p.read_bytes() == b'[0, ["a"]]\n[1, ["b"]]\n'


def test_best_json_fifo_never_blocks(tmp_path, monkeypatch):
    """A best.json that is a FIFO (or a folder) is ignored with a reason; a build never blocks on it."""
    spec = _spec()
    fam = R.family_dir(tmp_path, LLVM, spec)
    fam.mkdir(parents=True)
    os.mkfifo(fam / R.BEST)
    monkeypatch.setenv("FAG_TVM_TUNING_LOGS", str(tmp_path))
    t0 = time.time()
    knobs, origin = jit.knobs_for(LLVM, spec)
    assert origin == "default" and knobs == LLVM.default_knobs(spec, LLVM.hw())
    assert time.time() - t0 < 60  # generous: a blocking open would hang forever
    os.unlink(fam / R.BEST)
    os.mkdir(fam / R.BEST)
    assert jit.knobs_for(LLVM, spec)[1] == "default"


# ------------------------------------------------------------------------------------------------
# tune -> records -> compile uses them; crash safety


@pytest.fixture(scope="session")
def tuned(tmp_path_factory):
    """`fag-tvm tune --trials 6` to completion (session scope: tuned once per worker)."""
    base = tmp_path_factory.mktemp("tune")
    log_dir = base / "logs"
    r = subprocess.run(_tune_cmd(log_dir, TRIALS), capture_output=True, text=True, env=_env(), timeout=600,
                       cwd=str(base))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"log_dir": log_dir, "fam": _family(log_dir), "out": r.stdout + r.stderr}


def test_tuning_records_and_best_json(tuned):
    recs = _records(tuned["log_dir"])
    assert len(recs) == TRIALS and all(r["ok"] for r in recs), [r["knobs"] for r in recs]
    tags = [R.knobs_tag(r["knobs"]) for r in recs]
    assert len(set(tags)) == len(tags), "a point was measured twice"
    assert all(math.isfinite(s) and s > 0 for r in recs for s in r["run_secs"])
    assert not (tuned["fam"] / DB.JOURNAL).exists() and not (tuned["fam"] / ".lock").exists()
    best = json.loads((tuned["fam"] / R.BEST).read_text())
    (e,) = best["entries"]
    assert e["trials"] == TRIALS == e["records"] and e["default_ms"] > 0
    assert best["format"] == TK.FORMAT and e["meta"]["source_hash"] == LLVM.source_hash()
    for k in ("fag_tvm_version", "tvm_version", "machine", "date", "source_hash", "hw"):
        assert e["meta"].get(k), k
    # the fastest record; the default stays chosen unless beaten by more than the margin
    fastest = min(recs, key=lambda r: R._median(r["run_secs"]))
    assert e["fastest_ms"] == pytest.approx(R._median(fastest["run_secs"]) * 1e3)
    assert e["fastest_knobs"] == vars(fastest["knobs"])
    if e["knobs"] == e["default_knobs"]:
        assert e["default_ms"] <= e["fastest_ms"] * (1 + R.MARGIN)
    else:
        assert e["knobs"] == e["fastest_knobs"] and e["default_ms"] > e["fastest_ms"] * (1 + R.MARGIN)


def test_interrupted_run_is_recovered_from_the_journal(tuned, tmp_path):
    """Deterministic crash: the last 3 measurements exist only in the journal (as when the process dies
    between the journal append and the database commit). A resumed run commits them with their original
    timings and measures nothing again."""
    log_dir = tmp_path / "logs"
    shutil.copytree(tuned["log_dir"], log_dir)
    fam = _family(log_dir)
    recs = _records(log_dir)
    lines = (fam / DB.DB_RECORD).read_bytes().splitlines(keepends=True)
    (fam / DB.DB_RECORD).write_bytes(b"".join(lines[:-3]) + lines[-3][:25])  # + a torn line
    shash = DB.decode_task(json.loads((fam / DB.DB_WORKLOAD).read_text().splitlines()[0]))[0]
    for r in recs[-3:]:
        DB.journal_append(fam, {"workload_hash": shash, "knobs": R.knobs_tag(r["knobs"]), "run_secs": r["run_secs"],
                                "error": None, "time": 0})
    r2 = subprocess.run(_tune_cmd(log_dir, TRIALS), capture_output=True, text=True, env=_env(), timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "recovered 3 journaled measurement(s)" in r2.stdout + r2.stderr
    after = _records(log_dir)
    assert [R.knobs_tag(x["knobs"]) for x in after] == [R.knobs_tag(x["knobs"]) for x in recs]
    for a, b in zip(after, recs):
        assert a["run_secs"] == pytest.approx(b["run_secs"])  # original timings, nothing re-measured
    assert not (fam / DB.JOURNAL).exists()


def test_sigkill_mid_run_loses_nothing(tmp_path):
    """A real SIGKILL at an arbitrary moment: whatever had completed is in the database afterwards (from the
    database or the journal), nothing is measured twice, best.json is always whole."""
    log_dir = tmp_path / "logs"
    fam = _family(log_dir)
    with open(tmp_path / "run1.log", "w") as out1:
        p = subprocess.Popen(_tune_cmd(log_dir, 4), stdout=out1, stderr=subprocess.STDOUT, env=_env(),
                             start_new_session=True)
        deadline = time.time() + 300
        # kill once the search is under way: best.json written (after the default's record) and one more
        # measurement done (the default's own measurement is journaled + recorded before best.json exists)
        while time.time() < deadline and p.poll() is None and not (
                (fam / R.BEST).exists() and _lines(fam / DB.DB_RECORD) + _lines(fam / DB.JOURNAL) >= 2):
            time.sleep(0.05)
        assert p.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    completed = {j["knobs"] for j in DB.journal_read(fam) if j.get("run_secs")}
    completed |= {R.knobs_tag(r["knobs"]) for r in _records(log_dir)}
    assert completed, "nothing had completed before the kill"
    json.loads((fam / R.BEST).read_text())  # written atomically: always whole
    r2 = subprocess.run(_tune_cmd(log_dir, 4), capture_output=True, text=True, env=_env(), timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    tags = [R.knobs_tag(r["knobs"]) for r in _records(log_dir)]
    assert len(tags) == 4 and len(set(tags)) == 4 and completed <= set(tags)


def test_compile_and_jit_use_the_tuned_record_and_compute_correctly(tuned, tmp_path, monkeypatch, caplog):
    log_dir, fam = tuned["log_dir"], tuned["fam"]
    e = json.loads((fam / R.BEST).read_text())["entries"][0]
    spec = _spec()
    hw = LLVM.hw()
    # AOT: `fag-tvm compile` takes the knobs from the record
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-m", "fag_tvm.cli", "compile", "--target", "llvm", "--workloads",
                        json.dumps(SMALL), "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env=_env(FAG_TVM_TUNING_LOGS=log_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    (k,) = [x for x in man["artifacts"][0]["kernels"] if x["spec"]["direction"] == "bwd"]
    assert k["knobs"] == e["knobs"] and k["entry"].startswith(e["kernel"])
    assert k["knobs_origin"].startswith("tuned:") and str(fam) in k["knobs_origin"]

    # the choice follows the record: point best.json at another measured, non-default record
    recs = [x for x in _records(log_dir) if x["ok"]]
    other = next(x["knobs"] for x in recs if vars(x["knobs"]) not in (e["knobs"], e["default_knobs"]))
    alt = tmp_path / "alt"
    shutil.copytree(log_dir, alt)
    afam = R.family_dir(alt, LLVM, spec)
    doc = json.loads((afam / R.BEST).read_text())
    doc["entries"][0]["knobs"] = vars(other)
    (afam / R.BEST).write_text(json.dumps(doc))
    monkeypatch.setenv("FAG_TVM_TUNING_LOGS", str(alt))
    knobs, origin = jit.knobs_for(LLVM, spec)
    assert knobs == other and origin.startswith("tuned:")
    # ... and the JIT kernel built from the record computes the right gradients (vs the float64 reference)
    jit.clear_memory_cache()
    a = random_call(SMALL, seed=3)
    kw = dict(head_num=2, input_layout="BNSD", atten_mask=fag_tvm.masks.compressed_causal_mask(), sparse_mode=3,
              scale_value=0.125)
    g = fag_tvm.flash_attention_score_grad(a["query"], a["key"], a["value"], a["dy"], **kw)
    gr = fag_tvm.reference.flash_attention_score_grad(a["query"], a["key"], a["value"], a["dy"], **kw)
    assert jit.kernel(LLVM, spec).knobs == other
    for x, y in zip(g[:3], gr[:3]):
        assert rel_err(x, y) <= 2e-5
    jit.clear_memory_cache()

    # a record whose metadata does not match is ignored with a logged reason
    for field, value, needle in (("source_hash", "0" * 64, "stale"), ("machine", "Some Other CPU", "measured on"),
                                 ("tvm_version", "0.0.0", "TVM version"), ("hw", {"kind": "llvm", "mcpu": "x86-64"},
                                                                            "target mcpu")):
        d2 = json.loads(json.dumps(doc))
        d2["entries"][0]["meta"][field] = value
        (afam / R.BEST).write_text(json.dumps(d2))
        caplog.clear()
        with caplog.at_level("WARNING", logger="fag_tvm.tuning"):
            knobs, origin = jit.knobs_for(LLVM, spec)
        assert origin == "default" and knobs == LLVM.default_knobs(spec, hw)
        assert any(needle in rec.getMessage() for rec in caplog.records), [x.getMessage() for x in caplog.records]


def test_report_reads_records(tuned, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fag_tvm.cli", "report", "--log-dir", str(tuned["log_dir"]),
                        "--out", str(tmp_path / "rep"), "--no-model"], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    (c,) = rep["curves"]
    assert len(c["gflops"]) == TRIALS and (tmp_path / "rep" / "tuning_curves.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------
# distributed measurement: RPC tracker + one server on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpc_tracker_and_server_loopback(tmp_path):
    pytest.importorskip("tornado")  # the TVM RPC tracker needs it (pyproject: test extra)
    tport, sport = _free_port(), _free_port()
    procs = []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                       "--port", str(tport), "--port-end", str(tport + 1)],
                                      stdout=open(tmp_path / "tracker.log", "w"), stderr=subprocess.STDOUT,
                                      env=_env(), start_new_session=True))
        srv_log = tmp_path / "server.log"
        time.sleep(1.0)
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                       "--port", str(sport), "--port-end", str(sport + 1), "--tracker",
                                       f"127.0.0.1:{tport}", "--key", "fagtest"],
                                      stdout=open(srv_log, "w"), stderr=subprocess.STDOUT, env=_env(),
                                      start_new_session=True))
        from tvm import rpc

        deadline = time.time() + 60
        while True:
            try:
                summ = rpc.connect_tracker("127.0.0.1", tport).summary()
                if summ.get("queue_info", {}).get("fagtest", {}).get("free", 0) >= 1:
                    break
            except Exception:  # noqa: BLE001 - tracker not up yet
                pass
            assert time.time() < deadline, "RPC server did not register with the tracker"
            time.sleep(0.5)
        log_dir = tmp_path / "logs"
        r = subprocess.run(_tune_cmd(log_dir, 2, "--rpc-tracker", f"127.0.0.1:{tport}", "--rpc-key", "fagtest"),
                           capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        recs = _records(log_dir)
        assert len(recs) == 2 and all(r_["ok"] for r_ in recs), recs
        assert json.loads((_family(log_dir) / R.BEST).read_text())["entries"][0]["trials"] == 2
        # the measurements ran on the server: it loaded one uploaded kernel library per trial
        text = srv_log.read_text()
        loaded = [x for x in text.splitlines() if "load_module" in x and ".so" in x]
        assert len(loaded) == 2, text[-2000:]
        assert {R.knobs_tag(r_["knobs"]) for r_ in recs} == {x.rsplit("/", 1)[1][:-3] for x in loaded}
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)


# ------------------------------------------------------------------------------------------------
# committed logs


def test_committed_logs_cover_the_suite_and_are_not_stale():
    """tuning_logs/llvm must cover S1-S9 (backward) and match the current llvm sources. After a change of
    the llvm kernels, the shared math/ABI or schedules/llvm.py, re-tune:
    `fag-tvm tune --workload S1,...,S9 --trials 24`; `fag-tvm tune --check` lists what is stale."""
    log_dir = ROOT / "tuning_logs"
    rows = R.check_logs(LLVM, log_dir)
    stale = [r for r in rows if r["stale"]]
    assert not stale, "stale tuning records (re-tune them):\n" + "\n".join(
        f"  {Path(r['path']).parent.name} {r['id']}: {'; '.join(r['reasons'])}" for r in stale)
    covered = {(r["id"], r["direction"]) for r in rows}
    missing = [s for s in SUITE if (s, "bwd") not in covered]
    assert not missing, f"tuning_logs/llvm lacks {missing}"
    size = sum(p.stat().st_size for p in (log_dir / "llvm").rglob("*") if p.is_file())
    assert size < 1_000_000, f"committed tuning logs are {size / 1e3:.0f} KB"
    assert not list((log_dir / "llvm").rglob(DB.JOURNAL)) and not list((log_dir / "llvm").rglob(".lock"))


def test_committed_logs_load_through_the_loader(monkeypatch):
    """The loader itself (not the build path, which turns loader errors into a warning) on every committed
    entry: each database decodes, best.json agrees with it, and `tuned_knobs` returns the entry's knobs for
    the hardware it was measured on."""
    monkeypatch.setenv("FAG_TVM_TUNING_ANY_CPU", "1")
    n = 0
    for bp in sorted((ROOT / "tuning_logs" / "llvm").glob(f"*/{R.BEST}")):
        doc = R.read_best(bp)
        fam = {e["shash"]: e for e in DB.read_family(bp.parent, LLVM.knobs_from_dict)}
        assert doc and fam, bp
        spec = KernelSpec.from_dict(doc["spec"])
        for e in doc["entries"]:
            ent = fam[e["meta"]["workload_hash"]]
            assert len(ent["records"]) == e["records"] and all(r["knobs"] is not None for r in ent["records"])
            agg = R.aggregate(ent["records"])
            assert agg[LLVM.knobs_from_dict(e["knobs"])]["t"] * 1e3 == pytest.approx(e["run_ms"])
            got = R.tuned_knobs(LLVM, spec, e["meta"]["hw"], shape=e["workload"])
            assert got is not None and vars(got[0]) == e["knobs"], (bp, e["id"])
            n += 1
    assert n >= 9


def test_stale_entries_are_reported_not_applied(tmp_path, caplog):
    src = ROOT / "tuning_logs" / "llvm"
    fams = sorted(p.parent for p in src.glob(f"*/{R.BEST}"))
    assert fams, "no committed tuning logs"
    fam = tmp_path / "llvm" / fams[0].name
    shutil.copytree(fams[0], fam)
    doc = json.loads((fam / R.BEST).read_text())
    for e in doc["entries"]:
        e["meta"]["source_hash"] = "f" * 64
    (fam / R.BEST).write_text(json.dumps(doc))
    rows = R.check_logs(LLVM, tmp_path)
    assert rows and all(r["stale"] and "stale" in r["reasons"][0] for r in rows)
    spec = KernelSpec.from_dict(doc["spec"])
    with caplog.at_level("WARNING", logger="fag_tvm.tuning"):
        assert R.tuned_knobs(LLVM, spec, doc["entries"][0]["meta"]["hw"], log_dir=tmp_path) is None
    assert any("stale" in r.getMessage() for r in caplog.records)
    r = subprocess.run([sys.executable, "-m", "fag_tvm.cli", "tune", "--check", "--log-dir", str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 1 and "STALE" in r.stdout
