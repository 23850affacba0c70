"""Hardening at the validation level: whole classes of extreme or malformed inputs.

1. huge pre/next tokens (clamped to an equivalent small range after the exact checks),
2. q_start_idx / kv_start_idx extremes (int32 each, alibi distances exact in fp32),
3. scale_value / keep_prob not representable in fp32,
4. numpy masked arrays,
5. TND: S <= 1M per sequence, packed totals bounded only by the int64 sanity limit,
6. all-empty calls still go through the consistency rules,
7. enormous (zero-stride) shapes: outputs that cannot fit in memory,
8. actual_seq_qlen / actual_seq_kvlen outside TND,
9. workload JSON objects (unknown keys, wrong types),
10. the C-style mirror returns a status, never raises.

Valid calls compare target="llvm" against target="reference" (SPEC A10 tolerances); invalid ones must raise
FagError with code 161002 (161001 for a missing tensor) and name the parameter, never a raw Python error.
Shapes are tiny (S <= 32, D = 8) and use few kernel specialisations, so the file compiles ~12 kernels once.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import fag_tvm
from fag_tvm import FagError, aclnn, masks
from fag_tvm.config import (FLT_MAX, FLT_MIN, INT32_MAX, BatchInfo, _causal_tokens, _check_tokens, _clamp_tokens,
                            _has_empty_row, _rule_masks_something, validate)
from fag_tvm.dropout import gen_drop_mask
from fag_tvm.testing import rel_err, tolerance
from fag_tvm.workloads import SUITE, configs, load_workloads

NULL, INVALID = 161001, 161002
INT32_MIN = -(2 ** 31)
I64_MAX, I64_MIN = 2 ** 63 - 1, -(2 ** 63)
TOL = tolerance("float32")


# ------------------------------------------------------------------------------------------- helpers

def rnd(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def bnsd(B=1, N1=2, N2=2, Sq=16, Skv=24, D=8, Dv=None, seed=0):
    """q, k, v, dy in BNSD."""
    Dv = D if Dv is None else Dv
    return [rnd((B, N1, Sq, D), seed), rnd((B, N2, Skv, D), seed + 1), rnd((B, N2, Skv, Dv), seed + 2),
            rnd((B, N1, Sq, Dv), seed + 3)]


def tnd(seq_q=(5, 7), seq_kv=(6, 4), N1=2, N2=2, D=8, seed=0):
    """q, k, v, dy in TND and the cumulative sequence ends."""
    T, T2 = sum(seq_q), sum(seq_kv)
    args = [rnd((T, N1, D), seed), rnd((T2, N2, D), seed + 1), rnd((T2, N2, D), seed + 2), rnd((T, N1, D), seed + 3)]
    return args, dict(input_layout="TND", head_num=N1, actual_seq_qlen=np.cumsum(seq_q),
                      actual_seq_kvlen=np.cumsum(seq_kv))


def zs(shape, dtype=np.float32):
    """A zero-stride stand-in of any logical size (nothing allocated)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def expect(code, param, fn, *a, **kw):
    with pytest.raises(FagError) as ei:
        fn(*a, **kw)
    e = ei.value
    assert e.code == code, f"expected {code}, got {e.code}: {e.message}"
    assert param in e.message, f"{param!r} not named in: {e.message}"
    return e


def rejected_everywhere(param, args, kw, code=INVALID):
    """Both targets, forward and backward, reject the call with `code` naming `param`."""
    fkw = {k: v for k, v in kw.items() if k not in ("softmax_max", "softmax_sum", "attention_in")}
    for target in ("llvm", "reference"):
        expect(code, param, fag_tvm.flash_attention_score_grad, *args, **dict(kw, target=target))
        expect(code, param, fag_tvm.flash_attention_score, *args[:3], **dict(fkw, target=target))


def agree(args, kw, tol=TOL):
    """llvm == reference (forward outputs and stats; backward dq/dk/dv/dpse on the same supplied stats)."""
    f = fag_tvm.flash_attention_score(*args[:3], **dict(kw, target="llvm"))
    fr = fag_tvm.flash_attention_score(*args[:3], **dict(kw, target="reference"))
    for name in ("attention_out", "softmax_max", "softmax_sum"):
        e = rel_err(getattr(f, name), getattr(fr, name))
        assert e <= tol, f"forward {name}: rel err {e}"
    bkw = dict(kw, softmax_max=fr.softmax_max, softmax_sum=fr.softmax_sum, attention_in=fr.attention_out)
    g = fag_tvm.flash_attention_score_grad(*args, **dict(bkw, target="llvm"))
    r = fag_tvm.flash_attention_score_grad(*args, **dict(bkw, target="reference"))
    for name in ("dq", "dk", "dv", "dpse"):
        a, b = getattr(g, name), getattr(r, name)
        assert (a is None) == (b is None), name
        if a is not None:
            e = rel_err(a, b)
            assert e <= tol, f"backward {name}: rel err {e}"
    return g, r


# ================================================================================ 1. huge token values

HUGE_MODE0 = [(I64_MAX, I64_MAX), (I64_MAX, 0), (0, I64_MAX), (I64_MAX, -5), (-5, I64_MAX), (2 ** 62, 3),
              (3, 2 ** 62), (2 ** 40, -15), (2 ** 40, 2 ** 40), (2 ** 31, -2), (INT32_MAX + 1, 1)]
