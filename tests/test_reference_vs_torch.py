"""fag_tvm.reference (float64 NumPy) against an independent float64 torch-autograd formulation of SPEC.md.

* `test_reference_matches_torch`: N_CONFIGS random configurations (tests/confgen.py), in batches. For every
  configuration all outputs of `reference.exact` (O, softmax_max, softmax_sum, dq, dk, dv, dpse) agree with
  tests/torch_oracle.py to ≤ 1e-10 relative error ‖a−b‖₂/‖b‖₂ (with an absolute floor of 1e-4 RMS, so an output
  that is mathematically 0 — e.g. dq when every query row sees exactly one key — compares on rounding noise).
  Where CANN's backward and plain autograd coincide (no fully masked row, or invalid-line mode), the oracle is
  plain autograd; ≥ 300 such configurations are required per run. Elsewhere the oracle runs in its CANN mode
  (masked cells pass the gradient through), and plain autograd must still agree on O, the stats and dv.
* `test_public_api_matches_torch`: the public reference API (outputs in the input dtype, fp32 stats and O fed
  back into the backward) at the SPEC A10 tolerances and CANN's element rule.
* Explicit tests for fully masked rows: invalid-line mode (inner_precise=2 and CANN's automatic enabling) and
  the uniform-P case without it, where CANN's dq/dk/dpse differ from plain autograd.
"""
from __future__ import annotations

import numpy as np
import pytest

import fag_tvm
from fag_tvm import masks

from confgen import gen_case
from torch_oracle import (FLT_MAX, INT32_MAX, OUTPUT_KEYS, cann_bad_ratio, compare, oracle, plan, rel_err,
                          structural_masked)

N_CONFIGS = 420
BATCH = 30
EXACT = 1e-10
KEYS = OUTPUT_KEYS
A10 = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}


def check_case(case) -> list[str]:
    """All comparisons of one configuration; returns failure lines naming the config."""
    out = []
    ref = fag_tvm.reference.exact(*case.args, **case.kwargs)
    orc = oracle(*case.args, **case.kwargs, masked_cells_carry_grad=not case.coincide)
    errs = compare(ref, orc)
    if errs:
        out.append(f"{case!r} [{'autograd' if case.coincide else 'CANN-mode'}]: {errs}")
    if not case.coincide:  # plain autograd still gives CANN's forward and dv (dv does not go through S)
        pure = oracle(*case.args, **case.kwargs)
        errs = compare(ref, pure, keys=("attention_out", "softmax_max", "softmax_sum", "dv"))
        if errs:
            out.append(f"{case!r} [autograd fwd/dv]: {errs}")
    return out


@pytest.mark.parametrize("start", range(0, N_CONFIGS, BATCH))
def test_reference_matches_torch(start):
    failures = []
    for seed in range(start, start + BATCH):
        case = gen_case(seed)
        try:
            failures += check_case(case)
        except Exception as exc:  # noqa: BLE001 - report the config that crashed
            failures.append(f"{case!r}: raised {exc!r}")
    assert not failures, "\n".join(failures)


