"""Hardening of the compiled kernels (issue classes "non-finite inputs" and "finite inputs never give
NaN/Inf"), on every compiled target against the float64 reference:

* a NaN or ±Inf in any input (q, k, v, dy, attention_in, softmax stats, pse of every form) makes every
  output of its task NaN — the same elements on the target and on the reference — and every other output
  finite and within tolerance (README "Decisions": non-finite inputs poison their task);
* finite inputs of extreme magnitude (scores overflowing fp32, huge dy/o, inconsistent stats, tiny
  keep_prob) never give NaN or Inf on any target."""
from __future__ import annotations

import numpy as np
import pytest

import fag_tvm
from fag_tvm import masks
from fag_tvm.dropout import gen_drop_mask
from fag_tvm.testing import a10_problems

F32MAX = float(np.finfo(np.float32).max)


def _base(seed, layout="BNSD", dtype=np.float32, B=2, N1=4, N2=2, S=24, D=8, pse=None, mode=None):
    rng = np.random.default_rng(seed)
    shp = {"BNSD": lambda N, d: (B, N, S, d), "BSH": lambda N, d: (B, S, N * d),
           "TND": lambda N, d: (B * S, N, d)}[layout]
    q, k, v, dy = (rng.standard_normal(shp(n, D)).astype(dtype) for n in (N1, N2, N2, N1))
    kw = dict(head_num=N1, input_layout=layout, scale_value=D ** -0.5)
    if layout == "TND":
        kw.update(actual_seq_qlen=np.arange(1, B + 1) * S, actual_seq_kvlen=np.arange(1, B + 1) * S)
    if mode is not None:
        kw.update(sparse_mode=mode, atten_mask=masks.compressed_causal_mask())
    if pse == "BNSS":
        kw.update(pse_shift=(0.1 * rng.standard_normal((B, N1, S, S))).astype(dtype))
    elif pse == "1NSS":
        kw.update(pse_shift=(0.1 * rng.standard_normal((1, N1, S, S))).astype(dtype))
    elif pse == "BN1S":
        kw.update(pse_shift=(0.1 * rng.standard_normal((B, N1, 1, S))).astype(dtype))
    elif pse == "slopes":
        kw.update(pse_shift=rng.uniform(0.1, 0.5, (B, N1)).astype(np.float32), pse_type=2)
    return [q, k, v, dy], kw


def _compare(target, got, ref, dtype, where):
    for name in got:
        a, b = got[name], ref[name]
        if b is None:
            assert a is None, name
            continue
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.array_equal(np.isnan(a64), np.isnan(b64)), \
            f"{where} {name}: NaN pattern differs ({int(np.isnan(a64).sum())} on {target} vs {int(np.isnan(b64).sum())})"
        assert np.all(np.isfinite(a64[~np.isnan(b64)])), f"{where} {name}: inf on {target}"
        probs = a10_problems(name, a64[~np.isnan(b64)], b64[~np.isnan(b64)], dtype) if name not in (
            "softmax_max", "softmax_sum") else a10_problems(name, np.nan_to_num(a64), np.nan_to_num(b64), dtype)
        assert not probs, f"{where}: {probs}"


def _run_both(target, args, kw, stats=None):
    q, k, v, dy = args
    f = fag_tvm.flash_attention_score(q, k, v, target=target, **kw)
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    st = stats or dict(softmax_max=fr.softmax_max, softmax_sum=fr.softmax_sum, attention_in=fr.attention_out)
    g = fag_tvm.flash_attention_score_grad(q, k, v, dy, target=target, **st, **kw)
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **st, **kw)
    return (dict(attention_out=f.attention_out, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum),
            dict(attention_out=fr.attention_out, softmax_max=fr.softmax_max, softmax_sum=fr.softmax_sum),
            dict(dq=g.dq, dk=g.dk, dv=g.dv, dpse=g.dpse), dict(dq=gr.dq, dk=gr.dk, dv=gr.dv, dpse=gr.dpse))


# ------------------------------------------------------------------------------------------------
# non-finite inputs


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tensor", ["query", "key", "value", "dy"])
@pytest.mark.parametrize("layout,mode", [("BNSD", None), ("BSH", 3), ("TND", 2)])
def test_nonfinite_input_poisons_its_task(target, tensor, value, layout, mode):
    args, kw = _base(7, layout, mode=mode)
    idx = {"query": 0, "key": 1, "value": 2, "dy": 3}[tensor]
    x = args[idx].reshape(-1).copy()
    pos = int(np.random.default_rng(hash((tensor, layout)) % 1000).integers(0, x.size))
    x[pos] = value
    args[idx] = x.reshape(args[idx].shape)
    f, fr, g, gr = _run_both(target, args, kw)
    _compare(target, f, fr, "float32", "forward")
    _compare(target, g, gr, "float32", "backward")
    # the poison is confined: one task's outputs are NaN, the others' are finite
    n_bad = sum(int(np.isnan(np.asarray(a, np.float64)).sum()) for a in g.values() if a is not None)
    assert 0 < n_bad < sum(np.asarray(a).size for a in g.values() if a is not None)


