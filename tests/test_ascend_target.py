"""target="ascend-like": the CANN-structured backward (targets/ascend_like/bwd.py) run on the CPU.

The contract's random configurations run on it through the `target` fixture (test_targets_random.py,
test_hardening_*.py). Here, what only this target has:

* schedules that deal many work items over the cube cores (small CV blocks), so dQ/dK/dV accumulate across
  cores -- atomic and deterministic modes, every knob that changes the code path (K/V residency, dK/dV in L1,
  fp16 hand-off, single buffering), fp32/fp16/bf16, against the float64 reference at SPEC A10;
* deterministic mode is bitwise stable across runs (its cores run in parallel threads, each in its own slot),
  and `deterministic=True` of a call overrides an atomic schedule;
* a point that overflows any on-chip buffer never reaches the builder (one case per buffer), and the
  buffers the kernel declares are exactly those the capacity check counts, in the AI core's scopes."""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import fag_tvm
from fag_tvm import jit, masks, targets
from fag_tvm.core.spec import KernelSpec
from fag_tvm.dropout import gen_drop_mask
from fag_tvm.schedules import ascend_like as sa
from fag_tvm.targets.ascend_like import bwd as abwd
from fag_tvm.testing import a10_problems

TARGET = targets.get("ascend-like")
HW = TARGET.hw()
SMALL = sa.Knobs(cv_s1=32, cv_s2=48, base_m=16, base_n=32, base_k=16, vec_rows=8, vec_cols=32, db_l0c=2)
VARIANTS = {
    "small": SMALL,
    "small_det": dataclasses.replace(SMALL, accumulate="deterministic"),
    "streamed_kv_l1_dkdv": dataclasses.replace(SMALL, kv_resident=False, dkdv="l1"),
    "single_buffers_h2": dataclasses.replace(SMALL, db_l1=1, db_l0=1, db_ub=1, db_l0c=1, handoff_bytes=2),
}


def _provider(knobs):
    return lambda spec: jit.kernel(TARGET, spec, knobs=knobs)


def _case(dtype, seed=3, B=2, N1=4, N2=2, Sq=75, Skv=90, D=40, Dv=24, mode=2, pse=True, dropout=True):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N1, Sq, D)).astype(dtype)
    k = rng.standard_normal((B, N2, Skv, D)).astype(dtype)
    v = rng.standard_normal((B, N2, Skv, Dv)).astype(dtype)
    dy = rng.standard_normal((B, N1, Sq, Dv)).astype(dtype)
    kw = dict(head_num=N1, input_layout="BNSD", scale_value=D ** -0.5, sparse_mode=mode,
              atten_mask=masks.compressed_causal_mask())
    if pse:
        kw["pse_shift"] = (0.3 * rng.standard_normal((B, N1, Sq, Skv))).astype(dtype)
    if dropout:
        kw.update(keep_prob=0.8, drop_mask=gen_drop_mask(B, N1, Sq, Skv, 0.8, seed=seed))
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    st = dict(softmax_max=fr.softmax_max, softmax_sum=fr.softmax_sum, attention_in=fr.attention_out)
    return (q, k, v, dy), dict(kw, **st)


def _grad(args, kw, knobs, **extra):
    return fag_tvm.flash_attention_score_grad(*args, target="ascend-like", _provider=_provider(knobs), **kw, **extra)


@pytest.mark.parametrize("variant,dtype", [
    ("small", "float32"), ("small", "float16"), ("small", "bfloat16"),
    ("small_det", "float32"), ("small_det", "float16"), ("small_det", "bfloat16"),
    ("streamed_kv_l1_dkdv", "bfloat16"), ("streamed_kv_l1_dkdv", "float32"), ("single_buffers_h2", "float16")])
def test_many_items_over_cores_match_the_reference(variant, dtype):
    """75 x 90 in 32 x 48 CV blocks under a causal band: 2*2*2*3*2 - skipped = dozens of items over 24 cores,
    dQ rows summed over columns from different cores, dK/dV columns split across cores."""
    np_dt = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    knobs = VARIANTS[variant]
    if dtype == "float32":  # a 2-byte hand-off would round fp32 scores (prune refuses it)
        knobs = dataclasses.replace(knobs, handoff_bytes=4)
    args, kw = _case(np_dt)
    g = _grad(args, kw, knobs)
    gr = fag_tvm.reference.flash_attention_score_grad(*args, **kw)
    for name in ("dq", "dk", "dv", "dpse"):
        probs = a10_problems(name, getattr(g, name), getattr(gr, name), dtype)
        assert not probs, f"{variant} {dtype} {name}: {probs}"