def test_enough_coinciding_configs_and_coverage():
    """≥ 300 configurations per run where CANN and autograd coincide; every axis of the matrix is hit."""
    cases = [gen_case(s) for s in range(N_CONFIGS)]
    n = sum(c.coincide for c in cases)
    assert n >= 300, n
    assert any(not c.coincide for c in cases)  # and some where they differ (CANN-mode oracle)
    tags = lambda k: {str(c.tags.get(k)) for c in cases}  # noqa: E731
    assert tags("layout") == {"BSH", "SBH", "BSND", "BNSD", "TND"}
    assert {str(m) for m in range(9)} | {"none"} <= tags("mode")
    assert {c.tags["mode"] for c in cases if c.tags["layout"] != "TND"} >= {0, 1, 2, 3, 4, 5, 6}
    assert {c.tags["mode"] for c in cases if c.tags["layout"] == "TND"} >= {0, 1, 2, 3, 4, 6, 7, 8}
    pse = tags("pse")
    for form in ("pse0-BNSS", "pse1-BNSS", "pse0-1NSS", "pse1-1NSS", "pse0-BN1S", "pse1-BN1S",
                 "pse0-TND_BNSS", "pse1-TND_BNSS", "pse0-TND_BN1S", "pse1-TND_BN1S",
                 "pse2-N", "pse2-BN", "pse3-N", "pse3-BN"):
        assert form in pse, form
    assert any("HS" in p for p in pse)
    alibi_tnd = [c for c in cases if c.tags["layout"] == "TND" and "HS" in c.tags["pse"]]
    alibi = [c for c in cases if c.tags.get("alibi")]
    assert alibi_tnd and len(alibi) >= 5 and {c.desc.split()[4] for c in alibi} == {"S1024", "S1040"}
    assert tags("dtype") == {"float32", "float16", "bfloat16"}
    assert tags("dropout") == {"True", "False"} and tags("gqa") == {"True", "False"}
    assert "True" in tags("dv_lt_d") and "True" in tags("zero_len") and "True" in tags("trailing")
    assert any(c.invalid_mode and c.fully_masked_rows for c in cases)
    assert any(" Sq1 " in c.desc for c in cases) and any(" D1 " in c.desc for c in cases)


@pytest.mark.parametrize("start", range(0, N_CONFIGS, 105))
def test_public_api_matches_torch(start):
    """Reference API outputs (input dtype; fp32 stats and O fed to the backward) vs float64 torch, SPEC A10."""
    failures = []
    for seed in range(start, start + 105, 3):
        case = gen_case(seed)
        if case.tags.get("alibi"):
            continue
        q, k, v, dy = case.args
        f = fag_tvm.reference.flash_attention_score(q, k, v, **case.kwargs)
        g = fag_tvm.reference.flash_attention_score_grad(
            q, k, v, dy, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=f.attention_out,
            **case.kwargs)
        carry = not case.coincide
        orc = oracle(*case.args, **case.kwargs, masked_cells_carry_grad=carry)
        # the backward's inputs include attention_in and the stats: the float64 oracle uses the same rounded
        # ones (A10 "on the same, already-rounded inputs"), so O's rounding is not mistaken for an error
        orc_b = oracle(*case.args, **case.kwargs, masked_cells_carry_grad=carry, softmax_max=f.softmax_max,
                       softmax_sum=f.softmax_sum, attention_in=f.attention_out)
        orc = dict(orc, dq=orc_b["dq"], dk=orc_b["dk"], dv=orc_b["dv"], dpse=orc_b["dpse"])
        dt = case.tags["dtype"]
        assert f.attention_out.dtype == q.dtype and g.dq.dtype == q.dtype and g.dv.dtype == v.dtype
        assert f.softmax_max.dtype == np.float32 and f.softmax_sum.dtype == np.float32
        got = dict(attention_out=f.attention_out, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                   dq=g.dq, dk=g.dk, dv=g.dv, dpse=g.dpse)
        errs = compare(got, orc, tol=A10[dt])
        if dt == "float32":
            for key in KEYS:
                if got[key] is not None and cann_bad_ratio(got[key], orc[key]) > 1e-3:
                    errs[key + " (CANN element rule)"] = cann_bad_ratio(got[key], orc[key])
        for key in ("attention_out", "dq", "dk", "dv"):
            if not np.all(np.isfinite(got[key].astype(np.float64))):
                errs[key + " finite"] = False
        if errs:
            failures.append(f"{case!r}: {errs}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------- fully masked rows

def _arrays(rng, B, N1, N2, Sq, Skv, D, Dv):
    q = rng.standard_normal((B, N1, Sq, D))
    k = rng.standard_normal((B, N2, Skv, D))
    v = rng.standard_normal((B, N2, Skv, Dv))
    dy = rng.standard_normal((B, N1, Sq, Dv))
    return [x.astype(np.float32) for x in (q, k, v, dy)]


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _check_invalid_rows(args, kw, dead):
    """dead: bool [B, N1, Sq] of rows that must be invalid (output 0, stats −FLT_MAX / +FLT_MAX)."""
    q, k, v, dy = args
    f = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    o = np.asarray(f.attention_out)
    assert dead.any() and not dead.all()
    assert np.all(o[dead] == 0)
    assert np.all(np.abs(o[~dead]).sum(-1) > 0)
    mx, sm = _bits(f.softmax_max), _bits(f.softmax_sum)
    assert np.all(mx[dead] == 0xFF7FFFFF) and np.all(sm[dead] == 0x7F7FFFFF)  # all 8 lanes
    assert np.all(mx[~dead] != 0xFF7FFFFF)
    # backward from those stats: the rows contribute exactly 0
    g = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max,
                                                     softmax_sum=f.softmax_sum, attention_in=f.attention_out, **kw)
    assert np.all(g.dq[dead] == 0)
    if g.dpse is not None and g.dpse.shape[2] == q.shape[2]:
        assert np.all(np.broadcast_to(g.dpse, dead.shape + (k.shape[2],))[dead] == 0)
    # float64 agreement with plain autograd where the oracle zeroes invalid rows on its own
    ref = fag_tvm.reference.exact(q, k, v, dy, **kw)
    orc = oracle(q, k, v, dy, **kw)
    assert orc["plan"].invalid_mode
    assert not compare(ref, orc), compare(ref, orc)
    # ... and they differ from a formulation without invalid-row handling (uniform P over the masked row)
    naive = oracle(q, k, v, dy, **kw, invalid_rows=False)
    assert np.abs(naive["attention_out"][dead]).max() > 1e-3
    assert np.all(naive["softmax_sum"][dead][:, 0] == k.shape[2])
    return f, g