HUGE_MODE4 = [(I64_MAX, I64_MAX), (I64_MAX, 0), (0, I64_MAX), (I64_MAX, -5), (-5, I64_MAX), (2 ** 62, 2 ** 62),
              (2 ** 40, 1), (1, 2 ** 40)]


@pytest.mark.parametrize("pre,nxt", HUGE_MODE0)
@pytest.mark.parametrize("Sq,Skv", [(16, 24), (24, 16)])
def test_huge_tokens_mode0(pre, nxt, Sq, Skv):
    """Mode 0 with a mask consistent with the band: llvm == reference (no int64 overflow in the band)."""
    if -nxt > Sq:
        pytest.skip("next_tokens below -Sq is invalid for this shape")
    args = bnsd(Sq=Sq, Skv=Skv)
    kw = dict(head_num=2, input_layout="BNSD", sparse_mode=0, pre_tokens=pre, next_tokens=nxt,
              atten_mask=masks.band_mask(Sq, Skv, min(pre, 2 ** 40), min(nxt, 2 ** 40)))
    agree(args, kw)


@pytest.mark.parametrize("pre,nxt", HUGE_MODE4)
@pytest.mark.parametrize("Sq,Skv", [(16, 24), (24, 16)])
def test_huge_tokens_mode4(pre, nxt, Sq, Skv):
    """Mode 4 converts pre - δ, next + δ, which can leave int64: no OverflowError, llvm == reference."""
    args = bnsd(Sq=Sq, Skv=Skv)
    kw = dict(head_num=2, input_layout="BNSD", sparse_mode=4, pre_tokens=pre, next_tokens=nxt,
              atten_mask=masks.compressed_causal_mask())
    agree(args, kw)


@pytest.mark.parametrize("pre,nxt", [(I64_MAX, I64_MAX), (I64_MAX, 0), (0, I64_MAX), (I64_MAX, -2), (-2, I64_MAX),
                                     (2 ** 62, 2 ** 62), (2 ** 40, 1)])
@pytest.mark.parametrize("mode", [0, 7, 8])
def test_huge_tokens_tnd(pre, nxt, mode):
    """TND band modes (7: last sequence, 8: first sequence; 0: every sequence, SS mask consistent)."""
    args, kw = tnd()
    if mode == 0:
        kw["atten_mask"] = masks.band_mask(7, 6, min(pre, 2 ** 40), min(nxt, 2 ** 40))
    else:
        kw["atten_mask"] = masks.compressed_causal_mask()
    agree(args, dict(kw, sparse_mode=mode, pre_tokens=pre, next_tokens=nxt))


@pytest.mark.parametrize("pre,nxt,param", [(I64_MIN, 0, "pre_tokens"), (0, I64_MIN, "next_tokens"),
                                           (I64_MIN + 5, I64_MAX, "pre_tokens"), (I64_MAX, I64_MIN + 5, "next_tokens"),
                                           (-(2 ** 62), 2 ** 62, "pre_tokens"), (2 ** 62, -(2 ** 40), "next_tokens")])
@pytest.mark.parametrize("mode", [0, 4])
def test_huge_negative_tokens_rejected(pre, nxt, param, mode):
    """The validity rules run on the exact converted values (mode 4's pre - δ may lie below int64)."""
    args = bnsd()
    m = np.zeros((16, 24), bool) if mode == 0 else masks.compressed_causal_mask()
    rejected_everywhere(param, args, dict(head_num=2, input_layout="BNSD", sparse_mode=mode, pre_tokens=pre,
                                          next_tokens=nxt, atten_mask=m))


def test_stored_tokens_are_clamped_small():
    args = bnsd(Sq=16, Skv=24)
    kw = dict(head_num=2, input_layout="BNSD", target="llvm", atten_mask=masks.compressed_causal_mask())
    cfg = validate("bwd", *args, **kw, sparse_mode=4, pre_tokens=I64_MAX, next_tokens=0)
    bi = cfg.batches[0]
    assert (bi.pre, bi.next) == (16, 8) and cfg.band
    cfg = validate("bwd", *args, **kw, sparse_mode=2)  # no token rule: the "no band" value stays INT32_MAX
    assert cfg.batches[0].pre == INT32_MAX and cfg.batches[0].next == 0


def _visible_exact(sq, skv, p, n, prefix=0):
    return [[(j - i <= n and i - j <= p) or j < prefix for j in range(skv)] for i in range(sq)]


TOKEN_VALUES = [I64_MIN, -(2 ** 62), -9, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 9, INT32_MAX, 2 ** 40, 2 ** 62,
                I64_MAX, I64_MAX + 9]


@pytest.mark.parametrize("sq,skv", [(1, 1), (1, 4), (4, 1), (3, 5), (5, 3), (4, 4)])
def test_clamp_is_an_equivalence(sq, skv):
    """Clamped tokens give the same visible cells and the same derived rule answers as the exact ones."""
    for tnd_ in (False, True):
        for p in TOKEN_VALUES:
            for n in TOKEN_VALUES:
                try:
                    _check_tokens(p, n, sq, skv, tnd_)
                except FagError:
                    continue
                cp, cn = _clamp_tokens(p, n, sq, skv)
                assert abs(cp) <= skv + 1 + sq and abs(cn) <= sq + skv + 1
                assert _visible_exact(sq, skv, p, n) == _visible_exact(sq, skv, cp, cn)
                assert masks.structural_visible(sq, skv, cp, cn).tolist() == _visible_exact(sq, skv, p, n)
                a = BatchInfo(sq=sq, skv=skv, q_row0=0, kv_row0=0, pre=p, next=n)
                b = BatchInfo(sq=sq, skv=skv, q_row0=0, kv_row0=0, pre=cp, next=cn)
                assert _rule_masks_something(a) == _rule_masks_something(b)
                assert _has_empty_row(a) == _has_empty_row(b)
                assert _causal_tokens([a], tnd_) == _causal_tokens([b], tnd_)


