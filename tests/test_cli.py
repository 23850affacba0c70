"""The `fag-tvm` console script, run in a subprocess as a user runs it: every subcommand has --help, info
lists the targets, compile writes a loadable package, and every user error is one line + exit status 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("fag-tvm", path=os.path.dirname(sys.executable)) or shutil.which("fag-tvm")
SMALL_WL = [{"B": 1, "N1": 2, "N2": 2, "Sq": 16, "Skv": 16, "D": 8, "Dv": 8, "input_layout": "BSND",
             "dtype": "fp32", "sparse_mode": 2}]


def cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "fag_tvm.cli", *args]
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)


@pytest.mark.parametrize("cmd", ["info", "quickstart", "compile", "bench", "tune", "report", "explore", "cache",
                                 "inspect"])
def test_subcommand_help(cmd):
    r = cli(cmd, "--help")
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr


def test_version():
    import fag_tvm

    r = cli("--version")
    assert r.returncode == 0 and fag_tvm.__version__ in r.stdout


def test_info_json_lists_every_target():
    r = cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info["targets"]) >= {"reference", "llvm"}
    for name, st in info["targets"].items():
        assert isinstance(st["available"], bool) and st["reason"], name
    assert info["targets"]["llvm"]["available"] and info["hardware"]["llvm"]["mcpu"] != "native"
    assert info["threads"] >= 1


def test_compile_writes_a_loadable_package(tmp_path):
    path = tmp_path / "wl.json"
    path.write_text(json.dumps(SMALL_WL))
    out = tmp_path / "pkg"
    r = cli("compile", "--target", "llvm", "--workloads", str(path), "--out", str(out))
    assert r.returncode == 0, r.stderr
    import fag_tvm

    pkg = fag_tvm.runtime.load(str(out))
    assert len(pkg.kernel_names) == 2 and sorted(os.listdir(out))[-1] == "manifest.json"


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("fag-tvm: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("workloads,needle", [
    ('{"B": 1}', "workload"),
    ("/nonexistent/wl.json", "workload"),
    ("S99", "workload"),
    ('[{"B": 1, "N1": 2}]', "workload"),
])
def test_bad_workload_is_one_line(tmp_path, workloads, needle):
    _one_line_error(cli("compile", "--workloads", workloads, "--out", str(tmp_path / "p")), needle)


def test_unknown_target_is_one_line(tmp_path):
    _one_line_error(cli("compile", "--target", "nope", "--workloads", "S1", "--out", str(tmp_path / "p")), "target")


def test_debug_shows_the_traceback(tmp_path):
    r = cli("--debug", "compile", "--workloads", '{"B": 1}', "--out", str(tmp_path / "p"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_explore_2x2_grid_json(tmp_path):
    """`explore` on llvm: a 2x2 grid plus an infeasible axis value, from the console script; the JSON holds
    every point (pruned ones with the template's reason), each feasible one checked against the default's
    result, timed `repeat` times, ranked, with ratios to the default and the machine's roof."""
    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps(SMALL_WL))
    out = tmp_path / "ex.json"
    r = cli("explore", "--workload", str(wl), "--vary", "block_q=16,32,12", "--vary", "block_kv=16,32",
            "--set", "mr=2", "--repeat", "3", "--json", str(out), "--report", str(tmp_path / "rep"),
            env={"FAG_TVM_QUIET": "1"})
    assert r.returncode == 0, r.stderr
    for f in ("index.html", "grid.png", "roofline.png", "exploration.json"):
        assert (tmp_path / "rep" / f).stat().st_size > 0, f
    roofline = json.loads((tmp_path / "rep" / "exploration.json").read_text())["roofline"]
    assert roofline["intensity_flop_per_byte"] > 0 and roofline["bound"] in ("compute", "memory")
    res = json.loads(out.read_text())
    assert res["target"] == "llvm" and res["direction"] == "bwd" and res["roof"]["gflops"] > 0
    grid = [p for p in res["points"] if p["role"] == "grid"]
    assert len(grid) == 6 and {(p["knobs"]["block_q"], p["knobs"]["block_kv"]) for p in grid} == \
        {(q, kv) for q in (16, 32, 12) for kv in (16, 32)}
    pruned = [p for p in grid if not p["feasible"]]
    assert {p["knobs"]["block_q"] for p in pruned} == {12} and all(p["reason"] for p in pruned)
    timed = [p for p in res["points"] if p["feasible"]]
    assert len(timed) >= 4 and all(p["knobs"]["mr"] == 2 for p in grid)
    assert any(p["is_default"] for p in res["points"])
    for p in timed:
        assert not p["problems"] and len(p["times_ms"]) == 3 and p["min_ms"] <= p["median_ms"] <= p["max_ms"]
        assert p["gflops"] > 0 and p["vs_default"] > 0 and p["roof_pct"] > 0
    assert sorted(p["rank"] for p in timed) == list(range(1, len(timed) + 1))
    assert "pruned:" in r.stdout and "block_q" in r.stdout