def test_invalid_rows_inner_precise_2():
    rng = np.random.default_rng(1)
    args = _arrays(rng, 2, 4, 2, 6, 5, 8, 8)
    mask = rng.random((2, 4, 6, 5)) < 0.3
    mask[0, 1, 2] = True
    mask[1, 3, 0] = True
    mask[1, 0, 5] = True
    mask[0, 1, 3] = False  # at least partly visible
    pse = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    kw = dict(head_num=4, input_layout="BNSD", sparse_mode=1, atten_mask=mask, inner_precise=2, pse_shift=pse,
              scale_value=0.4)
    _check_invalid_rows(args, kw, mask.all(-1))


def test_fully_masked_rows_need_inner_precise_2_when_not_structural():
    """A fully masked row from the element-wise mask alone does not enable invalid-line mode (§8)."""
    rng = np.random.default_rng(2)
    args = _arrays(rng, 1, 2, 2, 4, 5, 4, 4)
    mask = np.zeros((4, 5), bool)
    mask[2] = True
    for ip in (0, 1):
        f = fag_tvm.reference.flash_attention_score(*args[:3], head_num=2, input_layout="BNSD", atten_mask=mask,
                                                    inner_precise=ip)
        np.testing.assert_allclose(f.attention_out[0, :, 2], args[2][0].mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("name,B,Sq,Skv,kw", [
    ("mode3 Sq>Skv", 2, 9, 5, dict(sparse_mode=3)),
    ("mode0 next<0", 1, 7, 7, dict(sparse_mode=0, pre_tokens=10, next_tokens=-2)),
    ("mode0 pre<Sq-Skv", 1, 9, 4, dict(sparse_mode=0, pre_tokens=2, next_tokens=3)),
    ("mode4 next'<0", 2, 6, 8, dict(sparse_mode=4, pre_tokens=INT32_MAX, next_tokens=-4)),
    ("mode4 pre'<Sq-Skv", 1, 8, 6, dict(sparse_mode=4, pre_tokens=-3, next_tokens=6)),
    ("mode5 Sq>Skv prefix0", 2, 8, 5, dict(sparse_mode=5, prefix=[0, 2])),
    ("mode6 Sq>Skv prefix0", 2, 8, 5, dict(sparse_mode=6, prefix=[2, 0])),
])
def test_invalid_rows_enabled_automatically(name, B, Sq, Skv, kw):
    """CANN enables invalid-line mode itself (SPEC §8) — inner_precise stays 0."""
    rng = np.random.default_rng(3)
    args = _arrays(rng, B, 2, 1, Sq, Skv, 6, 4)
    mode = kw["sparse_mode"]
    if mode in (0, 5):
        m = np.stack([structural_masked(mode, Sq, Skv, kw.get("pre_tokens", INT32_MAX),
                                        kw.get("next_tokens", INT32_MAX), (kw.get("prefix") or [0] * B)[b],
                                        False).numpy() for b in range(B)])[:, None]
        kw = dict(kw, atten_mask=m if mode == 5 else m[0, 0])
    elif mode == 6:
        kw = dict(kw, atten_mask=masks.compressed_prefix_mask())
    else:
        kw = dict(kw, atten_mask=masks.compressed_causal_mask())
    kw.update(head_num=2, input_layout="BNSD")
    p = plan(*args[:3], **kw)
    dead = np.stack([np.broadcast_to(m.all(-1).numpy(), (2, Sq)) for m in p.masks])
    _check_invalid_rows(args, kw, dead)


def test_invalid_rows_tnd_mode3():
    rng = np.random.default_rng(4)
    seq_q, seq_kv = [5, 3, 4], [3, 3, 6]
    q = rng.standard_normal((12, 2, 4)).astype(np.float32)
    k = rng.standard_normal((12, 1, 4)).astype(np.float32)
    v = rng.standard_normal((12, 1, 4)).astype(np.float32)
    dy = rng.standard_normal((12, 2, 4)).astype(np.float32)
    kw = dict(head_num=2, input_layout="TND", actual_seq_qlen=np.cumsum(seq_q), actual_seq_kvlen=np.cumsum(seq_kv),
              sparse_mode=3, atten_mask=masks.compressed_causal_mask())
    f = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    # batch 0: Sq 5 > Skv 3, rows 0, 1 see nothing (j ≤ i − 2)
    assert np.all(f.attention_out[:2] == 0) and np.all(np.abs(f.attention_out[2:]).sum(-1) > 0)
    mx = _bits(f.softmax_max).reshape(-1, 8)  # memory order: per batch, head-major
    dead_rows = [0, 1, 5, 6]  # (b0, n0, i0/i1), (b0, n1, i0/i1)
    assert np.all(mx[dead_rows] == 0xFF7FFFFF)
    assert np.all(np.delete(mx, dead_rows, axis=0) != 0xFF7FFFFF)
    g = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **kw)
    assert np.all(g.dq[:2] == 0)
    ref = fag_tvm.reference.exact(q, k, v, dy, **kw)
    assert not compare(ref, oracle(q, k, v, dy, **kw))