# ================================================================================ 2. start indices

def _slopes_kw(pt=2, **extra):
    return dict(head_num=2, input_layout="BNSD", pse_type=pt, pse_shift=np.full(2, 1e-3, np.float32), **extra)


@pytest.mark.parametrize("q_start,kv_start,param", [
    (2 ** 31, 0, "q_start_idx"), (0, 2 ** 31, "kv_start_idx"), (INT32_MIN - 1, 0, "q_start_idx"),
    (0, INT32_MIN - 1, "kv_start_idx"), (I64_MAX, 0, "q_start_idx"), (0, I64_MIN, "kv_start_idx"),
    (INT32_MAX, INT32_MIN, "kv_start_idx"), (0, 2 ** 24, "kv_start_idx"), (2 ** 24 - 10, 0, "q_start_idx"),
    (-(2 ** 23), 2 ** 23, "kv_start_idx")])
@pytest.mark.parametrize("pt", [2, 3])
def test_start_idx_extremes_rejected(q_start, kv_start, param, pt):
    """int32 each, and |kv - q| + max(Sq, Skv) <= 2**24: both targets raise the same FagError."""
    args = bnsd()
    kw = _slopes_kw(pt, q_start_idx=np.array([q_start], dtype=np.int64) if q_start != I64_MAX else q_start,
                    kv_start_idx=kv_start)
    rejected_everywhere(param, args, kw)


def test_start_idx_distance_message_names_both():
    e = expect(INVALID, "kv_start_idx", fag_tvm.flash_attention_score_grad, *bnsd(),
               **_slopes_kw(q_start_idx=0, kv_start_idx=2 ** 24, target="reference"))
    assert "q_start_idx" in e.message and "2**24" in e.message


@pytest.mark.parametrize("q_start,kv_start", [(1000, 0), (0, -5000), (-5000, 1000), (INT32_MAX, INT32_MAX),
                                              (INT32_MIN, INT32_MIN + 7), (INT32_MAX - 100, INT32_MAX)])
@pytest.mark.parametrize("pt", [2, 3])
def test_start_idx_valid_offsets_agree(q_start, kv_start, pt):
    args = bnsd()
    agree(args, _slopes_kw(pt, q_start_idx=[q_start], kv_start_idx=[kv_start]))


def test_start_idx_distance_boundary():
    """Exactly 2**24 is accepted (every distance exact in fp32), one more is not."""
    args = bnsd()  # max(Sq, Skv) = 24
    kw = _slopes_kw(target="llvm")
    validate("bwd", *args, **kw, q_start_idx=0, kv_start_idx=2 ** 24 - 24)
    validate("bwd", *args, **kw, q_start_idx=2 ** 24 - 24, kv_start_idx=0)
    expect(INVALID, "kv_start_idx", validate, "bwd", *args, **kw, q_start_idx=0, kv_start_idx=2 ** 24 - 23)


def test_start_idx_tnd_agree():
    args, kw = tnd()
    agree(args, dict(kw, pse_type=2, pse_shift=np.full(2, 1e-3, np.float32), q_start_idx=-7000, kv_start_idx=300))


# ================================================================================ 3. fp32 scalars

@pytest.mark.parametrize("scale", [1e39, 1e300, -1e40, 3.5e38, -3.41e38, 1e-40, -1e-45, 5e-324])
def test_scale_not_fp32_representable(scale):
    rejected_everywhere("scale_value", bnsd(), dict(head_num=2, input_layout="BNSD", scale_value=scale))


@pytest.mark.parametrize("keep", [1e-39, 1e-45, 5e-324, 1e-38, np.float64(1e-40)])
def test_keep_prob_below_flt_min(keep):
    args = bnsd()
    rejected_everywhere("keep_prob", args, dict(head_num=2, input_layout="BNSD", keep_prob=keep,
                                                drop_mask=gen_drop_mask(1, 2, 16, 24, 0.5)))


def test_fp32_scalar_edges_accepted():
    args = bnsd()
    for scale in (FLT_MAX, -FLT_MAX, FLT_MIN, -FLT_MIN, 0.0, -0.0):
        validate("bwd", *args, head_num=2, input_layout="BNSD", scale_value=scale, target="llvm")
    validate("bwd", *args, head_num=2, input_layout="BNSD", keep_prob=FLT_MIN,
             drop_mask=gen_drop_mask(1, 2, 16, 24, 0.5), target="llvm")


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-20, FLT_MIN, -0.5])
def test_small_scales_agree(scale):
    agree(bnsd(), dict(head_num=2, input_layout="BNSD", scale_value=scale))