def test_deterministic_mode_is_bitwise_stable_and_the_call_flag_wins():
    args, kw = _case(np.float16, pse=False)  # no dpse: the deterministic cores run in parallel threads
    det = dataclasses.replace(SMALL, accumulate="deterministic")
    runs = [_grad(args, kw, det) for _ in range(3)] + [_grad(args, kw, SMALL, deterministic=True)]
    for r in runs[1:]:
        for name in ("dq", "dk", "dv"):
            assert np.array_equal(getattr(r, name).view(np.uint16), getattr(runs[0], name).view(np.uint16)), name


def test_atomic_and_deterministic_differ_only_in_summation_order():
    """Both are within tolerance (above); here: they really are two accumulation schemes (fp32 slot sums in
    another order), not one code path under two names -- on this many-item case some bits differ."""
    args, kw = _case(np.float32, pse=False, dropout=False)
    a = _grad(args, kw, SMALL)
    d = _grad(args, kw, SMALL, deterministic=True)
    assert any(not np.array_equal(getattr(a, n), getattr(d, n)) for n in ("dq", "dk", "dv"))
    for n in ("dq", "dk", "dv"):
        np.testing.assert_allclose(getattr(a, n), getattr(d, n), rtol=1e-5, atol=1e-6)


# ---- capacities ------------------------------------------------------------------------------------
F16_MASK = KernelSpec("bwd", "float16", 128, 128, full_mask=True, dropout=True)
OVERFLOW = {  # knob changes that overflow exactly one buffer (tests/test_ascend_schedule.py checks that)
    "l0a": dict(base_m=256, base_k=128, base_n=64, kv_resident=False, db_l0=2),
    "l0b": dict(base_n=256, base_k=128, base_m=64, kv_resident=False, db_l0=2),
    "l0c": dict(base_m=256, base_n=256, base_k=32, kv_resident=False, db_l0c=2),
    "l1": dict(kv_resident=True, dkdv="l1"),
    "ub": dict(vec_rows=48, vec_cols=256, db_ub=2),
}


