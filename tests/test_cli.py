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


@pytest.mark.parametrize("cmd", ["info", "quickstart", "compile", "bench", "tune", "report", "cache", "inspect"])
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