@pytest.mark.parametrize("which", ["softmax_max", "softmax_sum", "attention_in"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_stats_or_output_poison_the_backward(target, which, value):
    args, kw = _base(8)
    q, k, v, dy = args
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    st = dict(softmax_max=fr.softmax_max.copy(), softmax_sum=fr.softmax_sum.copy(),
              attention_in=fr.attention_out.copy())
    st[which].reshape(-1)[8 * 30 if which != "attention_in" else 100] = value
    _, _, g, gr = _run_both(target, args, kw, stats=st)
    _compare(target, g, gr, "float32", "backward")
    assert any(np.isnan(np.asarray(a, np.float64)).any() for a in g.values() if a is not None)


@pytest.mark.parametrize("pse", ["BNSS", "1NSS", "BN1S", "slopes"])
@pytest.mark.parametrize("value", [np.nan, -np.inf])
def test_nonfinite_pse_poisons(target, pse, value):
    args, kw = _base(9, pse=pse, mode=2)
    p = kw["pse_shift"].copy()
    p.reshape(-1)[min(5, p.size - 1)] = value
    kw["pse_shift"] = p
    f, fr, g, gr = _run_both(target, args, kw)
    _compare(target, f, fr, "float32", "forward")
    _compare(target, g, gr, "float32", "backward")


def test_nonfinite_in_masked_region_still_poisons_by_the_task_rule(target):
    """The rule is per task, not per visible cell (a NaN key that every query masks still poisons its task):
    tiling-independent and identical on every target."""
    args, kw = _base(10, mode=2)
    k = args[1].copy()
    k[0, 0, -1, 0] = np.nan  # the last key of batch 0: under the causal mask only the last query sees it
    args[1] = k
    _, _, g, gr = _run_both(target, args, kw)
    _compare(target, g, gr, "float32", "backward")


# ------------------------------------------------------------------------------------------------
# finite inputs of extreme magnitude


def _all_finite(res: dict) -> bool:
    return all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in res.values() if a is not None)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", ["huge_qk", "huge_scale", "huge_dy_o", "tiny_sum", "mixed_signs", "tiny_keep"])
def test_finite_inputs_never_give_nan_or_inf(target, case, dtype):
    hi = 6e4 if dtype == np.float16 else 3e38
    args, kw = _base(11, dtype=dtype, mode=3)
    q, k, v, dy = (x.astype(np.float32) for x in args)
    stats = None
    if case == "huge_qk":
        q, k = q * (hi / 4), k * (hi / 4)
    elif case == "huge_scale":
        kw["scale_value"] = 1e30
    elif case == "huge_dy_o":
        with np.errstate(over="ignore"):  # overflow to inf here; clipped to finite below
            dy, v = dy * (hi / 2), v * (hi / 2)
    elif case == "mixed_signs":
        q = np.where(np.arange(q.size).reshape(q.shape) % 2, hi / 2, -hi / 2)
        k = np.full_like(k, hi / 3)
    elif case == "tiny_keep":
        kw.update(keep_prob=1e-30 if dtype == np.float32 else 1e-7,
                  drop_mask=gen_drop_mask(2, 4, 24, 24, 0.5, seed=1))
    args = [np.clip(x, -0.9 * hi, 0.9 * hi).astype(dtype) for x in (q, k, v, dy)]  # finite by construction
    assert all(np.all(np.isfinite(x.astype(np.float64))) for x in args)
    if case == "tiny_sum":
        smax = np.full((2, 4, 24, 8), -1e30, np.float32)
        ssum = np.full((2, 4, 24, 8), 1e-30, np.float32)
        stats = dict(softmax_max=smax, softmax_sum=ssum, attention_in=args[3] * 1000)
    q, k, v, dy = args
    f = fag_tvm.flash_attention_score(q, k, v, target=target, **kw)
    assert _all_finite(f._asdict() | {"softmax_out": None}), case
    st = stats or dict(softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=f.attention_out)
    g = fag_tvm.flash_attention_score_grad(q, k, v, dy, target=target, **st, **kw)
    assert _all_finite(g._asdict()), case
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **st, **kw)
    assert _all_finite(gr._asdict()), case  # the reference saturates the same way (its outputs clip)
