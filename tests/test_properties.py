"""Properties of the reference (and of the public API around it) that hold whatever the numbers are:
layout independence, TND ≡ per-sequence calls, exact-zero contributions of invalid rows (A5), recomputed
stats ≡ supplied stats (A4), array kinds in → same kinds out (A9), determinism (A7), and algebraic
identities between pse types/forms, sparse modes, GQA and dropout."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fag_tvm
from fag_tvm import masks
from fag_tvm.dropout import gen_drop_mask, gen_drop_mask_tnd

from confgen import from_layout, gen_case, to_layout, tokens_valid
from torch_oracle import FLT_MAX, INT32_MAX, rel_err

BF16 = np.dtype(ml_dtypes.bfloat16)
ref = fag_tvm.reference
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)


def rnd(rng, shape, dt=np.float32):
    return rng.standard_normal(shape).astype(np.float32).astype(dt)


def bnsd_inputs(rng, B, N1, N2, Sq, Skv, D, Dv, dt=np.float32):
    return (rnd(rng, (B, N1, Sq, D), dt), rnd(rng, (B, N2, Skv, D), dt), rnd(rng, (B, N2, Skv, Dv), dt),
            rnd(rng, (B, N1, Sq, Dv), dt))


def close(a, b, tol=1e-12):
    assert rel_err(a, b) <= tol, rel_err(a, b)


# ------------------------------------------------------------------------------------- layouts

@settings(max_examples=25, **SETTINGS)
@given(st.integers(0, 10 ** 6), st.sampled_from(["BSH", "SBH", "BSND"]))
def test_layouts_give_the_same_result(seed, layout):
    """The same data in BSH/SBH/BSND and in BNSD gives the same O, stats and gradients (float64, exact())."""
    rng = np.random.default_rng(seed)
    B, N2, G = int(rng.integers(1, 3)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
    N1 = N2 * G
    Sq, Skv, D = int(rng.integers(1, 12)), int(rng.integers(1, 12)), int(rng.integers(1, 9))
    Dv = int(rng.integers(1, D + 1))
    q, k, v, dy = bnsd_inputs(rng, B, N1, N2, Sq, Skv, D, Dv)
    kw = dict(head_num=N1, scale_value=0.7, pse_shift=rnd(rng, (B, N1, Sq, Skv)),
              atten_mask=rng.random((B, 1, Sq, Skv)) < 0.2, pre_tokens=int(rng.integers(0, 12)),
              next_tokens=int(rng.integers(0, 12)))
    if rng.random() < 0.5:
        kw.update(keep_prob=0.8, drop_mask=gen_drop_mask(B, N1, Sq, Skv, 0.8, seed))
    a = ref.exact(q, k, v, dy, input_layout="BNSD", **kw)
    b = ref.exact(*(to_layout(x, layout) for x in (q, k, v, dy)), input_layout=layout, **kw)
    for key, n in (("attention_out", N1), ("dq", N1), ("dk", N2), ("dv", N2)):
        close(from_layout(b[key], layout, n), a[key], 1e-13)
    for key in ("softmax_max", "softmax_sum", "dpse"):
        close(b[key], a[key], 1e-13)


# ------------------------------------------------------------------------------------- TND ≡ per sequence

def _tnd_config(rng, mode):
    N2, G = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    N1 = N2 * G
    D = int(rng.integers(1, 9))
    Dv = int(rng.integers(1, D + 1))
    nb = int(rng.integers(1, 4))
    lq = [int(rng.integers(1, 10)) for _ in range(nb)]
    lk = [int(rng.integers(1, 10)) for _ in range(nb)]
    if mode == 8 or rng.random() < 0.3:
        lk = list(lq)
    return N1, N2, D, Dv, lq, lk


@settings(max_examples=40, **SETTINGS)
@given(st.integers(0, 10 ** 6), st.sampled_from([None, 0, 1, 2, 3, 4, 6, 7, 8]),
       st.sampled_from(["none", "TND_BNSS", "TND_BN1S", "slopes_N", "slopes_BN"]), st.booleans())
def test_tnd_equals_per_sequence_bnsd(seed, mode, pse, drop):
    """A TND call equals one B=1 BNSD call per sequence: masks per sequence with local (i, j) (modes 7/8 →
    mode 4 for the band sequence, 3 resp. 2 for the others), pse blocks, dropout bits from the sequence's
    offset N1·Σ Sq_b'·Skv_b' (SPEC §6), stats in per-sequence head-major order (§7)."""
    rng = np.random.default_rng(seed)
    N1, N2, D, Dv, lq, lk = _tnd_config(rng, mode)
    if pse == "slopes_BN" and mode == 8:
        pse = "slopes_N"
    if mode == 7 and pse != "none":
        pse = "none"
    nb = len(lq)
    T, T2 = sum(lq), sum(lk)
    cq, ck = np.cumsum(lq), np.cumsum(lk)
    q, k, v, dy = rnd(rng, (T, N1, D)), rnd(rng, (T2, N2, D)), rnd(rng, (T2, N2, Dv)), rnd(rng, (T, N1, Dv))
    kw = dict(head_num=N1, input_layout="TND", actual_seq_qlen=cq, actual_seq_kvlen=ck, scale_value=0.6,
              inner_precise=2)  # invalid-line mode on everywhere: the auto rule is global, per-seq calls are not
    per = [dict(head_num=N1, input_layout="BNSD", scale_value=0.6, inner_precise=2) for _ in range(nb)]
    if mode is not None:
        kw["sparse_mode"] = mode
        if mode in (0, 1):
            m = rng.random((max(lq), max(lk))) < 0.2
            kw["atten_mask"] = m
            for b in range(nb):
                per[b].update(sparse_mode=mode, atten_mask=m[:lq[b], :lk[b]])
        elif mode == 6:
            kw["atten_mask"] = masks.compressed_prefix_mask()
            pf = [int(rng.integers(0 if a > c else c - a, c + 1)) for a, c in zip(lq, lk)]
            kw["prefix"] = pf
            for b in range(nb):
                per[b].update(sparse_mode=6, atten_mask=kw["atten_mask"], prefix=[pf[b]])
        else:
            kw["atten_mask"] = masks.compressed_causal_mask()
            band = nb - 1 if mode == 7 else 0
            for b in range(nb):
                sub = {7: 3, 8: 2}.get(mode, mode) if (mode not in (7, 8) or b != band) else 4
                per[b].update(sparse_mode=sub, atten_mask=kw["atten_mask"])
        if mode in (0, 4, 7, 8):
            # valid tokens by construction (SPEC §5 on the converted tokens): a rejection below is a failure
            band_b = nb - 1 if mode == 7 else 0
            for _ in range(100):
                pre, nxt = int(rng.integers(1, 10)), int(rng.integers(0, 10))
                if tokens_valid(mode, True, list(zip(lq, lk)), pre, nxt, band_b):
                    break
            else:
                pre, nxt = INT32_MAX, INT32_MAX
            kw.update(pre_tokens=pre, next_tokens=nxt)
            for b in range(nb):
                per[b].update(pre_tokens=pre, next_tokens=nxt)
    if pse in ("TND_BNSS", "TND_BN1S"):
        ptype = int(rng.integers(0, 2))
        if pse == "TND_BNSS":
            blocks = [rnd(rng, (1, N1, a, c)) for a, c in zip(lq, lk)]
        else:
            blocks = [rnd(rng, (1, N1, 1, c)) for c in lk]
        kw.update(pse_type=ptype, pse_shift=np.concatenate([x.reshape(-1) for x in blocks]))
        for b in range(nb):
            per[b].update(pse_type=ptype, pse_shift=blocks[b])
    elif pse.startswith("slopes"):
        ptype = int(rng.integers(2, 4))
        s = rng.uniform(0.1, 1, (N1,) if pse == "slopes_N" else (nb, N1)).astype(np.float32)
        qs, ks = (None, None) if mode == 8 else (int(rng.integers(0, 20)), int(rng.integers(0, 20)))
        kw.update(pse_type=ptype, pse_shift=s, q_start_idx=qs, kv_start_idx=ks)
        for b in range(nb):
            per[b].update(pse_type=ptype, pse_shift=s if s.ndim == 1 else s[b:b + 1], q_start_idx=qs, kv_start_idx=ks)
    if drop:
        dm = gen_drop_mask_tnd(N1, lq, lk, 0.7, seed)
        bits = np.unpackbits(dm, bitorder="little")
        kw.update(keep_prob=0.7, drop_mask=dm)
        off = 0
        for b in range(nb):
            n = N1 * lq[b] * lk[b]
            per[b].update(keep_prob=0.7, drop_mask=np.packbits(bits[off:off + n], bitorder="little"))
            off += n
    full = ref.exact(q, k, v, dy, **kw)  # every generated call is valid: a FagError here is a regression
    srow = 0
    for b in range(nb):
        q0, q1, k0, k1 = cq[b] - lq[b], cq[b], ck[b] - lk[b], ck[b]
        sub = lambda x, r0, r1: np.ascontiguousarray(x[r0:r1].transpose(1, 0, 2)[None])  # noqa: E731
        one = ref.exact(sub(q, q0, q1), sub(k, k0, k1), sub(v, k0, k1), sub(dy, q0, q1), **per[b])
        close(full["attention_out"][q0:q1].transpose(1, 0, 2), one["attention_out"][0])
        close(full["dq"][q0:q1].transpose(1, 0, 2), one["dq"][0])
        close(full["dk"][k0:k1].transpose(1, 0, 2), one["dk"][0])
        close(full["dv"][k0:k1].transpose(1, 0, 2), one["dv"][0])
        rows = N1 * lq[b]
        for key in ("softmax_max", "softmax_sum"):
            close(full[key].reshape(-1, 8)[srow:srow + rows], one[key].reshape(-1, 8))
        srow += rows
        if full["dpse"] is not None:
            blk = full["dpse"].reshape(-1)
            start = N1 * sum(a * c for a, c in zip(lq[:b], lk[:b])) if pse == "TND_BNSS" else N1 * k0
            n = one["dpse"].size
            close(blk[start:start + n], one["dpse"].reshape(-1))


def test_tnd_zero_length_sequences():
    """Sq_b = 0: nothing happens for that sequence (its dk/dv rows are 0); Skv_b = 0: output 0 with invalid
    stats (-FLT_MAX, +FLT_MAX) and dq 0."""
    rng = np.random.default_rng(7)
    lq, lk = [3, 0, 4], [2, 5, 0]
    q, k, v, dy = rnd(rng, (7, 2, 4)), rnd(rng, (7, 1, 4)), rnd(rng, (7, 1, 3)), rnd(rng, (7, 2, 3))
    kw = dict(head_num=2, input_layout="TND", actual_seq_qlen=np.cumsum(lq), actual_seq_kvlen=np.cumsum(lk))
    f = ref.flash_attention_score(q, k, v, **kw)
    g = ref.flash_attention_score_grad(q, k, v, dy, **kw)
    assert np.all(f.attention_out[3:] == 0) and np.all(np.abs(f.attention_out[:3]).sum(-1) > 0)
    assert np.all(f.softmax_max.reshape(-1, 8)[6:] == -FLT_MAX) and np.all(f.softmax_sum.reshape(-1, 8)[6:] == FLT_MAX)
    assert np.all(g.dq[3:] == 0) and np.all(g.dk[2:] == 0) and np.all(g.dv[2:] == 0)
    one = ref.flash_attention_score_grad(q[None, :3].transpose(0, 2, 1, 3), k[None, :2].transpose(0, 2, 1, 3),
                                         v[None, :2].transpose(0, 2, 1, 3), dy[None, :3].transpose(0, 2, 1, 3),
                                         head_num=2, input_layout="BNSD")
    np.testing.assert_allclose(g.dq[:3], one.dq[0].transpose(1, 0, 2), rtol=1e-6)


# ------------------------------------------------------------------------------------- invalid rows (A5)

def test_invalid_row_stats_contribute_exactly_zero():
    """A row whose supplied stats are (−FLT_MAX, +FLT_MAX) adds exactly 0 to dq/dk/dv/dpse — whether it is
    masked or not: dq row = 0, and dk/dv/dpse are bitwise those of the same call with dy of that row = 0."""
    rng = np.random.default_rng(11)
    B, N, Sq, Skv, D = 2, 2, 6, 7, 5
    q, k, v, dy = bnsd_inputs(rng, B, N, N, Sq, Skv, D, D)
    pse = rnd(rng, (B, N, Sq, Skv))
    mask = rng.random((B, N, Sq, Skv)) < 0.2
    mask[0, 1, 4] = True  # a fully masked row
    kw = dict(head_num=N, input_layout="BNSD", pse_shift=pse, atten_mask=mask, sparse_mode=1, inner_precise=2)
    f = ref.flash_attention_score(q, k, v, **kw)
    smax, ssum, o = f.softmax_max.copy(), f.softmax_sum.copy(), f.attention_out.copy()
    assert np.all(smax[0, 1, 4] == -FLT_MAX) and np.all(ssum[0, 1, 4] == FLT_MAX)
    smax[1, 0, 2], ssum[1, 0, 2] = -FLT_MAX, FLT_MAX  # an unmasked row declared invalid by its stats
    g = ref.flash_attention_score_grad(q, k, v, dy, softmax_max=smax, softmax_sum=ssum, attention_in=o, **kw)
    for (b, n, i) in ((0, 1, 4), (1, 0, 2)):
        assert np.all(g.dq[b, n, i] == 0) and np.all(g.dpse[b, n, i] == 0)
    dy0 = dy.copy()
    dy0[0, 1, 4] = 0
    dy0[1, 0, 2] = 0
    q2 = q.copy()
    q2[0, 1, 4] = 1e3  # the row's own inputs do not matter either
    q2[1, 0, 2] = -7
    o2 = o.copy()
    o2[1, 0, 2] = 0
    g0 = ref.flash_attention_score_grad(q2, k, v, dy0, softmax_max=smax, softmax_sum=ssum, attention_in=o2, **kw)
    np.testing.assert_array_equal(g.dk, g0.dk)
    np.testing.assert_array_equal(g.dv, g0.dv)
    rows = [(0 * N + 1) * Sq + 4, (1 * N + 0) * Sq + 2]  # (b, n, i) = (0, 1, 4), (1, 0, 2)
    np.testing.assert_array_equal(np.delete(g.dq.reshape(-1, D), rows, axis=0),
                                  np.delete(g0.dq.reshape(-1, D), rows, axis=0))
    # also in float64 (exact): the fully masked row gives zeros
    e = ref.exact(q, k, v, dy, **kw)
    assert np.all(e["dq"][0, 1, 4] == 0) and np.all(e["attention_out"][0, 1, 4] == 0)


# ------------------------------------------------------------------------------------- stats=None (A4)

@pytest.mark.parametrize("seed", [s for s in range(60) if s % 50 != 17][::3])
def test_bwd_without_stats_equals_bwd_with_forward_stats(seed):
    case = gen_case(seed)
    q, k, v, dy = case.args
    f = ref.flash_attention_score(q, k, v, **case.kwargs)
    g1 = ref.flash_attention_score_grad(q, k, v, dy, **case.kwargs)
    g2 = ref.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                        attention_in=f.attention_out, **case.kwargs)
    for a, b in zip(g1, g2):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b)


def test_backward_uses_the_supplied_stats():
    """§3: P is rebuilt from the supplied stats, not recomputed: shifting max by δ scales P by e^−δ."""
    rng = np.random.default_rng(3)
    q, k, v, dy = bnsd_inputs(rng, 1, 2, 2, 5, 6, 4, 4)
    kw = dict(head_num=2, input_layout="BNSD")
    f = ref.flash_attention_score(q, k, v, **kw)
    g = ref.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                       attention_in=f.attention_out, **kw)
    g2 = ref.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max + np.float32(np.log(2)),
                                        softmax_sum=f.softmax_sum, attention_in=f.attention_out, **kw)
    np.testing.assert_allclose(g2.dv, g.dv / 2, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------- array kinds (A9)

@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_in_torch_out(dt):
    rng = np.random.default_rng(5)
    q, k, v, dy = (torch.from_numpy(x) for x in bnsd_inputs(rng, 2, 4, 2, 6, 5, 8, 4))
    q, k, v, dy = (x.to(dt) for x in (q, k, v, dy))
    pse = torch.from_numpy(rnd(rng, (2, 4, 6, 5))).to(dt)
    mask = torch.from_numpy(np.triu(np.ones((6, 5), bool), 1))
    kw = dict(head_num=4, input_layout="BNSD", pse_shift=pse, atten_mask=mask, scale_value=0.3)
    f = ref.flash_attention_score(q, k, v, **kw)
    assert all(isinstance(x, torch.Tensor) for x in f)
    assert f.attention_out.dtype == dt and f.softmax_max.dtype == torch.float32
    g = ref.flash_attention_score_grad(q.requires_grad_(dt != torch.float16), k.transpose(2, 3).transpose(2, 3), v, dy,
                                       softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                       attention_in=f.attention_out, **kw)
    assert all(isinstance(x, torch.Tensor) for x in g)
    assert (g.dq.dtype, g.dk.dtype, g.dv.dtype, g.dpse.dtype) == (dt, dt, dt, dt)
    assert g.dq.shape == q.shape and g.dpse.shape == pse.shape
    # same numbers as the NumPy path (bf16 via ml_dtypes)
    npdt = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: BF16}[dt]
    to_np = lambda t: t.detach().float().numpy().astype(npdt)  # noqa: E731
    gn = ref.flash_attention_score_grad(to_np(q), to_np(k), to_np(v), to_np(dy), head_num=4, input_layout="BNSD",
                                        pse_shift=to_np(pse), atten_mask=mask.numpy(), scale_value=0.3)
    assert isinstance(gn.dq, np.ndarray) and gn.dq.dtype == npdt and gn.dpse.dtype == npdt
    for a, b in zip(g, gn):
        np.testing.assert_array_equal(a.float().numpy(), b.astype(np.float32))


def test_non_contiguous_inputs():
    rng = np.random.default_rng(6)
    q, k, v, dy = bnsd_inputs(rng, 2, 2, 2, 5, 6, 4, 4)
    kw = dict(head_num=2, input_layout="BNSD")
    g = ref.flash_attention_score_grad(q, k, v, dy, **kw)
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # BNSD view of a BSND buffer
    assert not qt.flags.c_contiguous
    ks = np.repeat(k, 2, axis=-1)[..., ::2]  # strided view with k's values
    assert not ks.flags.c_contiguous
    g2 = ref.flash_attention_score_grad(qt, ks, v, dy, **kw)
    for a, b in zip(g[:3], g2[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    gt = ref.flash_attention_score_grad(*(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v, dy)),
                                        head_num=2, input_layout="BSND")
    assert isinstance(gt.dq, torch.Tensor)
    np.testing.assert_allclose(gt.dq.transpose(1, 2).numpy(), g.dq, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------- determinism (A7)

def test_reference_is_deterministic():
    for seed in (3, 9, 21):
        case = gen_case(seed)
        a = ref.flash_attention_score_grad(*case.args, **case.kwargs, deterministic=True)
        b = ref.flash_attention_score_grad(*case.args, **case.kwargs, deterministic=True)
        for x, y in zip(a, b):
            if x is not None:
                assert x.tobytes() == y.tobytes()


# ------------------------------------------------------------------------------------- identities

def test_pse_type_0_equals_type_1_with_scaled_pse():
    """scale·QKᵀ + scale·pse (type 0) ≡ scale·(QKᵀ + pse) (type 1); dpse₁ = scale·dpse₀ (A6)."""
    rng = np.random.default_rng(8)
    q, k, v, dy = bnsd_inputs(rng, 2, 4, 2, 7, 9, 6, 5)
    pse = rnd(rng, (2, 4, 7, 9)).astype(np.float64)
    s = 0.37
    base = dict(head_num=4, input_layout="BNSD", scale_value=s, atten_mask=masks.compressed_causal_mask(),
                sparse_mode=3)
    p1 = pse.astype(np.float32)
    p0 = (pse * s).astype(np.float32)
    a = ref.exact(q, k, v, dy, pse_shift=p1, pse_type=1, **base)
    b = ref.exact(q, k, v, dy, pse_shift=p0, pse_type=0, **base)
    for key in ("attention_out", "dq", "dk", "dv"):
        close(a[key], b[key], 1e-6)  # p0 = round32(s·p1): equal up to fp32 rounding of the pse
    close(a["dpse"], s * b["dpse"], 1e-6)


def test_bn1s_and_1nss_are_broadcasts_of_bnss():
    rng = np.random.default_rng(9)
    q, k, v, dy = bnsd_inputs(rng, 3, 2, 1, 5, 6, 4, 4)
    kw = dict(head_num=2, input_layout="BNSD", scale_value=0.5)
    row = rnd(rng, (3, 2, 1, 6))
    a = ref.exact(q, k, v, dy, pse_shift=row, **kw)
    b = ref.exact(q, k, v, dy, pse_shift=np.ascontiguousarray(np.broadcast_to(row, (3, 2, 5, 6))), **kw)
    for key in ("attention_out", "dq", "dk", "dv"):
        close(a[key], b[key], 1e-14)
    close(a["dpse"], b["dpse"].sum(axis=2, keepdims=True), 1e-13)
    one = rnd(rng, (1, 2, 5, 6))
    a = ref.exact(q, k, v, dy, pse_shift=one, pse_type=0, **kw)
    b = ref.exact(q, k, v, dy, pse_shift=np.ascontiguousarray(np.broadcast_to(one, (3, 2, 5, 6))), pse_type=0, **kw)
    close(a["dq"], b["dq"], 1e-14)
    close(a["dpse"], b["dpse"].sum(axis=0, keepdims=True), 1e-13)


def test_gqa_equals_mha_with_repeated_kv():
    rng = np.random.default_rng(10)
    G = 3
    q, k, v, dy = bnsd_inputs(rng, 2, 6, 2, 5, 7, 4, 3)
    kw = dict(head_num=6, input_layout="BNSD", atten_mask=masks.compressed_causal_mask(), sparse_mode=2)
    a = ref.exact(q, k, v, dy, **kw)
    b = ref.exact(q, np.repeat(k, G, axis=1), np.repeat(v, G, axis=1), dy, **kw)
    close(a["attention_out"], b["attention_out"], 1e-14)
    close(a["dq"], b["dq"], 1e-14)
    close(a["dk"], b["dk"].reshape(2, 2, G, 7, 4).sum(2), 1e-13)
    close(a["dv"], b["dv"].reshape(2, 2, G, 7, 3).sum(2), 1e-13)


@pytest.mark.parametrize("Sq,Skv", [(6, 6), (5, 9), (9, 5)])
def test_sparse_mode_equivalences(Sq, Skv):
    """Compressed modes ≡ the full masks they stand for (SPEC §5): 2 ≡ causal SS, 3 ≡ right-down causal SS,
    4 ≡ mode 0 with converted tokens, 6 ≡ 5 with the consistent B1SS prefix mask, and 3 ≡ 2 when Sq = Skv."""
    rng = np.random.default_rng(Sq * 100 + Skv)
    q, k, v, dy = bnsd_inputs(rng, 2, 2, 2, Sq, Skv, 4, 4)
    kw = dict(head_num=2, input_layout="BNSD", inner_precise=2)
    c = masks.compressed_causal_mask()
    run = lambda **x: ref.exact(q, k, v, dy, **kw, **x)  # noqa: E731
    i, j = np.arange(Sq)[:, None], np.arange(Skv)[None, :]
    d = Skv - Sq

    def same(a, b):
        for key in ("attention_out", "softmax_max", "softmax_sum", "dq", "dk", "dv"):
            close(a[key], b[key], 1e-14)

    same(run(sparse_mode=2, atten_mask=c), run(sparse_mode=1, atten_mask=j > i))
    same(run(sparse_mode=3, atten_mask=c), run(sparse_mode=1, atten_mask=j > i + d))
    pre, nxt = 3, 1
    same(run(sparse_mode=4, atten_mask=c, pre_tokens=pre, next_tokens=nxt),
         run(sparse_mode=0, atten_mask=(j - i > nxt + d) | (i - j > pre - d), pre_tokens=pre - d, next_tokens=nxt + d))
    lo = 0 if Sq > Skv else d
    pf = [lo, Skv]
    m5 = np.stack([(j > i + d) & (j >= p) for p in pf])[:, None]
    same(run(sparse_mode=6, atten_mask=masks.compressed_prefix_mask(), prefix=pf),
         run(sparse_mode=5, atten_mask=m5, prefix=pf))
    if Sq == Skv:
        same(run(sparse_mode=3, atten_mask=c), run(sparse_mode=2, atten_mask=c))


def test_mode0_mask_union():
    """A3: in mode 0 a cell is masked iff the mask says so OR it lies outside the band."""
    rng = np.random.default_rng(12)
    q, k, v, dy = bnsd_inputs(rng, 1, 2, 2, 7, 7, 4, 4)
    kw = dict(head_num=2, input_layout="BNSD")
    m = rng.random((7, 7)) < 0.2
    i, j = np.arange(7)[:, None], np.arange(7)[None, :]
    band = (j - i > 2) | (i - j > 1)
    a = ref.exact(q, k, v, dy, atten_mask=m, pre_tokens=1, next_tokens=2, **kw)
    b = ref.exact(q, k, v, dy, atten_mask=m | band, sparse_mode=1, **kw)
    for key in ("attention_out", "dq", "dk", "dv"):
        close(a[key], b[key], 1e-14)


def test_all_keep_dropout_scales_by_inverse_keep():
    """With every bit set, dropout multiplies P (and dP) by 1/keep: O, dq, dk, dv scale by 1/keep."""
    rng = np.random.default_rng(13)
    q, k, v, dy = bnsd_inputs(rng, 2, 2, 1, 5, 6, 4, 4)
    kw = dict(head_num=2, input_layout="BNSD")
    a = ref.exact(q, k, v, dy, **kw)
    b = ref.exact(q, k, v, dy, keep_prob=0.5, drop_mask=np.full(30, 255, np.uint8), **kw)
    for key in ("attention_out", "dq", "dk", "dv"):
        close(b[key], 2 * a[key], 1e-14)
    close(b["softmax_sum"], a["softmax_sum"], 0)


def test_drop_mask_bit_order():
    """Bit e = ((b·N1+n)·Sq+i)·Skv+j, LSB-first within each byte, no per-row padding (SPEC §6)."""
    B, N, Sq, Skv = 1, 1, 3, 3  # 9 bits: crosses a byte boundary mid-row
    q = np.zeros((B, N, Sq, 2), np.float32)
    k = np.zeros((B, N, Skv, 2), np.float32)
    v = np.arange(3, dtype=np.float32)[None, None, :, None] * np.ones((1, 1, 3, 2), np.float32)  # v[j] = j
    keep = np.zeros(9, bool)
    keep[[0, 4, 8]] = True  # row i keeps column j = i
    dm = np.packbits(keep, bitorder="little")
    f = ref.flash_attention_score(q, k, v, head_num=1, input_layout="BNSD", keep_prob=0.5, drop_mask=dm)
    # P uniform 1/3; kept cell j=i scaled by 2: O[i] = 2/3 · v[j=i]
    np.testing.assert_allclose(f.attention_out[0, 0, :, 0], np.array([0, 1, 2]) * 2 / 3, rtol=1e-6)


def test_gen_drop_mask():
    m = gen_drop_mask(2, 3, 5, 7, 0.75, seed=1)
    assert m.dtype == np.uint8 and m.size == (2 * 3 * 5 * 7 + 7) // 8
    big = gen_drop_mask(1, 1, 256, 256, 0.75, seed=2)
    assert abs(np.unpackbits(big, bitorder="little").mean() - 0.75) < 0.02
    np.testing.assert_array_equal(gen_drop_mask(2, 3, 5, 7, 0.75, seed=1), m)
    t = gen_drop_mask_tnd(3, [2, 0, 5], [4, 3, 1], 0.5, seed=0)
    assert t.size == (3 * (8 + 0 + 5) + 7) // 8


def test_compressed_masks():
    c = masks.compressed_causal_mask()
    assert c.shape == (2048, 2048) and c.dtype == bool
    np.testing.assert_array_equal(c, np.triu(np.ones((2048, 2048), bool), 1))
    p = masks.compressed_prefix_mask()
    assert p.shape == (3072, 2048)
    np.testing.assert_array_equal(p[:2048], c)
    assert not p[2048:, :1024].any() and p[2048:, 1024:].all()


def test_no_mask_means_nothing_masked():
    rng = np.random.default_rng(14)
    q, k, v, dy = bnsd_inputs(rng, 1, 2, 2, 4, 5, 3, 3)
    kw = dict(head_num=2, input_layout="BNSD")
    a = ref.exact(q, k, v, dy, **kw)
    for mode in (0, 2, 3, 4):
        b = ref.exact(q, k, v, dy, sparse_mode=mode, pre_tokens=0, next_tokens=0, **kw)
        close(a["dq"], b["dq"], 0)


def test_infinite_tokens_do_not_mask():
    rng = np.random.default_rng(15)
    q, k, v, dy = bnsd_inputs(rng, 1, 2, 2, 4, 5, 3, 3)
    kw = dict(head_num=2, input_layout="BNSD")
    a = ref.exact(q, k, v, dy, **kw)
    b = ref.exact(q, k, v, dy, atten_mask=np.zeros((4, 5), bool), pre_tokens=INT32_MAX, next_tokens=INT32_MAX, **kw)
    close(a["dq"], b["dq"], 0)


def test_softmax_in_is_reserved_and_ignored():
    """softmax_in is CANN's reserved, unused input (§7)."""
    rng = np.random.default_rng(16)
    q, k, v, dy = bnsd_inputs(rng, 1, 2, 2, 4, 5, 3, 3)
    kw = dict(head_num=2, input_layout="BNSD")
    a = ref.flash_attention_score_grad(q, k, v, dy, **kw)
    b = ref.flash_attention_score_grad(q, k, v, dy, softmax_in=np.full((7,), np.nan, np.float32), **kw)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)