def test_fully_masked_row_without_invalid_mode_is_uniform_and_differs_from_autograd():
    """Without invalid-line mode, a fully masked row has S = −FLT_MAX everywhere: P = 1/Skv, O = mean(V),
    max = −FLT_MAX, sum = Skv (SPEC A2, §8). CANN's backward then uses dS = P∘(dP−D) on all cells (§3), so dq,
    dk and dpse get a contribution plain autograd does not have (masked cells are constants there); dv
    coincides."""
    rng = np.random.default_rng(5)
    B, N, Sq, Skv, D = 1, 2, 5, 7, 6
    q, k, v, dy = _arrays(rng, B, N, N, Sq, Skv, D, D)
    mask = rng.random((Sq, Skv)) < 0.2
    mask[3] = True
    pse = rng.standard_normal((B, N, Sq, Skv)).astype(np.float32)
    scale = 0.5
    kw = dict(head_num=N, input_layout="BNSD", atten_mask=mask, pse_shift=pse, scale_value=scale)
    f = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    np.testing.assert_allclose(f.attention_out[0, :, 3], v[0].astype(np.float64).mean(axis=1), rtol=1e-6)
    assert np.all(f.softmax_max[0, :, 3] == -FLT_MAX) and np.all(f.softmax_sum[0, :, 3] == Skv)
    ref = fag_tvm.reference.exact(q, k, v, dy, **kw)
    cann = oracle(q, k, v, dy, **kw, masked_cells_carry_grad=True)
    pure = oracle(q, k, v, dy, **kw)
    assert not compare(ref, cann)
    assert not compare(ref, pure, keys=("attention_out", "softmax_max", "softmax_sum", "dv"))
    # the differences, explicitly: row 3 of dq is scale·Σ_j (1/Skv)(dP_3j − D_3) K_j in CANN, 0 in autograd
    q64, k64, v64, dy64 = (x.astype(np.float64)[0] for x in (q, k, v, dy))
    o3 = v64.mean(axis=1)  # [N, Dv]
    dP3 = np.einsum("nd,njd->nj", dy64[:, 3], v64)
    D3 = np.sum(dy64[:, 3] * o3, axis=-1, keepdims=True)
    dS3 = (dP3 - D3) / Skv
    np.testing.assert_allclose(ref["dq"][0, :, 3], scale * np.einsum("nj,njd->nd", dS3, k64), rtol=1e-10)
    assert np.all(pure["dq"][0, :, 3] == 0)
    assert np.abs(ref["dq"][0, :, 3]).max() > 1e-3
    np.testing.assert_allclose(ref["dk"] - pure["dk"], scale * np.einsum("nj,nd->njd", dS3, q64[:, 3])[None],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ref["dpse"][0, :, 3], scale * dS3, rtol=1e-10)  # pse_type 1: scale·dS
    assert np.all(pure["dpse"][0, :, 3] == 0)
    others = np.ones(Sq, bool)
    others[3] = False
    assert rel_err(ref["dq"][0, :, others], pure["dq"][0, :, others]) <= EXACT