def test_explore_2x2_grid_ascend_like_model_json(tmp_path):
    """`explore` on ascend-like, same command shape: every point is built and its result checked against the
    default's; its time, % of the cube peak and binding pipes are the pipeline model's (the JSON says so)."""
    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps(dict(SMALL_WL[0], dtype="fp16", Sq=40, Skv=70)))
    out = tmp_path / "ex.json"
    r = cli("explore", "--target", "ascend-like", "--workload", str(wl), "--vary", "cv_s1=32,64",
            "--vary", "cv_s2=32,64", "--set", "base_m=32", "--set", "base_n=32", "--set", "base_k=32",
            "--set", "vec_rows=16", "--set", "vec_cols=32", "--json", str(out), "--report", str(tmp_path / "rep"),
            env={"FAG_TVM_QUIET": "1"})
    assert r.returncode == 0, r.stderr
    for f in ("index.html", "grid.png", "roofline.png", "stages.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0, f
    assert "pipeline model" in (tmp_path / "rep" / "index.html").read_text()
    res = json.loads(out.read_text())
    assert res["target"] == "ascend-like" and res["timing"] == "model" and res["repeat"] == 0
    assert "fp16 cube peak" in res["roof"]["how"] and res["roof"]["gflops"] > 1e5
    grid = [p for p in res["points"] if p["role"] == "grid"]
    assert {(p["knobs"]["cv_s1"], p["knobs"]["cv_s2"]) for p in grid} == {(a, b) for a in (32, 64) for b in (32, 64)}
    assert all(p["feasible"] and not p["problems"] for p in res["points"])
    for p in res["points"]:
        m = p["model"]
        assert m["time_s"] > 0 and p["median_ms"] == m["time_s"] * 1e3 and p["times_ms"] == []
        assert 0 < p["roof_pct"] < 100 and set(m["stages"]) == {"cube1", "vector", "cube2"}
    assert sorted(p["rank"] for p in res["points"]) == list(range(1, len(res["points"]) + 1))
    assert "pipeline model (predicted)" in r.stdout and "binds" in r.stdout


def test_explore_bad_knob_is_one_line(tmp_path):
    r = cli("explore", "--workload", "S1", "--vary", "warp=1,2")
    assert r.returncode == 2 and "unknown knob 'warp'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inspect_diff_of_two_knob_settings(tmp_path):
    """`inspect --diff knob=v`: a unified diff of the two kernels' TIR, differing where the knob acts (the tile
    buffers), names stripped; an infeasible second setting is a one-line error."""
    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps(SMALL_WL))
    r = cli("inspect", "--workload", str(wl), "--set", "block_kv=16", "--diff", "block_kv=32")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# --- fag_bwd_llvm") and "bkv16" in lines[0] and "bkv32" in lines[1]
    minus = [x for x in lines if x.startswith("-") and not x.startswith("---")]
    plus = [x for x in lines if x.startswith("+") and not x.startswith("+++")]
    assert minus and plus and any("alloc_buffer" in x and "16" in x for x in minus)
    assert any("alloc_buffer" in x and "32" in x for x in plus)
    bad = cli("inspect", "--workload", str(wl), "--diff", "block_kv=12")
    assert bad.returncode == 2 and "infeasible" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_explore_cuda_sim_is_functional_only(tmp_path):
    """`explore` on cuda-sim, same command shape: every point is built, run and checked against the default;
    the table says there is no timing instead of printing a CPU simulation's clock; bench and tune refuse."""
    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps(dict(SMALL_WL[0], Sq=40, Skv=30)))
    out = tmp_path / "ex.json"
    r = cli("explore", "--target", "cuda-sim", "--workload", str(wl), "--vary", "block_m=16,32", "--set",
            "block_n=16", "--json", str(out), "--report", str(tmp_path / "rep"), env={"FAG_TVM_QUIET": "1"})
    if "not available" in r.stderr:
        pytest.skip(r.stderr)
    assert r.returncode == 0, r.stderr
    assert "functional check only, no timing" in r.stdout and "result ok" in r.stdout
    res = json.loads(out.read_text())
    assert res["timing"] == "none" and res["roof"] is None and res["repeat"] == 0
    assert {p["knobs"]["block_m"] for p in res["points"] if p["role"] == "grid"} == {16, 32}
    assert all(p["feasible"] and not p["problems"] and p["median_ms"] is None for p in res["points"])
    assert (tmp_path / "rep" / "index.html").stat().st_size > 0
    b = cli("bench", "--target", "cuda-sim", "--workloads", str(wl))
    assert b.returncode == 2 and "no meaningful time" in b.stderr and len(b.stderr.strip().splitlines()) == 1
