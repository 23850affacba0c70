"""Hardening of everything around the kernels: a damaged JIT cache is rebuilt (never dlopened), an unusable
cache falls back to an in-memory build, `compile --out` never deletes what is not a package, and the
console script fails politely (one line, exit 2; --debug for the traceback; Ctrl-C; closed pipes;
bad environment variables). Every CLI check runs the real console script in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).parent / "fag-tvm")

_JIT_CALL = r"""
import numpy as np, fag_tvm, warnings, json
warnings.simplefilter("always")
rng = np.random.default_rng(0)
q, k, v, dy = (rng.standard_normal((1, 2, 20, 8)).astype(np.float32) for _ in range(4))
with warnings.catch_warnings(record=True) as w:
    g = fag_tvm.flash_attention_score_grad(q, k, v, dy, head_num=2, input_layout="BNSD", scale_value=0.3)
r = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, head_num=2, input_layout="BNSD", scale_value=0.3)
from fag_tvm.jit import STATS
print(json.dumps({"err": max(float(np.abs(a - b).max()) for a, b in zip(g[:3], r[:3])), "stats": STATS,
                  "warnings": [str(x.message) for x in w]}))
"""


def _jit_call(cache: Path, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, FAG_TVM_CACHE=str(cache), FAG_TVM_QUIET="1", **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", _JIT_CALL], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode} (signal: {r.returncode < 0})\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("jit") / "cache"
    out = _jit_call(cache)
    assert out["err"] < 1e-4 and out["stats"]["compiled"] == 2
    return cache


def _libs(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.so"))


def _copy_cache(warm: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "cache"
    shutil.copytree(warm, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "flipped_byte", "foreign_library", "garbage",
                                    "folder", "sidecar_missing", "sidecar_garbage"])
def test_damaged_cache_entry_is_rebuilt_not_loaded(warm_cache, tmp_path, damage):
    """A truncated library used to kill every later process with SIGBUS inside dlopen: entries are verified
    (size + sha256 recorded at write time) before loading, and a bad one is rebuilt with a warning."""
    cache = _copy_cache(warm_cache, tmp_path)
    libs = _libs(cache)
    lib = libs[-1]
    side = lib.with_suffix(".json")
    if damage == "truncated":
        with open(lib, "r+b") as f:
            f.truncate(lib.stat().st_size // 2)
    elif damage == "zero_bytes":
        lib.write_bytes(b"")
    elif damage == "flipped_byte":
        data = bytearray(lib.read_bytes())
        data[len(data) // 2] ^= 0xFF
        lib.write_bytes(bytes(data))
    elif damage == "foreign_library":
        lib.write_bytes(libs[0].read_bytes())  # another kernel's library under this name
    elif damage == "garbage":
        lib.write_bytes(os.urandom(4096))
    elif damage == "folder":
        lib.unlink()
        lib.mkdir()
    elif damage == "sidecar_missing":
        side.unlink()
    else:
        side.write_text("{not json")
    out = _jit_call(cache)
    assert out["err"] < 1e-4
    if damage == "folder":
        assert any("not usable" in w or "compiling in memory" in w for w in out["warnings"]), out
    else:
        assert out["stats"]["rebuilt"] + out["stats"]["compiled"] >= 1, out
        assert any("rebuilding" in w for w in out["warnings"]) or damage == "sidecar_missing", out
        again = _jit_call(cache)  # the rebuilt entry is good: a plain disk hit now
        assert again["stats"]["disk_hits"] == 2 and again["stats"]["compiled"] == 0, again


@pytest.mark.parametrize("how", ["cache_is_a_file", "cache_under_a_file"])
def test_unusable_cache_falls_back_to_memory(tmp_path, how):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cache = blocker if how == "cache_is_a_file" else blocker / "cache"
    out = _jit_call(cache)
    assert out["err"] < 1e-4 and out["stats"]["compiled"] == 2
    assert any("compiling in memory" in w for w in out["warnings"]), out


# ------------------------------------------------------------------------------------------------
# the console script


def cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    e = dict(os.environ, FAG_TVM_QUIET="1", **(env or {}))
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)


def one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(("WARNING", "fag_tvm tuning"))]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


SMALL = json.dumps({"B": 1, "N1": 1, "N2": 1, "Sq": 16, "Skv": 16, "D": 8, "Dv": 8, "input_layout": "BNSD",
                    "dtype": "fp32", "sparse_mode": 0})


def test_compile_refuses_to_delete_a_folder_that_is_not_a_package(tmp_path):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    line = one_line(cli("compile", "--workloads", SMALL, "--out", str(out)))
    assert "not a fag_tvm package" in line and (out / "precious.txt").read_text() == "keep me"
    # an earlier package is replaced; --force replaces anything; packages are not private (umask)
    r = cli("compile", "--workloads", SMALL, "--out", str(tmp_path / "pkg"))
    assert r.returncode == 0, r.stderr
    r = cli("compile", "--workloads", SMALL, "--out", str(tmp_path / "pkg"))
    assert r.returncode == 0, r.stderr
    mode = (tmp_path / "pkg").stat().st_mode & 0o777
    assert mode & 0o055, oct(mode)
    r = cli("compile", "--workloads", SMALL, "--out", str(out), "--force")
    assert r.returncode == 0 and not (out / "precious.txt").exists() and (out / "manifest.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["compile", "--workloads", "/no/such/file.json", "--out", "x"], "workload"),
    (["compile", "--workloads", "S99", "--out", "x"], "workload"),
    (["compile", "--workloads", "{\"B\": 1, \"sparse_mod\": 2}", "--out", "x"], "sparse_mod"),
    (["tune", "--workload", "S99", "--trials", "2"], "workload"),
    (["tune", "--workload", "S1"], "--trials"),
    (["bench", "--shapes", "S99"], "workload"),
    (["inspect", "no_such_kernel_key"], "key"),
    (["inspect", "--workload", "S1", "--set", "block_q=7"], "block_q"),
    (["inspect", "--workload", "S1", "--set", "nope=1"], "--set"),
    (["quickstart", "--target", "nope"], "target"),
    (["bench", "--repeat", "0"], "--repeat"),
    (["bench", "--threads", "-3"], "--threads"),
    (["bench", "--repeat", "x"], "--repeat"),
    (["tune", "--workload", "S1", "--trials", "0"], "--trials"),
    (["tune", "--workload", "S1", "--trials", "2", "--per-iter", "0"], "--per-iter"),
    (["quickstart", "--seq", "0"], "--seq"),
    (["report", "--log-dir", "no_such_dir"], "no tuning records"),
    (["cache", "nope"], "invalid choice"),
    (["nope"], "invalid choice"),
])
def test_user_errors_are_one_line(tmp_path, args, needle):
    assert needle in one_line(cli(*args, cwd=tmp_path))


def test_bad_mcpu_fails_instead_of_building_generic_code(tmp_path):
    assert "FAG_TVM_MCPU" in one_line(cli("compile", "--workloads", SMALL, "--out", str(tmp_path / "p"),
                                          env={"FAG_TVM_MCPU": "bogus"}))
    r = cli("info", "--json", env={"FAG_TVM_MCPU": "bogus"})
    assert r.returncode == 0 and not json.loads(r.stdout)["targets"]["llvm"]["available"]


def test_debug_shows_the_traceback(tmp_path):
    r = cli("--debug", "compile", "--workloads", "S99", "--out", str(tmp_path / "p"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_version_and_help_list_environment():
    import fag_tvm

    r = cli("--version")
    assert r.returncode == 0 and fag_tvm.__version__ in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and "FAG_TVM_MCPU" in r.stdout and "FAG_TVM_CACHE" in r.stdout
    r = cli("bench", "--help")
    for opt in ("--shapes", "--workloads", "--repeat", "--threads", "--json", "--no-peer", "--no-roof", "--target"):
        assert opt in r.stdout, opt


def test_closed_pipe_is_quiet():
    p1 = subprocess.Popen([EXE, "info", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, FAG_TVM_QUIET="1"))
    p1.stdout.readline()
    p1.stdout.close()  # like `| head -1`
    err = p1.stderr.read().decode()
    p1.wait(60)
    assert p1.returncode in (0, 1) or p1.returncode == -signal.SIGPIPE, p1.returncode
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_ctrl_c_during_tune_is_one_line(tmp_path):
    p = subprocess.Popen([EXE, "tune", "--workload", SMALL, "--trials", "50", "--log-dir", str(tmp_path / "logs"),
                          "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, FAG_TVM_QUIET="1"), start_new_session=True)
    fam = None
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # interrupt once tuning has started measuring
        fams = list((tmp_path / "logs").rglob("database_tuning_record.json"))
        if fams and fams[0].stat().st_size > 0:
            fam = fams[0].parent
            break
        time.sleep(0.2)
    assert fam is not None, p.stderr.read().decode()[-3000:] if p.poll() is not None else "tuning did not start"
    os.killpg(p.pid, signal.SIGINT)
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    err = err.decode()
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, (p.returncode, err[-2000:])
    assert json.loads((fam / "best.json").read_text())["entries"]  # what was measured is kept


def test_dev_resolves_relative_paths_in_the_callers_folder(tmp_path):
    """`./dev compile --out pkg` writes ./pkg in the caller's folder, not in the checkout."""
    if not (ROOT / ".venv" / "bin" / "fag-tvm").exists():
        pytest.skip("./dev's virtual environment is not set up in this checkout")
    r = subprocess.run([str(ROOT / "dev"), "compile", "--workloads", SMALL, "--out", "pkg_rel"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, FAG_TVM_QUIET="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "pkg_rel" / "manifest.json").exists() and not (ROOT / "pkg_rel").exists()


def test_cache_list_and_clear(tmp_path):
    env = {"FAG_TVM_CACHE": str(tmp_path / "c")}
    r = cli("quickstart", "--seq", "32", "--heads", "1", "--dim", "8", "--repeat", "1", env=env)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stderr[-2000:]
    r = cli("cache", "list", "--json", env=env)
    entries = json.loads(r.stdout)
    assert len(entries) == 2 and all(e["ok"] for e in entries)
    r = cli("cache", "clear", env=env)
    assert r.returncode == 0 and not list((tmp_path / "c").rglob("*.so"))


@pytest.mark.parametrize("show,needle", [("tir", "T.prim_func"), ("llvm", "define"), ("asm", "vfmadd")])
def test_inspect_shows_what_a_kernel_compiles_to(show, needle):
    r = cli("inspect", "--workload", SMALL, "--show", show)
    assert r.returncode == 0 and needle in r.stdout, r.stderr[-2000:]


def test_bench_runs_custom_workloads_with_roof_and_spread(tmp_path):
    wl = tmp_path / "wl.json"
    wl.write_text(f"[{SMALL}]")
    r = cli("bench", "--workloads", str(wl), "--repeat", "3", "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "b.json").read_text())
    (row,) = doc["rows"]
    assert row["ours"]["min_ms"] <= row["ours"]["median_ms"] <= row["ours"]["max_ms"]
    assert doc["roofs"]["fp32"]["gflops"] > 0 and "roof fp32" in r.stdout


@pytest.mark.parametrize("bf16_gemm, expect_fallback", [(0.3, True), (500.0, False)])
def test_bf16_roof_is_never_below_the_fp32_roof(monkeypatch, bf16_gemm, expect_fallback):
    """Without native bf16 dot products a library bf16 GEMM can be 100x slower than fp32 (AVX2: 0.3 GFLOP/s);
    kernels widen bf16 to fp32 there, so the fp32 roof is the limit and %roof must not read 25000%."""
    from fag_tvm import bench

    fp32 = {"dtype": "fp32", "gflops": 140.0, "how": "numpy float32 matmul", "ms": 1.0}
    monkeypatch.setattr(bench, "measure_roof", lambda threads, dtype: {"dtype": dtype, "gflops": bf16_gemm,
                                                                       "how": "torch bfloat16 matmul", "ms": 1.0})
    r = bench._bf16_roof(2, fp32)
    assert r["dtype"] == "bf16" and r["gflops"] == (140.0 if expect_fallback else 500.0)
    assert ("fp32 roof" in r["how"]) == expect_fallback