@pytest.mark.parametrize("keep", [1e-6, 1e-30])
def test_small_keep_prob_agrees(keep):
    agree(bnsd(), dict(head_num=2, input_layout="BNSD", keep_prob=keep, drop_mask=gen_drop_mask(1, 2, 16, 24, 0.5)))


# ================================================================================ 4. masked arrays

def _full_bwd_kwargs(args):
    f = fag_tvm.reference.flash_attention_score(*args[:3], head_num=2, input_layout="BNSD")
    return dict(head_num=2, input_layout="BNSD", softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                attention_in=f.attention_out)


@pytest.mark.parametrize("name", ["query", "key", "value", "dy", "pse_shift", "atten_mask", "drop_mask",
                                  "softmax_max", "softmax_sum", "attention_in"])
@pytest.mark.parametrize("target", ["llvm", "reference"])
def test_masked_arrays_rejected(name, target):
    args = bnsd()
    kw = dict(_full_bwd_kwargs(args), pse_shift=np.zeros((1, 2, 16, 24), np.float32),
              atten_mask=np.zeros((16, 24), bool), drop_mask=gen_drop_mask(1, 2, 16, 24, 0.5), keep_prob=0.5,
              target=target)
    pos = {"query": 0, "key": 1, "value": 2, "dy": 3}
    if name in pos:
        args[pos[name]] = np.ma.masked_array(args[pos[name]], mask=False)
    else:
        kw[name] = np.ma.masked_array(kw[name], mask=np.zeros(kw[name].shape, bool))
    e = expect(INVALID, name, fag_tvm.flash_attention_score_grad, *args, **kw)
    assert "masked" in e.message
    if name not in ("dy", "softmax_max", "softmax_sum", "attention_in"):
        fkw = {k: v for k, v in kw.items() if k not in ("softmax_max", "softmax_sum", "attention_in")}
        expect(INVALID, name, fag_tvm.flash_attention_score, *args[:3], **fkw)


@pytest.mark.parametrize("name", ["actual_seq_qlen", "actual_seq_kvlen", "prefix", "q_start_idx"])
def test_masked_host_int_arrays_rejected(name):
    if name == "prefix":
        args = bnsd(B=2, Sq=8, Skv=8)
        kw = dict(head_num=2, input_layout="BNSD", sparse_mode=6, atten_mask=masks.compressed_prefix_mask(),
                  prefix=np.ma.masked_array([2, 3]))
    elif name == "q_start_idx":
        args = bnsd()
        kw = _slopes_kw(q_start_idx=np.ma.masked_array([3], mask=[True]))
    else:
        args, kw = tnd()
        kw[name] = np.ma.masked_array(kw[name])
    for target in ("llvm", "reference"):
        expect(INVALID, name, fag_tvm.flash_attention_score_grad, *args, **dict(kw, target=target))


@pytest.mark.parametrize("bad", [[[1, 2], [3]], [object()], "abc", [2 ** 70]])
@pytest.mark.parametrize("name", ["prefix", "actual_seq_qlen", "q_start_idx"])
def test_unconvertible_host_int_arrays(bad, name):
    """Ragged lists, objects and out-of-range ints are FagErrors, not NumPy ValueErrors/OverflowErrors."""
    if name == "prefix":
        args = bnsd(B=2, Sq=8, Skv=8)
        kw = dict(head_num=2, input_layout="BNSD", sparse_mode=6, atten_mask=masks.compressed_prefix_mask())
    elif name == "q_start_idx":
        args, kw = bnsd(), _slopes_kw()
    else:
        args, kw = tnd()
    expect(INVALID, name, fag_tvm.flash_attention_score_grad, *args, **dict(kw, target="reference", **{name: bad}))


# ================================================================================ 5. TND totals above 1M

def _tnd_standins(seq_q, seq_kv, N=1, D=8):
    T, T2 = int(np.sum(seq_q)), int(np.sum(seq_kv))
    q, k = zs((T, N, D)), zs((T2, N, D))
    return [q, k, k, q], dict(head_num=N, input_layout="TND", actual_seq_qlen=np.cumsum(seq_q),
                              actual_seq_kvlen=np.cumsum(seq_kv), target="llvm")


@pytest.mark.parametrize("seq_q,seq_kv", [
    ([600_000, 600_000, 600_000], [1_048_576, 1, 1_048_576]),
    ([1_048_576] * 3, [1_048_576] * 3),
    ([1_048_576] * 2048, [1] * 2048),
    ([1] * 2047 + [1_048_576], [1_048_576] * 2048)])
def test_tnd_total_above_1m_accepted(seq_q, seq_kv):
    """MAX_S applies per sequence: packed totals above 1M validate (nothing is run)."""
    args, kw = _tnd_standins(seq_q, seq_kv)
    cfg = fag_tvm.api.config_for("bwd", *args, **kw)
    assert cfg.T == sum(seq_q) > 2 ** 20 or cfg.T2 == sum(seq_kv) > 2 ** 20
    assert cfg.Sq == max(seq_q) <= 2 ** 20 and cfg.Skv == max(seq_kv) <= 2 ** 20
    validate("fwd", *args[:3], **kw)


@pytest.mark.parametrize("seq_q,seq_kv,param", [
    ([2 ** 20 + 1], [4], "actual_seq_qlen"), ([4], [2 ** 20 + 1], "actual_seq_kvlen"),
    ([3, 2 ** 21], [4, 4], "actual_seq_qlen"), ([4, 4, 4], [1, 1, 3 * 2 ** 20], "actual_seq_kvlen")])
