"""Tuning workflow (fag_tvm.tune, `fag-tvm tune/compile/report`): meta-schedule over the shipped
template's knobs, kill-and-resume, the build path applying records, RPC measurement, stale logs.

CI-sized: one small workload (B=1, N=2, S=256, D=64, causal) and few trials; the whole file runs in
about 3 minutes on 2 cores (tuning builds one real kernel per trial)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fag_tvm import tune as T
from fag_tvm.workloads import SUITE

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"B": 1, "N1": 2, "N2": 2, "Sq": 256, "Skv": 256, "D": 64, "Dv": 64, "input_layout": "BNSD",
         "dtype": "fp32", "sparse_mode": 3}
TRIALS = 8


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
            "--confirm", "0", *extra]


def _family(log_dir) -> Path:
    return T.family_dir(log_dir, T.task_spec(SMALL))


def _records(log_dir) -> list[dict]:
    """Records of SMALL's current workload in the database (measurement order)."""
    stub_hash = T._shash_hex(T.stub_mod(T.make_task(SMALL)))
    for e in T.load_family(_family(log_dir)):
        if e["shash"] == stub_hash:
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
    """The space samples exactly the template's knob values; feasibility = schedules.llvm.prune."""
    from schedules.llvm import candidate_space, candidates, default_knobs

    task = T.make_task(SUITE["S2"])
    spec = T.spec_of(task)
    vals = T.space_values(spec, 16)
    cs = candidate_space(spec, 16)
    for k, v in vals.items():
        assert set(v) <= set(cs[k]) and v, k
        assert all(x >= 2 for x in v) or k == "nr"  # nr=1 is an annotation value, not a loop factor
    feas = set(candidates(spec, 16))
    d = default_knobs(spec, 16)
    assert d in feas
    tr = T.trace_for_knobs(task, d)
    assert T.knobs_of_trace(tr, T.stub_mod(task)) == d
    assert len(T.knob_features(task, d)) == len(T.FEATURE_NAMES)
    # the stub identity keys records per (spec, workload, source, TVM, CPU)
    assert T.task_of_mod(T.stub_mod(task)) == task
    assert T._shash_hex(T.stub_mod(task)) != T._shash_hex(T.stub_mod(T.make_task(SUITE["S8"])))


def test_torn_database_line_is_repaired(tmp_path):
    p = tmp_path / "database_tuning_record.json"
    p.write_bytes(b'[0, ["a"]]\n[1, ["b"]]\n[0, ["tr')  # writer killed mid-line
    assert [x[0] for x in T.read_json_lines(p)] == [0, 1]
    assert T.repair_json_lines(p) == 1
    assert p.read_bytes() == b'[0, ["a"]]\n[1, ["b"]]\n'