@pytest.mark.parametrize("buffer", sorted(OVERFLOW))
def test_capacity_violations_never_reach_the_builder(buffer, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("an infeasible point reached the builder")

    monkeypatch.setattr(abwd, "make_bwd", no_build)
    monkeypatch.setattr(type(TARGET), "compile", no_build)
    k = dataclasses.replace(sa.Knobs(), **OVERFLOW[buffer])
    with pytest.raises(ValueError, match=buffer.upper()):
        TARGET.make_funcs(F16_MASK, k, HW)
    with pytest.raises(ValueError, match="infeasible"):
        jit.kernel(TARGET, F16_MASK, knobs=k, use_disk=False)


def test_declared_buffers_are_the_counted_ones_in_ai_core_scopes():
    spec = KernelSpec("bwd", "float16", 64, 64, full_mask=True)
    k = TARGET.default_knobs(spec, HW)
    text = TARGET.make_funcs(spec, k, HW)[TARGET.entry_name(spec, k, HW)].script()
    for name, (shape, dtype, scope) in abwd.core_buffers(spec, k).items():
        assert f'scope="{scope}"' in text, (name, scope)
    used = abwd.scope_bytes(spec, k)
    m = HW["machine"]
    assert used["local.L1"] <= m["l1_bytes"] and used["local.L0C"] <= m["l0c_bytes"]
    assert used["local.UB"] <= m["ub_usable_bytes"]
    # the kernel's own allocations never exceed the analytic accounting the tuner prunes with
    acct = sa.buffer_bytes(spec, k)
    for scope, buf in (("local.L0A", "l0a"), ("local.L0B", "l0b"), ("local.L0C", "l0c"), ("local.L1", "l1")):
        assert used[scope] <= acct[buf], (scope, used[scope], acct[buf])


_FRESH = r"""
import sys, json, numpy as np
sys.path.insert(0, {tests!r})
import fag_tvm, fag_tvm.runtime as rt
from test_package import _inputs
from fag_tvm.testing import a10_problems
pkg = rt.load({pkg!r})
q, k, v, dy, kw = _inputs(1, "BNSD")
f = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
st = dict(softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=f.attention_out)
g = pkg.flash_attention_score_grad(q, k, v, dy, deterministic=True, **st, **kw)
gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **st, **kw)
probs = [p for n in ("dq", "dk", "dv") for p in a10_problems(n, getattr(g, n), getattr(gr, n), "float32")]
maps = open("/proc/self/maps").read()
print(json.dumps({{"probs": probs, "targets": list(pkg.targets),
                  "compiler_mapped": "libtvm_compiler" in maps or "/libtvm.so" in maps,
                  "tvm_imported": "tvm" in sys.modules}}))
"""


def test_aot_package_runs_without_the_compiler(tmp_path):
    """`fag-tvm compile --target ascend-like`: the simulated kernels ship like the llvm ones and run in a fresh
    process with tvm-ffi only."""
    import json
    import os
    import subprocess
    import sys

    from fag_tvm.package import build_package

    out = str(tmp_path / "pkg")
    wl = [{"B": 1, "N1": 2, "N2": 1, "Sq": 64, "Skv": 64, "D": 32, "Dv": 32, "input_layout": "BNSD", "dtype": "fp32",
           "sparse_mode": 3}]
    build_package(wl, out, ("ascend-like",), log=lambda s: None)
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert {a["target"] for a in man["artifacts"]} == {"ascend-like"}
    tests = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", _FRESH.format(tests=tests, pkg=out)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(res)
    assert r["targets"] == ["ascend-like"] and not r["probs"] and not r["compiler_mapped"] and not r["tvm_imported"], r


def test_tune_with_the_model_runner_and_report(tmp_path):
    """`fag-tvm tune --target ascend-like`: the same meta-schedule + XGBoost loop, each candidate built as the
    real kernel (capacity-checked), its time the pipeline model's; best.json keeps the fastest; `fag-tvm report
    --target ascend-like` adds the per-stage breakdown of tuned vs CANN's default (HTML + PNG)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fag_tvm.targets.ascend_like import pipeline_model as pm
    from fag_tvm.targets.ascend_like.machine import Machine
    from fag_tvm.targets.ascend_like.pipeline_model import model_inputs

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TVM_NUM_THREADS="2", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    w = {"B": 1, "N1": 4, "N2": 4, "Sq": 1024, "Skv": 1024, "D": 64, "Dv": 64, "input_layout": "BNSD",
         "dtype": "fp16", "sparse_mode": 3}
    logs = tmp_path / "logs"
    r = subprocess.run([sys.executable, "-m", "fag_tvm.cli", "tune", "--target", "ascend-like", "--workload",
                        json.dumps(w), "--trials", "5", "--per-iter", "2", "--confirm", "0", "--log-dir", str(logs),
                        "--work-dir", str(tmp_path / "ms"), "--no-progress"], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (best,) = list(logs.glob("ascend-like/*/best.json"))
    (e,) = json.loads(best.read_text())["entries"]
    shape, _, _ = model_inputs(w)
    m = Machine(**TARGET.hw()["machine"])
    t_default = pm.predict(shape, sa.to_tiling(sa.from_dict(e["default_knobs"])), m).total_s
    t_tuned = pm.predict(shape, sa.to_tiling(sa.from_dict(e["knobs"])), m).total_s
    assert t_tuned <= t_default  # the model's time is what was "measured": the record agrees with it
    rep = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-m", "fag_tvm.cli", "report", "--target", "ascend-like", "--log-dir",
                        str(logs), "--out", str(rep), "--no-model"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sec = json.loads((rep / "report.json").read_text())["target_section"]
    (row,) = sec["shapes"]
    assert row["best"] == sa.from_dict(e["knobs"]).tag() and row["default_prediction"]["main_binding"]
    assert (rep / "ascend-like" / "stages.png").stat().st_size > 1000
    assert "ascend-like/index.html" in (rep / "index.html").read_text()


def _coverage_seeds() -> list[int]:
    """The random configurations' seeds that together cover the whole feature matrix (test_targets_random)."""
    from test_targets_random import _coverage_keys, seeds

    from confgen import gen_case

    out, covered = [], set()
    for s in seeds():
        k = _coverage_keys(gen_case(s))
        if k - covered:
            out.append(s)
            covered |= k
    return out


@pytest.mark.parametrize("seed", _coverage_seeds())
def test_random_configs_in_deterministic_mode(seed):
    """The contract's random configurations (every layout, mode, pse form, dtype, dropout, GQA, Dv < D, TND)
    through the deterministic accumulation (per-core slots; parallel cores where there is no dpse): within
    SPEC A10 of the reference and bitwise equal across two runs. (The atomic mode runs them in
    test_targets_random.py.)"""
    from confgen import gen_case

    case = gen_case(seed)
    q, k, v, dy = case.args
    kw = {x: y for x, y in case.kwargs.items() if x not in ("softmax_max", "softmax_sum", "attention_in")}
    dt = fag_tvm.arrays.DTYPE_NAMES[np.asarray(q).dtype]
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    st = dict(softmax_max=fr.softmax_max, softmax_sum=fr.softmax_sum, attention_in=fr.attention_out)
    g1 = fag_tvm.flash_attention_score_grad(q, k, v, dy, target="ascend-like", deterministic=True, **st, **kw)
    g2 = fag_tvm.flash_attention_score_grad(q, k, v, dy, target="ascend-like", deterministic=True, **st, **kw)
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **st, **kw)
    for name in ("dq", "dk", "dv", "dpse"):
        a, b = getattr(g1, name), getattr(gr, name)
        assert (a is None) == (b is None), name
        if b is None:
            continue
        probs = a10_problems(name, a, b, dt)
        assert not probs, f"{name}: {probs} for {case.desc}"
        assert np.asarray(a).tobytes() == np.asarray(getattr(g2, name)).tobytes(), f"{name} not bitwise stable"