def test_tnd_sequence_above_1m_rejected(seq_q, seq_kv, param):
    args, kw = _tnd_standins(seq_q, seq_kv)
    expect(INVALID, param, fag_tvm.api.config_for, "bwd", *args, **kw)


def test_score_element_sanity_limit():
    """B·N1·Sq·Skv >= 2**62 would overflow int64 dropout/pse offsets: rejected at validation."""
    B, N, S = 2 ** 14, 256, 2 ** 20  # exactly 2**62 score elements
    q = zs((B, N, S, 1))
    expect(INVALID, "query", validate, "bwd", q, q, q, q, head_num=N, input_layout="BNSD", target="llvm")
    for target in ("llvm", "reference"):
        expect(INVALID, "query", fag_tvm.flash_attention_score_grad, q, q, q, q, head_num=N, input_layout="BNSD",
               target=target)


# ================================================================================ 6. empty calls

def _empty(layout="BNSD", B=0, N1=4, N2=2, Sq=8, Skv=6, D=8, Dv=8):
    shp = {"BNSD": lambda S, N, d: (B, N, S, d), "BSND": lambda S, N, d: (B, S, N, d),
           "BSH": lambda S, N, d: (B, S, N * d), "SBH": lambda S, N, d: (S, B, N * d)}[layout]
    args = [np.zeros(shp(Sq, N1, D), np.float32), np.zeros(shp(Skv, N2, D), np.float32),
            np.zeros(shp(Skv, N2, Dv), np.float32), np.zeros(shp(Sq, N1, Dv), np.float32)]
    return args, dict(head_num=N1, input_layout=layout)


@pytest.mark.parametrize("case", ["B0_bnsd", "B0_bsh", "B0_sbh", "B0_bsnd_dv4", "S0", "D0", "D0_bsh", "tnd"])
@pytest.mark.parametrize("target", ["llvm", "reference"])
def test_consistent_empty_calls_succeed(case, target):
    if case == "tnd":
        args = [np.zeros((0, 2, 8), np.float32)] * 4
        kw = dict(head_num=2, input_layout="TND", actual_seq_qlen=[0], actual_seq_kvlen=[0])
    else:
        layout = {"B0_bsh": "BSH", "B0_sbh": "SBH", "B0_bsnd_dv4": "BSND", "D0_bsh": "BSH"}.get(case, "BNSD")
        extra = {"S0": dict(B=2, Sq=0, Skv=0), "D0": dict(B=2, D=0, Dv=0), "D0_bsh": dict(B=2, D=0, Dv=0),
                 "B0_bsnd_dv4": dict(Dv=4)}.get(case, {})
        args, kw = _empty(layout, **extra)
    g = fag_tvm.flash_attention_score_grad(*args, **kw, target=target)
    for out, a in zip(g[:3], args[:3]):
        assert out.shape == a.shape and out.size == 0
    assert g.dpse is None
    f = fag_tvm.flash_attention_score(*args[:3], **kw, target=target)
    assert f.attention_out.shape == args[3].shape
    stats = f.softmax_max.shape
    g = fag_tvm.flash_attention_score_grad(*args, **kw, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                           attention_in=f.attention_out, target=target)
    assert g.dq.shape == args[0].shape
    if case == "D0":  # rows but no features: all scores are 0 → max 0, sum Skv
        assert stats == (2, 4, 8, 8)
        assert np.all(f.softmax_max == 0) and np.all(f.softmax_sum == 6)


def test_empty_with_external_pse_returns_empty_dpse():
    args, kw = _empty()
    g = fag_tvm.flash_attention_score_grad(*args, **kw, pse_shift=np.zeros((0, 4, 8, 6), np.float32), target="llvm")
    assert g.dpse is not None and g.dpse.shape == (0, 4, 8, 6)