# ------------------------------------------------------------------------------------------------
# tune (killed with SIGKILL, then resumed) -> records -> compile uses them


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """`fag-tvm tune --trials 8` killed with SIGKILL mid-run, then resumed to completion."""
    base = tmp_path_factory.mktemp("tune")
    log_dir = base / "logs"
    fam = _family(log_dir)
    out1 = open(base / "run1.log", "w")
    p = subprocess.Popen(_tune_cmd(log_dir, TRIALS), stdout=out1, stderr=subprocess.STDOUT, env=_env(),
                         start_new_session=True, cwd=str(base))
    deadline = time.time() + 240
    # kill once the default and at least two search candidates are measured: mid-batch, so some
    # completed measurements exist only in the journal, not yet in TVM's database
    while time.time() < deadline and p.poll() is None:
        if _lines(fam / T.DB_RECORD) + _lines(fam / T.JOURNAL) >= 3 and _lines(fam / T.JOURNAL) >= 1:
            break
        time.sleep(0.1)
    assert p.poll() is None, (base / "run1.log").read_text()[-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    out1.close()
    journal = [j for j in T.read_json_lines(fam / T.JOURNAL)]
    db_before = {T.knobs_tag(r["knobs"]) for r in _records(log_dir)}  # tolerant of a torn last line
    best_before = json.loads((fam / T.BEST).read_text())  # written atomically: always whole
    completed = {j["knobs"]: j["run_secs"] for j in journal if j.get("run_secs")}
    t0 = time.time()
    r2 = subprocess.run(_tune_cmd(log_dir, TRIALS), capture_output=True, text=True, env=_env(), timeout=300,
                        cwd=str(base))
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    return {"log_dir": log_dir, "fam": fam, "journal": journal, "completed": completed, "db_before": db_before,
            "best_before": best_before, "resume_out": r2.stdout + r2.stderr, "resume_s": time.time() - t0}


def test_kill_and_resume_loses_nothing(tuned):
    recs = _records(tuned["log_dir"])
    assert len(recs) == TRIALS, [r["knobs"] for r in recs]
    assert all(r["ok"] for r in recs)
    tags = [T.knobs_tag(r["knobs"]) for r in recs]
    assert len(set(tags)) == len(tags), "a resumed run re-measured a known point"
    # every measurement completed before the SIGKILL is in the database with its original timing
    by_tag = {T.knobs_tag(r["knobs"]): r["run_secs"] for r in recs}
    assert tuned["completed"], "the kill came before any journaled measurement"
    for tag, secs in tuned["completed"].items():
        assert tag in by_tag, f"measurement {tag} lost by the kill"
        assert by_tag[tag] == pytest.approx(secs)
    # measurements finished after the last database commit came back from the journal
    assert set(tuned["completed"]) - tuned["db_before"], "kill did not hit the middle of a batch"
    assert "recovered" in tuned["resume_out"]
    assert not (tuned["fam"] / T.JOURNAL).exists() and not (tuned["fam"] / ".lock").exists()
    best = json.loads((tuned["fam"] / T.BEST).read_text())
    (e,) = best["entries"]
    assert e["trials"] == TRIALS == e["records"] and e["default_ms"] > 0
    assert best["format"] == T.FORMAT and e["meta"]["source_hash"] == T.current_meta()["source_hash"]
    for k in ("fag_tvm_version", "tvm_version", "cpu_model", "date", "source_hash", "target"):
        assert e["meta"].get(k), k
    # best.json: the fastest record; the default stays chosen unless beaten by more than the margin
    fastest = min(recs, key=lambda r: T._median(r["run_secs"]))
    assert e["fastest_ms"] == pytest.approx(T._median(fastest["run_secs"]) * 1e3)
    assert e["fastest_knobs"] == T.knob_dict(fastest["knobs"])
    if e["knobs"] == e["default_knobs"]:
        assert e["default_ms"] <= e["fastest_ms"] * (1 + T.MARGIN)
    else:
        assert e["knobs"] == e["fastest_knobs"] and e["default_ms"] > e["fastest_ms"] * (1 + T.MARGIN)
    assert "tune " in tuned["resume_out"] and "/8" in tuned["resume_out"]  # progress bar


def test_compile_uses_the_tuned_record(tuned, tmp_path, monkeypatch, caplog):
    from fag_tvm import build

    log_dir, fam = tuned["log_dir"], tuned["fam"]
    best = json.loads((fam / T.BEST).read_text())
    e = best["entries"][0]
    spec = T.task_spec(SMALL)
    # AOT: `fag-tvm compile` takes the knobs from the record
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-m", "fag_tvm.cli", "compile", "--target", "llvm", "--workloads",
                        json.dumps(SMALL), "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env=_env(FAG_TVM_TUNING_LOGS=log_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    (k,) = [x for x in man["kernels"] if x["spec"]["direction"] == "bwd"]
    assert k["knobs"] == e["knobs"] and k["entry"] == e["kernel"]
    assert k["knobs_origin"].startswith("tuned:") and str(fam) in k["knobs_origin"]

    # the choice follows the record, not a coincidence: point best.json at another measured record
    recs = [x for x in _records(log_dir) if x["ok"]]
    other = next(x["knobs"] for x in recs if T.knob_dict(x["knobs"]) not in (e["knobs"], e["default_knobs"]))
    alt = tmp_path / "alt"
    shutil.copytree(log_dir, alt)
    afam = T.family_dir(alt, spec)
    doc = json.loads((afam / T.BEST).read_text())
    doc["entries"][0]["knobs"] = T.knob_dict(other)
    (afam / T.BEST).write_text(json.dumps(doc))
    monkeypatch.setenv("FAG_TVM_TUNING_LOGS", str(alt))
    knobs, origin = build.knobs_for(spec)
    assert knobs == other and origin.startswith("tuned:")
    kern = build.build_kernel(spec, use_disk=False)  # JIT path
    assert kern.knobs == other and kern.name == spec.key("llvm", other)
    build.clear_memory_cache()

    # a record whose metadata does not match is ignored with a logged reason
    for field, value, needle in (("source_hash", "0" * 64, "stale"), ("cpu_model", "Some Other CPU", "tuned on CPU"),
                                 ("tvm_version", "0.0.0", "TVM version")):
        d2 = json.loads(json.dumps(doc))
        d2["entries"][0]["meta"][field] = value
        (afam / T.BEST).write_text(json.dumps(d2))
        caplog.clear()
        with caplog.at_level("WARNING", logger="fag_tvm.tuning"):
            knobs, origin = build.knobs_for(spec)
        assert origin == "default" and knobs == build.default_knobs(spec)
        assert any(needle in rec.getMessage() for rec in caplog.records), [x.getMessage() for x in caplog.records]


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
        r = subprocess.run(_tune_cmd(log_dir, 3, "--rpc-tracker", f"127.0.0.1:{tport}", "--rpc-key", "fagtest"),
                           capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        recs = _records(log_dir)
        assert len(recs) == 3 and all(r_["ok"] for r_ in recs), recs
        assert all(0 < T._median(r_["run_secs"]) < 1.0 for r_ in recs)
        best = json.loads((_family(log_dir) / T.BEST).read_text())
        assert best["entries"][0]["trials"] == 3
        # the measurements ran on the server: it loaded one uploaded kernel library per trial
        text = srv_log.read_text()
        loaded = [x for x in text.splitlines() if "load_module" in x and ".so" in x]
        assert len(loaded) == 3, text[-2000:]
        assert {T.knobs_tag(r_["knobs"]) for r_ in recs} == {x.rsplit("/", 1)[1][:-3] for x in loaded}
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
    """tuning_logs/llvm must cover S1-S9 (backward) and match the current kernel sources. After a change
    of fag_tvm/kernels or schedules/, re-tune: `fag-tvm tune --workload S1,...,S9 --trials 24` (or the
    affected families); `fag-tvm tune --check` lists what is stale."""
    log_dir = ROOT / "tuning_logs"
    rows = T.check_logs(log_dir)
    stale = [r for r in rows if r["stale"]]
    assert not stale, "stale tuning records (re-tune them):\n" + "\n".join(
        f"  {Path(r['path']).parent.name} {r['id']}: {'; '.join(r['reasons'])}" for r in stale)
    covered = {(r["id"], r["direction"]) for r in rows}
    missing = [s for s in SUITE if (s, "bwd") not in covered]
    assert not missing, f"tuning_logs/llvm lacks {missing}"
    size = sum(p.stat().st_size for p in (log_dir / T.TARGET_DIR).rglob("*") if p.is_file())
    assert size < 1_000_000, f"committed tuning logs are {size / 1e3:.0f} KB"
    assert not list((log_dir / T.TARGET_DIR).rglob(T.JOURNAL)) and not list((log_dir / T.TARGET_DIR).rglob(".lock"))


def test_stale_entries_are_reported_not_applied(tmp_path, caplog):
    src = ROOT / "tuning_logs" / T.TARGET_DIR
    fams = sorted(p.parent for p in src.glob(f"*/{T.BEST}"))
    if not fams:
        pytest.skip("no committed tuning logs")
    fam = tmp_path / T.TARGET_DIR / fams[0].name
    shutil.copytree(fams[0], fam)
    doc = json.loads((fam / T.BEST).read_text())
    for e in doc["entries"]:
        e["meta"]["source_hash"] = "f" * 64
    (fam / T.BEST).write_text(json.dumps(doc))
    rows = T.check_logs(tmp_path)
    assert rows and all(r["stale"] and "stale" in r["reasons"][0] for r in rows)
    from fag_tvm.kernels.spec import KernelSpec

    spec = KernelSpec(**doc["spec"])
    with caplog.at_level("WARNING", logger="fag_tvm.tuning"):
        assert T.tuned_knobs(spec, log_dir=tmp_path) is None
    assert any("stale" in r.getMessage() for r in caplog.records)
    r = subprocess.run([sys.executable, "-m", "fag_tvm.cli", "tune", "--check", "--log-dir", str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 1 and "STALE" in r.stdout
