"""Opt-in check of the test suite itself: each mutation is a deliberate bug that some test must catch.

    python tests/mutations/run_mutations.py [--only NAME ...] [--list]

For every mutation: copy the checkout (installed layout: schedules/ inside fag_tvm/) to a temp folder,
apply the one-line edit, run the named tests there with a private kernel cache, and report CAUGHT (the
tests failed) or MISSED (they passed: the suite has a blind spot). Not part of `./dev test` (each mutation
recompiles kernels; a full run takes tens of minutes)."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name: (file, old text, new text, pytest args, what the mutation breaks)
MUTATIONS = {
    "stats_ordinary_rows": (
        "fag_tvm/targets/llvm/launch.py",
        '    stat_shape = (cfg.T, cfg.N1, STATS_LANES) if cfg.tnd else (cfg.B, cfg.N1, cfg.Sq, STATS_LANES)\n'
        '    return {"attention_out"',
        '    smax[smax != -_F32_MAX] += 100\n'
        '    stat_shape = (cfg.T, cfg.N1, STATS_LANES) if cfg.tnd else (cfg.B, cfg.N1, cfg.Sq, STATS_LANES)\n'
        '    return {"attention_out"',
        ["tests/test_targets_random.py"],
        "+100 on every ordinary row's softmax_max (hidden by a ±FLT_MAX sentinel row under a plain L2)"),
    "tnd_alibi_mode": (
        "fag_tvm/core/abi.py", "ip[I_ALIBI_MODE] = 1 if cfg.tnd else 0", "ip[I_ALIBI_MODE] = 0",
        ["tests/test_targets_random.py"],
        "the TND alibi-compressed rule replaced by the padded one (no llvm seed covered TND alibi)"),
    "alibi_kv_start_ignored": (
        "fag_tvm/kernels/common/pse.py", "(gj + c.kv_start) - (gi + c.q_start)", "gj - (gi + c.q_start)",
        ["tests/test_cann_cases.py", "-k", "ALIBI or TND_01 or TND_03"],
        "kv_start_idx ignored by the kernels (the CANN alibi cases ran on the reference only)"),
    "dq_rows_unwritten": (
        "fag_tvm/targets/llvm/bwd.py",
        "                for i in range(sq):\n                    dqout_cols(",
        "                for i in range(T.min(sq, md.skv)):\n                    dqout_cols(",
        ["tests/test_targets_random.py"],
        "dq rows of a sequence without keys (correct value 0) left unwritten: passes on zero-filled memory"),
    "one_tvm_thread": (
        "fag_tvm/_tvm.py", 'os.environ.setdefault("TVM_NUM_THREADS", str(cpu_count()))',
        'os.environ.setdefault("TVM_NUM_THREADS", "1")',
        ["tests/test_threads.py"],
        "fag_tvm leaves TVM's pool at one thread (the old check counted NumPy's threads)"),
    "loader_drops_records": (
        "fag_tvm/tune/records.py", "    if not usable:\n        return None", "    if True:\n        return None",
        ["tests/test_tuning.py", "-k", "committed_logs_load"],
        "the tuning-log loader never returns a record (the build path turns that into 'default' silently)"),
    "validation_rejects_valid_tnd": (
        "fag_tvm/config.py", "def _check_tokens(p: int, n: int, sq: int, skv: int, tnd: bool) -> None:\n",
        "def _check_tokens(p: int, n: int, sq: int, skv: int, tnd: bool) -> None:\n"
        "    if tnd and p < 5:\n        raise invalid('pre_tokens', 'mutation')\n",
        ["tests/test_properties.py", "-k", "tnd_equals"],
        "a validation regression rejecting valid TND band calls (hidden by assume(False) before)"),
    "tuned_knobs_compute_wrong": (
        "fag_tvm/targets/llvm/bwd.py", "    gemm_dq = M.make_gemm(BQ, DP, BKV,",
        "    gemm_dq = M.make_gemm(BQ, DP, BKV if (BQ, BKV, knobs.mr) == (64, 64, 4) else BKV // 2,",
        ["tests/test_tuning.py", "-k", "compute_correctly"],
        "a knob setting other than the default computes wrong dq (tuned settings were built, never run)"),
}


def run_one(name: str, keep: bool = False) -> bool:
    path, old, new, args, what = MUTATIONS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f"mut-{name}-"))
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
        for f in files:
            if f.startswith(".venv"):
                continue
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / f).is_file():
                shutil.copy2(ROOT / f, tmp / f)
        shutil.copytree(ROOT / "schedules", tmp / "fag_tvm" / "schedules")
        src = (tmp / path).read_text()
        if old not in src:
            print(f"{name}: SKIPPED (the text to mutate is gone from {path}: update the mutation)")
            return False
        (tmp / path).write_text(src.replace(old, new, 1))
        env = dict(os.environ, PYTHONPATH=str(tmp), FAG_TVM_CACHE=str(tmp / ".cache"))
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=tmp,
                           env=env, capture_output=True, text=True)
        caught = r.returncode != 0
        print(f"{name}: {'CAUGHT' if caught else 'MISSED'} — {what}")
        if not caught or keep:
            print(r.stdout[-1500:])
        return caught
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="mutation names (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the mutated copies and print test output")
    a = p.parse_args()
    if a.list:
        for n, m in MUTATIONS.items():
            print(f"{n:28s} {m[4]}")
        return 0
    names = a.only or list(MUTATIONS)
    missed = [n for n in names if not run_one(n, a.keep)]
    print(f"{len(names) - len(missed)} of {len(names)} mutations caught" + (f"; MISSED: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