def _inconsistent_empty(case):
    args, kw = _empty()
    if case == "dy_shape":
        args[3] = np.zeros((0, 4, 8, 4), np.float32)
        return "dy", args, kw
    if case == "head_num":
        return "head_num", args, dict(kw, head_num=3)
    if case == "head_num_zero":
        return "head_num", args, dict(kw, head_num=0)
    if case == "kv_batch":
        args[1] = np.zeros((1, 2, 0, 8), np.float32)
        args[2] = np.zeros((1, 2, 0, 8), np.float32)
        return "key", args, kw
    if case == "qd_kd":
        args[1] = np.zeros((0, 2, 6, 4), np.float32)
        return "key", args, kw
    if case == "gqa":
        args[1] = np.zeros((0, 3, 6, 8), np.float32)
        args[2] = np.zeros((0, 3, 6, 8), np.float32)
        return "key", args, kw
    if case == "kv_heads_zero":
        args[1] = np.zeros((0, 0, 6, 8), np.float32)
        args[2] = np.zeros((0, 0, 6, 8), np.float32)
        return "key", args, kw
    if case == "value_shape":
        args[2] = np.zeros((0, 2, 5, 8), np.float32)
        return "value", args, kw
    if case == "dv_gt_d":
        args[2] = np.zeros((0, 2, 6, 16), np.float32)
        args[3] = np.zeros((0, 4, 8, 16), np.float32)
        return "value", args, kw
    if case == "stats_f64":
        st = np.zeros((0, 4, 8, 8), np.float64)
        return "softmax_max", args, dict(kw, softmax_max=st, softmax_sum=st.astype(np.float32),
                                         attention_in=args[3])
    if case == "stats_shape":
        st = np.zeros((0, 4, 8, 1), np.float32)
        return "softmax_sum", args, dict(kw, softmax_max=st.repeat(8, -1), softmax_sum=st, attention_in=args[3])
    if case == "attention_in_dtype":
        st = np.zeros((0, 4, 8, 8), np.float32)
        return "attention_in", args, dict(kw, softmax_max=st, softmax_sum=st, attention_in=args[3].astype(np.float16))
    if case == "dtype":
        args[1] = args[1].astype(np.float16)
        return "key", args, kw
    if case == "pse_shape":
        return "pse_shift", args, dict(kw, pse_shift=np.zeros((0, 4, 8, 7), np.float32))
    if case == "mask_shape":
        return "atten_mask", args, dict(kw, atten_mask=np.zeros((8, 7), bool))
    if case == "tnd_no_seq":
        return "actual_seq_qlen", [np.zeros((0, 2, 8), np.float32)] * 4, dict(head_num=2, input_layout="TND")
    if case == "tnd_seq_total":
        return "actual_seq_qlen", [np.zeros((0, 2, 8), np.float32)] * 4, dict(
            head_num=2, input_layout="TND", actual_seq_qlen=[3], actual_seq_kvlen=[0])
    if case == "bsh_hidden":
        args, kw = _empty("BSH")
        return "head_num", args, dict(kw, head_num=5)
    raise AssertionError(case)


EMPTY_CASES = ["dy_shape", "head_num", "head_num_zero", "kv_batch", "qd_kd", "gqa", "kv_heads_zero", "value_shape",
               "dv_gt_d", "stats_f64", "stats_shape", "attention_in_dtype", "dtype", "pse_shape", "mask_shape",
               "tnd_no_seq", "tnd_seq_total", "bsh_hidden"]


@pytest.mark.parametrize("case", EMPTY_CASES)
@pytest.mark.parametrize("target", ["llvm", "reference"])
def test_inconsistent_empty_calls_rejected(case, target):
    param, args, kw = _inconsistent_empty(case)
    assert all(a.size == 0 for a in args[:3])
    expect(INVALID, param, fag_tvm.flash_attention_score_grad, *args, **dict(kw, target=target))


# ================================================================================ 7. outputs beyond memory

def _huge_call(with_stats: bool):
    B, N, Sq, Skv, D = 2048, 256, 2 ** 20, 1, 768  # dq alone: 2**11·2**8·2**20·768·4 bytes ≈ 1.7 PB
    q, kv = zs((B, N, Sq, D)), zs((B, N, Skv, D))
    kw = dict(head_num=N, input_layout="BNSD")
    if with_stats:
        st = zs((B, N, Sq, 8))
        kw.update(softmax_max=st, softmax_sum=st, attention_in=q)
    return [q, kv, kv, q], kw


@pytest.mark.parametrize("with_stats", [False, True])
@pytest.mark.parametrize("target", ["llvm", "reference"])
def test_outputs_beyond_memory_rejected(with_stats, target):
    args, kw = _huge_call(with_stats)
    e = expect(INVALID, "query", fag_tvm.flash_attention_score_grad, *args, **dict(kw, target=target))
    assert "dq" in e.message and "memory" in e.message
    fkw = {k: v for k, v in kw.items() if k not in ("softmax_max", "softmax_sum", "attention_in")}
    e = expect(INVALID, "query", fag_tvm.flash_attention_score, *args[:3], **dict(fkw, target=target))
    assert "attention_out" in e.message


@pytest.mark.parametrize("target", ["llvm", "reference"])
def test_dpse_beyond_memory_rejected(target):
    S = 2 ** 20  # BNSS pse of 256·2**40 fp32 elements (1 PiB), everything else small
    q = zs((1, 256, S, 1))
    e = expect(INVALID, "pse_shift", fag_tvm.flash_attention_score_grad, q, q, q, q, head_num=256,
               input_layout="BNSD", pse_shift=zs((1, 256, S, S)), target=target)
    assert "dpse" in e.message


def test_huge_tnd_beyond_memory_rejected():
    args, kw = _tnd_standins([2 ** 20] * 2048, [2 ** 20] * 2048, N=256, D=768)
    e = expect(INVALID, "query", fag_tvm.flash_attention_score_grad, *args, **kw)
    assert "memory" in e.message


def _oom(spec):
    raise MemoryError("simulated")


def test_memory_error_while_computing_is_a_fag_error():
    """Working buffers are not counted by the output check: a MemoryError later is still a FagError."""
    args = bnsd()
    kw = dict(head_num=2, input_layout="BNSD", target="llvm", _provider=_oom)
    expect(INVALID, "memory", fag_tvm.flash_attention_score_grad, *args, **kw)
    expect(INVALID, "memory", fag_tvm.flash_attention_score, *args[:3], **kw)


def test_aclnn_outputs_beyond_memory_is_a_status():
    args, kw = _huge_call(True)
    st = kw["softmax_max"]
    outs = [np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), a.shape, (0,) * a.ndim) for a in args[:3]]
    assert all(o.flags.writeable for o in outs)
    status, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(
        *args, None, None, None, None, st, st, None, args[0], None, 1.0, 1.0, INT32_MAX, INT32_MAX, 256, "BNSD",
        0, 0, *outs, None)
    assert status == INVALID and ex is None


