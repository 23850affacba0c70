"""The ascend-like schedule template (schedules/ascend_like.py): knobs, CANN's default choice, and the
analytic prune that keeps every capacity, fractal and alignment violation away from the builder.

* one test per on-chip buffer (L1, L0A, L0B, L0C, UB): a point that overflows exactly that buffer is
  rejected naming it, the same point shrunk to the capacity is accepted;
* the fractal, AIV-halving, 32-byte row, repeat-count and GM-alignment rules;
* CANN's default is feasible over a grid of head dims, dtypes, masks, shapes and modes, and is the
  documented 512 x 512 / 128 x 128 tiling on the long causal fp16 shape;
* knobs map onto the pipeline model, and every feasible point of a sweep gets a prediction."""
from __future__ import annotations

import dataclasses
import json

import pytest

from fag_tvm.core.spec import KernelSpec
from fag_tvm.schedules import ascend_like as sa
from fag_tvm.targets.ascend_like import machine as am
from fag_tvm.targets.ascend_like import pipeline_model as pm

M = am.load()
F16 = KernelSpec("bwd", "float16", 128, 128)
F16_MASK = KernelSpec("bwd", "float16", 128, 128, full_mask=True, dropout=True)


def _only_violation(spec, k, buffer):
    used = sa.buffer_bytes(spec, k)
    over = [b for b in used if used[b] > getattr(M, sa.CAPACITY[b])]
    return over == [buffer]


# (knob changes that overflow exactly one buffer, that buffer, the changes that bring it back to capacity)
BUFFER_CASES = {
    "l0a": (dict(base_m=256, base_k=128, base_n=64, kv_resident=False, db_l0=2), dict(db_l0=1)),
    "l0b": (dict(base_n=256, base_k=128, base_m=64, kv_resident=False, db_l0=2), dict(db_l0=1)),
    "l0c": (dict(base_m=256, base_n=256, base_k=32, kv_resident=False, db_l0c=2), dict(db_l0c=1, base_n=128)),
    "l1": (dict(kv_resident=True, dkdv="l1"), dict(dkdv="gm")),
    "ub": (dict(vec_rows=48, vec_cols=256, db_ub=2), dict(vec_rows=32)),
}


@pytest.mark.parametrize("buffer", sorted(BUFFER_CASES))
def test_each_buffer_overflow_is_rejected_before_building(buffer):
    over, fix = BUFFER_CASES[buffer]
    k = dataclasses.replace(sa.Knobs(), **over)
    assert _only_violation(F16_MASK, k, buffer), sa.buffer_bytes(F16_MASK, k)
    ok, why = sa.prune(F16_MASK, k, M)
    assert not ok and why.startswith(buffer.upper())
    k2 = dataclasses.replace(k, **fix)
    assert sa.prune(F16_MASK, k2, M) == (True, "")
    assert sa.buffer_bytes(F16_MASK, k2)[buffer] <= getattr(M, sa.CAPACITY[buffer])


def test_buffer_capacities_come_from_the_machine():
    k = sa.Knobs()  # CANN's 512 x 512 at D = 128 uses all of L1 with K/V resident
    assert sa.buffer_bytes(F16, k)["l1"] == M.l1_bytes and sa.prune(F16, k, M)[0]
    small = M.with_params(l1_bytes=M.l1_bytes - 1024)
    ok, why = sa.prune(F16, k, small)
    assert not ok and why.startswith("L1")


@pytest.mark.parametrize("changes, words", [
    (dict(cv_s1=200), "fractal"), (dict(cv_s2=8), "fractal"), (dict(base_k=24), "fractal's K"),
    (dict(cv_s1=48), "two AIVs"), (dict(base_m=1024), "larger than the CV block"),
    (dict(vec_rows=512), "larger than the AIV half"), (dict(vec_cols=8), "32-byte"),
    (dict(vec_rows=64, vec_cols=512), "repeats"), (dict(db_ub=3), "1 or 2"), (dict(dkdv="l0"), "unknown choice"),
])
def test_structural_rules(changes, words):
    ok, why = sa.prune(F16_MASK, dataclasses.replace(sa.Knobs(), **changes), M)
    assert not ok and words in why, why


def test_rows_with_a_mask_align_to_32_elements():
    k = sa.Knobs()
    assert not sa.prune(F16_MASK, dataclasses.replace(k, vec_cols=16), M)[0]  # 16 fp32 = 64 B, but a mask
    assert sa.prune(F16, dataclasses.replace(k, vec_cols=16), M)[0]  # no mask: 32-byte rows suffice


def test_gm_workspace_alignment():
    k = dataclasses.replace(sa.Knobs(), cv_s1=32, cv_s2=16, base_m=32, base_n=16, vec_rows=16, vec_cols=16,
                            handoff_bytes=2)
    assert (k.cv_s1 * k.cv_s2 * 2) % 512 == 0 and sa.prune(F16, k, M)[0]
    assert not sa.prune(F16, k, M.with_params(gm_align_bytes=2048))[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [16, 64, 80, 128, 192, 256])