@pytest.mark.parametrize("mode,seq_q,seq_kv,band", [(7, [4, 5, 0], [6, 5, 3], 1), (8, [0, 4, 5], [3, 6, 5], 1)])
def test_modes_7_8_band_sequence_skips_empty_queries(mode, seq_q, seq_kv, band):
    """Mode 7 bands the LAST sequence with Sq_b ≠ 0, mode 8 the FIRST one (SPEC §5); the band uses the
    per-sequence right-down origin, i.e. equals a B=1 BNSD call with sparse_mode 4 on that sequence."""
    rng = np.random.default_rng(mode)
    T, T2 = sum(seq_q), sum(seq_kv)
    q, k, v, dy = (rng.standard_normal(s).astype(np.float32) for s in ((T, 2, 4), (T2, 1, 4), (T2, 1, 4), (T, 2, 4)))
    kw = dict(head_num=2, input_layout="TND", actual_seq_qlen=np.cumsum(seq_q), actual_seq_kvlen=np.cumsum(seq_kv),
              sparse_mode=mode, atten_mask=masks.compressed_causal_mask(), pre_tokens=1, next_tokens=0)
    assert plan(q, k, v, **kw).band_batch == band
    e = fag_tvm.reference.exact(q, k, v, dy, **kw)
    assert not compare(e, oracle(q, k, v, dy, **kw))
    q0, k0 = int(np.sum(seq_q[:band])), int(np.sum(seq_kv[:band]))
    sl = lambda x, r0, n: np.ascontiguousarray(x[r0:r0 + n].transpose(1, 0, 2)[None])  # noqa: E731
    one = fag_tvm.reference.exact(sl(q, q0, seq_q[band]), sl(k, k0, seq_kv[band]), sl(v, k0, seq_kv[band]),
                                  sl(dy, q0, seq_q[band]), head_num=2, input_layout="BNSD", sparse_mode=4,
                                  atten_mask=masks.compressed_causal_mask(), pre_tokens=1, next_tokens=0)
    assert rel_err(e["attention_out"][q0:q0 + seq_q[band]].transpose(1, 0, 2), one["attention_out"][0]) <= EXACT
    assert rel_err(e["dq"][q0:q0 + seq_q[band]].transpose(1, 0, 2), one["dq"][0]) <= EXACT
