"""The CANN test cases of SPEC §12 as named tests (OT-new `flash_attention_score{,_grad}/tests/pytest/test_case.py`).

Every case runs on every subject (`subject` fixture): the reference and each compiled target.
* reference: checked twice against the independent torch oracle (tests/torch_oracle.py): float64
  `fag_tvm.reference.exact` (forward + backward in float64) ≤ 1e-10 relative error per output, and the
  public reference API in the case's dtype (the forward, then the backward fed with that forward's rounded
  O and fp32 stats) at the SPEC A10 tolerance, with CANN's element rule
  `|a−b| ≤ max(0.005·max(|a|,|b|), 2.5e-5)`: ≥ 99.9 % of elements for fp32, and at most CANN's warning
  ratio 0.5 % for fp16/bf16 (`checkResult` / forward criterion).
* a compiled target: its forward vs the reference forward, its backward (on its own forward's stats) vs
  the reference backward on the same stats, at the full SPEC A10 check (fag_tvm.testing.a10_problems).
Where the CANN table leaves a dimension open, the docstring says what we chose; shapes are the CANN ones
unless the docstring says "shrunk".
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fag_tvm
from fag_tvm import FagError, masks
from fag_tvm.arrays import DTYPE_NAMES
from fag_tvm.dropout import gen_drop_mask, gen_drop_mask_tnd
from fag_tvm.testing import a10_problems

from conftest import compiled_target_names

from confgen import to_layout
from torch_oracle import OUTPUT_KEYS, cann_bad_ratio, compare, oracle, plan

A10 = {np.dtype(np.float32): 2e-5, np.dtype(np.float16): 5e-3}
ref = fag_tvm.reference


def alibi_slopes(n: int) -> np.ndarray:
    """ALiBi slopes of the goldens (`get_slopes`): 2^(−8/n)^(h+1), with the usual interleave for n ≠ 2^k."""
    def pow2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]
    if math.log2(n).is_integer():
        s = pow2(n)
    else:
        c = 2 ** math.floor(math.log2(n))
        s = pow2(c) + pow2(2 * c)[0::2][: n - c]
    return np.array(s, dtype=np.float64)


def inputs(seed, layout, B, N1, N2, Sq, Skv, D, Dv, dt):
    rng = np.random.default_rng(seed)
    mk = lambda N, S, d: to_layout(rng.standard_normal((B, N, S, d)).astype(np.float32), layout).astype(dt)  # noqa
    return [mk(N1, Sq, D), mk(N2, Skv, D), mk(N2, Skv, Dv), mk(N1, Sq, Dv)], rng


def tnd_inputs(seed, seq_q, seq_kv, N1, N2, D, Dv, dt):
    rng = np.random.default_rng(seed)
    T, T2 = sum(seq_q), sum(seq_kv)
    mk = lambda S, N, d: rng.standard_normal((S, N, d)).astype(np.float32).astype(dt)  # noqa: E731
    kw = dict(input_layout="TND", head_num=N1, actual_seq_qlen=np.cumsum(seq_q), actual_seq_kvlen=np.cumsum(seq_kv))
    return [mk(T, N1, D), mk(T2, N2, D), mk(T2, N2, Dv), mk(T, N1, Dv)], kw, rng


@pytest.fixture(params=["reference", *compiled_target_names()])
def subject(request) -> str:
    """What a named case checks: the reference (vs torch) or a compiled target (vs the reference)."""
    if request.param != "reference":
        ok, why = fag_tvm.targets.get(request.param).availability()
        if not ok:
            pytest.skip(f"target {request.param} not available here: {why}")
    return request.param


def check(args, kw, forward_only=False, subject="reference"):
    """reference: float64 exact vs oracle ≤ 1e-10, and the dtype API at A10 + the CANN element rule.
    A compiled target: its forward and backward vs the reference at A10. Returns (outputs dict, forward)."""
    if subject != "reference":
        return check_target(args, kw, forward_only, subject)
    q, k, v, dy = args
    coincide = plan(q, k, v, **kw).coincide
    e = ref.exact(q, k, v, dy, **kw)
    o = oracle(q, k, v, dy, **kw, masked_cells_carry_grad=not coincide)
    errs = compare(e, o)
    assert not errs, f"float64 reference vs torch: {errs}"
    f = ref.flash_attention_score(q, k, v, **kw)
    got = dict(attention_out=f.attention_out, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum)
    want = o
    if not forward_only:
        g = ref.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                           attention_in=f.attention_out, **kw)
        got.update(dq=g.dq, dk=g.dk, dv=g.dv, dpse=g.dpse)
        ob = oracle(q, k, v, dy, **kw, masked_cells_carry_grad=not coincide, softmax_max=f.softmax_max,
                    softmax_sum=f.softmax_sum, attention_in=f.attention_out)
        want = dict(o, dq=ob["dq"], dk=ob["dk"], dv=ob["dv"], dpse=ob["dpse"])
    keys = [x for x in OUTPUT_KEYS if x in got]
    errs = compare(got, want, keys=keys, tol=A10[q.dtype])
    assert not errs, f"{q.dtype} API vs torch (A10): {errs}"
    for key in keys:
        if got[key] is None:
            continue
        assert np.all(np.isfinite(np.asarray(got[key], dtype=np.float64))), key
        bad = cann_bad_ratio(got[key], want[key])
        assert bad <= (1e-3 if q.dtype == np.float32 else 5e-3), (key, bad)
    return e, f


def check_target(args, kw, forward_only, target):
    q, k, v, dy = args
    dt = DTYPE_NAMES[q.dtype]
    f = fag_tvm.flash_attention_score(q, k, v, target=target, **kw)
    fr = ref.flash_attention_score(q, k, v, **kw)
    probs = []
    for name in ("attention_out", "softmax_max", "softmax_sum"):
        probs += a10_problems(name, getattr(f, name), getattr(fr, name), dt)
    out = dict(attention_out=f.attention_out, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum)
    if not forward_only:
        st = dict(softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=f.attention_out)
        g = fag_tvm.flash_attention_score_grad(q, k, v, dy, target=target, **st, **kw)
        gr = ref.flash_attention_score_grad(q, k, v, dy, **st, **kw)
        for name in ("dq", "dk", "dv", "dpse"):
            assert (getattr(g, name) is None) == (getattr(gr, name) is None), name
            if getattr(gr, name) is not None:
                probs += a10_problems(name, getattr(g, name), getattr(gr, name), dt)
        out.update(dq=g.dq, dk=g.dk, dv=g.dv, dpse=g.dpse)
    assert not probs, f"{target} vs reference: {probs}"
    return out, f


def check_s(subject, args, kw, forward_only=False):
    return check(args, kw, forward_only, subject)


# ------------------------------------------------------------------------------------- FAG (backward) cases

def test_fag_GQA_01(subject):
    """B1 N1=2 N2=1 S128 D177 fp16 BNSD, sparse_mode 0, no mask (full size)."""
    args, _ = inputs(1, "BNSD", 1, 2, 1, 128, 128, 177, 177, np.float16)
    check_s(subject, args, dict(head_num=2, input_layout="BNSD", scale_value=177 ** -0.5))


def test_fag_MLA_02_like(subject):
    """B1 N1=2 N2=1 S128 D192 Dv128 fp16 BNSD, mode 0 — MLA_02 without rope (rope is not part of V1)."""
    args, _ = inputs(2, "BNSD", 1, 2, 1, 128, 128, 192, 128, np.float16)
    check_s(subject, args, dict(head_num=2, input_layout="BNSD", scale_value=192 ** -0.5))


def test_fag_FP32_05(subject):
    """B9 N1=8 N2=2 S80 D167 fp32 BSND, mode 0 with pre=−26, next=65536 and the consistent B1SS uint8 mask,
    pseType 3 slopes [B,N] = 1/(b+1)·1/(n+1) (full size). Rows i ≥ 54 see nothing: pre' < Sq−Skv enables
    invalid-line mode automatically (§8), so they give O = 0 and stats (−FLT_MAX, +FLT_MAX)."""
    B, N1, N2, S, D = 9, 8, 2, 80, 167
    args, _ = inputs(5, "BSND", B, N1, N2, S, S, D, D, np.float32)
    pre, nxt = -26, 65536
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    band = np.triu(np.ones((S, S), bool), nxt + 1) | np.tril(np.ones((S, S), bool), -pre - 1)
    mask = np.broadcast_to(band, (B, 1, S, S)).astype(np.uint8)
    assert np.array_equal(band, (j - i > nxt) | (i - j > pre))
    slopes = (1.0 / (np.arange(B)[:, None] + 1) / (np.arange(N1)[None, :] + 1)).astype(np.float32)
    kw = dict(head_num=N1, input_layout="BSND", scale_value=D ** -0.5, pre_tokens=pre, next_tokens=nxt,
              atten_mask=mask, pse_shift=slopes, pse_type=3)
    e, f = check_s(subject, args, kw)
    assert np.all(f.attention_out[:, 54:] == 0) and np.all(f.softmax_sum[:, :, 54:] == np.finfo(np.float32).max)
    assert np.all(e["dq"][:, 54:] == 0)


def test_fag_TND_06(subject):
    """N16/16 D128 fp16 TND, mode 3, seqlens [114,132,14,287] for q and kv, 1NHS alibi-compressed pse
    (ALiBi slopes, Toeplitz aligned to the bottom-right: value at local (i,j) = −slope·|i−j|), keep 0.9
    (full size)."""
    seq = [114, 132, 14, 287]
    N, D = 16, 128
    args, kw, rng = tnd_inputs(6, seq, seq, N, N, D, D, np.float16)
    W = max(seq)
    m, c = np.arange(1024)[:, None], np.arange(W)[None, :]
    pse = -alibi_slopes(N)[:, None, None] * np.abs(m - c + (W - 1024))[None]  # m−k = (i−j) − (W−1024)
    kw.update(sparse_mode=3, atten_mask=masks.compressed_causal_mask(), pse_shift=pse[None].astype(np.float16),
              keep_prob=0.9, drop_mask=gen_drop_mask_tnd(N, seq, seq, 0.9, seed=6), scale_value=D ** -0.5)
    e, _ = check_s(subject, args, kw)
    assert e["dpse"] is None  # A6: not computed for the alibi-compressed form (documented)


# ------------------------------------------------------------------------------------- FA (forward) cases

def test_fa_GQA_01(subject):
    """B4 N1=16 N2=8 S256 D128 BSND, mode 3 (full size; fp16). The backward is checked too."""
    args, _ = inputs(11, "BSND", 4, 16, 8, 256, 256, 128, 128, np.float16)
    check_s(subject, args, dict(head_num=16, input_layout="BSND", sparse_mode=3,
                                atten_mask=masks.compressed_causal_mask(), scale_value=128 ** -0.5))


def test_fa_MLA_03(subject):
    """D192 Dv128 BSH; we chose B2 N4 S96 fp16, no mask."""
    args, _ = inputs(12, "BSH", 2, 4, 4, 96, 96, 192, 128, np.float16)
    check_s(subject, args, dict(head_num=4, input_layout="BSH", scale_value=192 ** -0.5), forward_only=True)


@pytest.mark.parametrize("name,ptype,form", [("ALIBI_04", 2, "bn"), ("ALIBI_05", 3, "n")])
def test_fa_ALIBI(subject, name, ptype, form):
    """pseType 2 with slopes [B,N] ("bn", 1/(b+1)·1/(n+1)) and pseType 3 with [N] ("n", ALiBi slopes); we chose
    B2 N8/2 Sq96 Skv128 D64 fp16 BNSD, mode 3, q_start_idx 64 / kv_start_idx 32."""
    B, N1 = 2, 8
    args, _ = inputs(13 + ptype, "BNSD", B, N1, 2, 96, 128, 64, 64, np.float16)
    slopes = (1.0 / (np.arange(B)[:, None] + 1) / (np.arange(N1)[None, :] + 1)) if form == "bn" else alibi_slopes(N1)
    check_s(subject, args, dict(head_num=N1, input_layout="BNSD", sparse_mode=3, atten_mask=masks.compressed_causal_mask(),
                     pse_type=ptype, pse_shift=slopes.astype(np.float32), q_start_idx=[64], kv_start_idx=[32],
                     scale_value=0.125), forward_only=False)


def test_fa_SPARSE_06(subject):
    """D768 SBH, mode 0 with pre = next = 128 and the consistent band mask; we chose B1 N2 S384 fp16."""
    S = 384
    args, _ = inputs(16, "SBH", 1, 2, 2, S, S, 768, 768, np.float16)
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    check_s(subject, args, dict(head_num=2, input_layout="SBH", pre_tokens=128, next_tokens=128,
                     atten_mask=(j - i > 128) | (i - j > 128), scale_value=768 ** -0.5), forward_only=True)


def test_fa_SPARSE_07(subject):
    """mode 4 (band, right-down origin), fp32; we chose B2 N4/2 Sq200 Skv256 D64 BNSD, pre 64, next 16."""
    args, _ = inputs(17, "BNSD", 2, 4, 2, 200, 256, 64, 64, np.float32)
    check_s(subject, args, dict(head_num=4, input_layout="BNSD", sparse_mode=4, atten_mask=masks.compressed_causal_mask(),
                     pre_tokens=64, next_tokens=16, scale_value=0.125), forward_only=True)


def test_fa_SPARSE_08(subject):
    """mode 5, prefix [100,128,130,150] (so B = 4); we chose N2 S160 D64 fp16 BSND with the consistent B1SS
    prefix mask."""
    B, S = 4, 160
    prefix = [100, 128, 130, 150]
    args, _ = inputs(18, "BSND", B, 2, 2, S, S, 64, 64, np.float16)
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    mask = np.stack([(j > i) & (j >= p) for p in prefix])[:, None]
    check_s(subject, args, dict(head_num=2, input_layout="BSND", sparse_mode=5, atten_mask=mask, prefix=prefix,
                     scale_value=0.125), forward_only=True)


def test_fa_DROPOUT_09(subject):
    """Sq256 Skv512, mode 5, keep 0.9, BNSS pse of pseType 0; we chose B2 N2 D64 fp16 BNSD, prefix [300, 400]
    (∈ [Skv−Sq, Skv]) with the consistent B1SS mask. dpse is checked too."""
    B, N, Sq, Skv = 2, 2, 256, 512
    prefix = [300, 400]
    args, rng = inputs(19, "BNSD", B, N, N, Sq, Skv, 64, 64, np.float16)
    i, j = np.arange(Sq)[:, None], np.arange(Skv)[None, :]
    mask = np.stack([(j > i + Skv - Sq) & (j >= p) for p in prefix])[:, None]
    pse = rng.standard_normal((B, N, Sq, Skv)).astype(np.float16)
    check_s(subject, args, dict(head_num=N, input_layout="BNSD", sparse_mode=5, atten_mask=mask, prefix=prefix, pse_type=0,
                     pse_shift=pse, keep_prob=0.9, drop_mask=gen_drop_mask(B, N, Sq, Skv, 0.9, seed=9),
                     scale_value=0.125))


SEQ_Q = [128, 64, 200, 17]
SEQ_KV = [160, 64, 180, 33]


def test_fa_TND_01(subject):
    """TND mode 3 with q_start_idx 64, kv_start_idx 32 and pseType 2 slopes [N] (they only matter for
    slopes); we chose N8/4 D64 fp16, seqlens q [128,64,200,17] / kv [160,64,180,33] (batch 2 has Sq > Skv:
    invalid-line mode switches on automatically)."""
    args, kw, _ = tnd_inputs(21, SEQ_Q, SEQ_KV, 8, 4, 64, 64, np.float16)
    kw.update(sparse_mode=3, atten_mask=masks.compressed_causal_mask(), pse_type=2,
              pse_shift=alibi_slopes(8).astype(np.float32), q_start_idx=64, kv_start_idx=32, scale_value=0.125)
    check_s(subject, args, kw, forward_only=True)


def test_fa_TND_02(subject):
    """TND mode 6 (compressed prefix), q_start_idx 64, kv_start_idx 32, pseType 3 slopes [B,N]; N8/4 D64 fp16."""
    args, kw, rng = tnd_inputs(22, SEQ_Q, SEQ_KV, 8, 4, 64, 64, np.float16)
    prefix = [int(rng.integers(0 if a > b else b - a, b + 1)) for a, b in zip(SEQ_Q, SEQ_KV)]
    kw.update(sparse_mode=6, atten_mask=masks.compressed_prefix_mask(), prefix=prefix, pse_type=3,
              pse_shift=rng.uniform(0.05, 0.5, (4, 8)).astype(np.float32), q_start_idx=64, kv_start_idx=32,
              scale_value=0.125)
    check_s(subject, args, kw, forward_only=True)


def test_fa_TND_03(subject):
    """TND mode 3, q_start_idx 64, kv_start_idx 32, pseType 3 slopes [N] and dropout 0.9; N8/4 D64 fp16."""
    args, kw, _ = tnd_inputs(23, SEQ_Q, SEQ_KV, 8, 4, 64, 64, np.float16)
    kw.update(sparse_mode=3, atten_mask=masks.compressed_causal_mask(), pse_type=3,
              pse_shift=alibi_slopes(8).astype(np.float32), q_start_idx=64, kv_start_idx=32, scale_value=0.125,
              keep_prob=0.9, drop_mask=gen_drop_mask_tnd(8, SEQ_Q, SEQ_KV, 0.9, seed=3))
    check_s(subject, args, kw, forward_only=True)


def test_fa_TND_04(subject):
    """TND mode 8 (band on the first sequence, left-up causal on the others), pre 64 / next 0, N8/4 D64 fp16.
    Slopes with q_start_idx 64 / kv_start_idx 32 are invalid for mode 8 (actSeqQ[0]−actSeqKv[0]+qStart−kvStart
    must be 0, §4) and rejected; the case runs with an external TND BN1S pse of pseType 0 instead."""
    args, kw, rng = tnd_inputs(24, SEQ_Q, SEQ_KV, 8, 4, 64, 64, np.float16)
    kw.update(sparse_mode=8, atten_mask=masks.compressed_causal_mask(), pre_tokens=64, next_tokens=0,
              scale_value=0.125)
    with pytest.raises(FagError) as ei:
        ref.flash_attention_score(*args[:3], **kw, pse_type=2, pse_shift=np.ones(8, np.float32), q_start_idx=64,
                                  kv_start_idx=32)
    assert ei.value.code == 161002 and "pse_type" in ei.value.message
    kw.update(pse_type=0, pse_shift=rng.standard_normal(8 * sum(SEQ_KV)).astype(np.float16))
    check_s(subject, args, kw, forward_only=True)