# ================================================================================ 8. actual_seq_* outside TND

@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("name", ["actual_seq_qlen", "actual_seq_kvlen"])
@pytest.mark.parametrize("val", [[16], np.array([16]), [8, 16], []])
def test_actual_seq_needs_tnd(layout, name, val):
    args, kw = _empty(layout, B=1, N1=2, N2=2, Sq=16, Skv=16)
    args = [rnd(a.shape, i) for i, a in enumerate(args)]
    kw = dict(kw, **{name: val})
    rejected_everywhere(name, args, kw)


# ================================================================================ 9. workloads

GOOD_WL = {"B": 1, "N1": 2, "N2": 2, "Sq": 16, "Skv": 16, "D": 8, "Dv": 8, "input_layout": "BNSD",
           "dtype": "fp32", "sparse_mode": 3}


@pytest.mark.parametrize("extra", [{"sparse_mod": 3}, {"Sq ": 16}, {"seq": 1}, {"keep": 0.9}, {"ID": "x"},
                                   {"pse_types": 2}])
def test_workload_unknown_keys(extra):
    w = dict(GOOD_WL, **extra)
    for fn, arg in ((configs, w), (load_workloads, json.dumps(w)), (load_workloads, json.dumps([GOOD_WL, w]))):
        e = expect(INVALID, "workload", fn, arg)
        assert next(iter(extra)) in e.message and "sparse_mode" in e.message and "keep_prob" in e.message


@pytest.mark.parametrize("bad", ["3", "[1, 2]", '["S1"]', "[[]]", "null", "[null]", "true", '"S1"', "[]",
                                 '{"B": 1}'])
def test_workload_not_an_object(bad):
    expect(INVALID, "workload", load_workloads, bad)


@pytest.mark.parametrize("bad", [None, 3, "S1", [GOOD_WL], ("a",)])
def test_workload_configs_not_a_dict(bad):
    expect(INVALID, "workload", configs, bad)


@pytest.mark.parametrize("key,val", [("B", 1.5), ("Sq", "16"), ("D", None), ("N1", True), ("Skv", 16.0), ("Dv", [8]),
                                     ("sparse_mode", "3"), ("B", 0), ("Sq", -4), ("Skv", 2 ** 70), ("N2", 2 ** 40),
                                     ("input_layout", 3), ("dtype", None), ("keep_prob", "0.9"),
                                     ("keep_prob", True), ("keep_prob", 10 ** 400), ("pse_type", 1.0),
                                     ("pse", 3), ("mask", "yes"), ("id", [1]), ("B", 2 ** 21 + 1)])
def test_workload_bad_values(key, val):
    w = dict(GOOD_WL, **{key: val})
    e = expect(INVALID, "workload", configs, w)
    assert key in e.message


@pytest.mark.parametrize("w", [dict(GOOD_WL, id="mine", pse="BNSS", pse_type=1, keep_prob=0.9, mask=None),
                               dict(GOOD_WL, sparse_mode=0, mask=True, pse=None),
                               dict(GOOD_WL, input_layout="TND", B=3, pse="slopes_N", pse_type=3)])
def test_workload_optional_keys_accepted(w):
    fcfg, bcfg = configs(w)
    assert bcfg.direction == "bwd"
    assert load_workloads(json.dumps(w)) == [w]


def test_suite_workloads_still_valid():
    for sid in SUITE:
        (w,) = load_workloads(sid)
        configs(w)


@pytest.mark.parametrize("huge", [{"Sq": 2 ** 31, "Skv": 2 ** 31}, {"B": 2 ** 21, "Sq": 2 ** 31, "Skv": 2 ** 31,
                                                                        "keep_prob": 0.5},
                                  {"input_layout": "TND", "B": 2 ** 21, "Sq": 2 ** 31}])
def test_workload_huge_sizes_are_fag_errors(huge):
    expect(INVALID, "", configs, dict(GOOD_WL, **huge))


# ================================================================================ 10. C-style mirror

def _aclnn_args(outs=None, **over):
    args = bnsd(Sq=8, Skv=8)
    f = fag_tvm.reference.flash_attention_score(*args[:3], head_num=2, input_layout="BNSD")
    outs = outs if outs is not None else [np.empty_like(a) for a in args[:3]]
    base = [*args, None, None, None, None, f.softmax_max, f.softmax_sum, None, f.attention_out, None, 1.0, 1.0,
            INT32_MAX, INT32_MAX, 2, "BNSD", 0, 0, *outs, None]
    names = {"query": 0, "keyIn": 1, "value": 2, "dy": 3, "pse": 4, "drop": 5, "atten": 7, "smax": 8, "ssum": 9,
             "attn": 11, "prefix": 12, "scale": 13, "keep": 14, "pre": 15, "next": 16, "headNum": 17, "layout": 18,
             "ip": 19, "mode": 20, "dqOut": 21, "dkOut": 22, "dvOut": 23, "dpseOut": 24}
    for k, v in over.items():
        base[names[k]] = v
    return base, args