def test_cann_default_is_feasible(dtype, d):
    for mask in (False, True):
        spec = KernelSpec("bwd", dtype, d, d, full_mask=mask, dropout=mask, pse="ext" if mask else "none")
        for sparse, s1, s2 in ((True, 4096, 4096), (False, 1000, 1000), (False, 100, 3000), (False, 1, 1)):
            for det in (False, True):
                k = sa.cann_default(spec, s1, s2, sparse, M, det)
                assert sa.prune(spec, k, M) == (True, ""), (k.tag(), sa.prune(spec, k, M))


def test_cann_default_is_the_documented_tiling():
    k = sa.cann_default(F16, 4096, 4096, True, M)
    assert (k.cv_s1, k.cv_s2, k.base_m, k.base_n, k.vec_rows, k.vec_cols) == (512, 512, 128, 128, 32, 256)
    assert k.kv_resident and k.handoff_bytes == 4 and k.dkdv == "gm" and k.accumulate == "atomic"
    d64 = sa.cann_default(KernelSpec("bwd", "float16", 64, 64), 4096, 4096, True, M)
    assert d64.base_n == 256 and d64.db_l0c == 1  # 128 x 256 fp32 fills L0C
    assert sa.cann_default(F16, 4096, 4096, True, M, deterministic=True).cv_s1 == 256
    short = sa.cann_default(F16, 1000, 1000, False, M)
    assert short.cv_s1 * short.cv_s2 <= 512 * 512 and max(short.cv_s1, short.cv_s2) <= 1024


def test_knobs_map_onto_the_model_and_a_sweep_is_priced():
    shape = pm.Shape(1, 16, 16, 4096, 4096, 128, 128, "fp16", next_tokens=0)
    default = pm.predict(shape, sa.to_tiling(sa.cann_default(F16, 4096, 4096, True, M)), M)
    assert default.total_s == pm.predict(shape, pm.CANN_DEFAULT, M).total_s
    assert sa.to_tiling(dataclasses.replace(sa.Knobs(), db_ub=1)).double_buffer is False
    pts = sa.feasible_points(F16, M, fixed=dict(base_k=64, vec_rows=32, vec_cols=256, db_l1=2, db_l0=2, db_ub=2,
                                                db_l0c=2, kv_resident=True, accumulate="atomic"))
    assert pts and all(sa.prune(F16, k, M)[0] for k in pts)
    best = min(pts, key=lambda k: pm.predict(shape, sa.to_tiling(k), M).total_s)
    assert pm.predict(shape, sa.to_tiling(best), M).total_s <= default.total_s


def test_fp32_inputs_hand_off_in_fp32():
    f32 = KernelSpec("bwd", "float32", 64, 64)
    k = dataclasses.replace(sa.Knobs(), cv_s1=128, cv_s2=256, kv_resident=False)
    assert sa.prune(f32, k, M)[0]
    ok, why = sa.prune(f32, dataclasses.replace(k, handoff_bytes=2), M)
    assert not ok and "precision" in why


def test_model_search_beats_cann_default_on_suite_shapes():
    """Exhaustive search of the feasible space under the model finds a tiling predicted faster than CANN's
    default on at least three suite shapes; on S9 (bf16 causal, 8 heads, S=2048) the win comes from balancing
    the work items over the 24 cores and from the fp16 hand-off taking FixPipe off Cube1's binding pipe."""
    from fag_tvm.targets.ascend_like import search
    from fag_tvm.workloads import SUITE

    results = {sid: search.search(w) for sid, w in SUITE.items()}
    assert sum(r.speedup > 1.05 for r in results.values()) >= 3
    assert all(r.speedup >= 1.0 for r in results.values())
    s9 = results["S9"]
    assert s9.default_prediction.cube1.binding == "FIX" and s9.best.handoff_bytes == 2
    assert s9.best_prediction.cube1.binding == "M"
    assert s9.default_prediction.items % 24 != 0 and s9.best_prediction.items % 24 == 0


def test_model_report_writes_html_png_json(tmp_path):
    """The model report: per shape the default and model-best tilings with per-stage binding pipes, the
    machine's parameters with labels and sources; labelled as predictions."""
    from fag_tvm.targets.ascend_like import model_report
    from fag_tvm.workloads import SUITE

    summary = model_report.write(str(tmp_path), {k: SUITE[k] for k in ("S8", "S9")}, M)
    page = (tmp_path / "index.html").read_text()
    assert (tmp_path / "stages.png").stat().st_size > 0 and "no NPU ran" in page and "fixpipe_rate" in page
    assert [r["id"] for r in summary["shapes"]] == ["S8", "S9"]
    assert all(r["speedup"] >= 1.0 and r["default_prediction"]["cube1"]["binding"] for r in summary["shapes"])
    assert json.loads((tmp_path / "model_report.json").read_text())["machine"] == "910B2"