@pytest.mark.parametrize("target", ["llvm", "reference"])
def test_aclnn_valid_run(target):
    base, args = _aclnn_args()
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*base, target=target)
    assert st == 0
    assert aclnn.aclnnFlashAttentionScoreGrad(None, ws, ex) == 0
    r = fag_tvm.reference.flash_attention_score_grad(*args, head_num=2, input_layout="BNSD", softmax_max=base[8],
                                                     softmax_sum=base[9], attention_in=base[11])
    for a, b in zip(base[21:24], r[:3]):
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("ws_bad", [None, -1, "10", 1.5, True, [0], np.float64(2.0), -(2 ** 70)])
def test_aclnn_bad_workspace_size_is_a_status(ws_bad):
    base, _ = _aclnn_args()
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*base)
    assert st == 0
    assert aclnn.aclnnFlashAttentionScoreGrad(None, ws_bad, ex) == INVALID
    assert "workspaceSize" in ex.last_error.message
    assert aclnn.aclnnFlashAttentionScoreGrad(None, ws, ex) == 0  # the executor was not consumed


@pytest.mark.parametrize("ex_bad", [None, 0, 5, "executor", object(), {"cfg": None}])
def test_aclnn_bad_executor_is_a_status(ex_bad):
    assert aclnn.aclnnFlashAttentionScoreGrad(None, 0, ex_bad) == INVALID


def test_aclnn_read_only_outputs():
    outs = [np.empty((1, 2, 8, 8), np.float32) for _ in range(3)]
    for i in range(3):
        o = [x.copy() for x in outs]
        o[i].flags.writeable = False
        base, _ = _aclnn_args(outs=o)
        st, _, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*base)
        assert st == INVALID and ex is None
    # made read-only between the phases: phase 2 reports it, writes nothing
    o = [x.copy() for x in outs]
    base, _ = _aclnn_args(outs=o)
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*base)
    assert st == 0
    o[1].flags.writeable = False
    assert aclnn.aclnnFlashAttentionScoreGrad(None, ws, ex) == INVALID
    assert "dkOut" in ex.last_error.message


@pytest.mark.parametrize("which", ["dqOut", "dkOut", "dvOut"])
@pytest.mark.parametrize("bad", ["shape", "dtype", "list", "masked", "object", "meta", "scalar", "broadcast"])
def test_aclnn_bad_outputs_are_a_status(which, bad):
    import torch

    good = np.empty((1, 2, 8, 8), np.float32)
    o = {"shape": np.empty((1, 2, 8, 7), np.float32), "dtype": good.astype(np.float16), "list": good.tolist(),
         "masked": np.ma.masked_array(good), "object": object(), "meta": torch.empty((1, 2, 8, 8), device="meta"),
         "scalar": np.float32(0), "broadcast": zs((1, 2, 8, 8))}[bad]
    base, _ = _aclnn_args(**{which: o})
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*base)
    assert st == INVALID and ex is None


@pytest.mark.parametrize("which", ["dqOut", "dkOut", "dvOut", "query", "keyIn", "value", "dy", "smax", "ssum", "attn"])
def test_aclnn_missing_tensor_is_161001(which):
    base, _ = _aclnn_args(**{which: None})
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*base)
    assert st == NULL and ex is None


@pytest.mark.parametrize("over", [dict(ip=np.array([0, 1])), dict(mode=np.array([0, 1])), dict(ip="2"),
                                  dict(prefix=[[1], [2, 3]], mode=6, atten=masks.compressed_prefix_mask()),
                                  dict(query=object()), dict(pse=np.ma.masked_array([1.0])),
                                  dict(scale=None), dict(keep=None), dict(headNum=None), dict(layout=None),
                                  dict(pre=2 ** 70), dict(scale=1e39), dict(keep=1e-40), dict(atten="mask")])
def test_aclnn_phase1_never_raises(over):
    base, _ = _aclnn_args(**over)
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*base)
    assert st in (NULL, INVALID) and ex is None


def test_aclnn_torch_outputs():
    import torch

    outs = [torch.empty((1, 2, 8, 8), dtype=torch.float32, requires_grad=True) for _ in range(3)]
    base, args = _aclnn_args(outs=outs)
    base[:4] = [torch.from_numpy(a) for a in args]
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*base)
    assert st == 0
    assert aclnn.aclnnFlashAttentionScoreGrad(None, ws, ex) == 0
    r = fag_tvm.reference.flash_attention_score_grad(*args, head_num=2, input_layout="BNSD", softmax_max=base[8],
                                                     softmax_sum=base[9], attention_in=base[11])
    for a, b in zip(outs, r[:3]):
        assert rel_err(a.detach().numpy(), b) <= TOL


@pytest.mark.parametrize("bad", ["ab", [1.5, 2.0], [[1, 2], [3, 4]], [object()]])
@pytest.mark.parametrize("mode", [0, 5, 6])
def test_prefix_is_typed_even_where_it_is_ignored(bad, mode):
    """Without a mask sparse_mode and prefix are ignored (SPEC §5), but a prefix that is no integer array is
    still a user error, as tokens of the wrong type are."""
    args = bnsd(B=2, Sq=8, Skv=8)
    for target in ("llvm", "reference"):
        expect(INVALID, "prefix", fag_tvm.flash_attention_score_grad, *args,
               **dict(head_num=2, input_layout="BNSD", sparse_mode=mode, prefix=bad, target=target))
