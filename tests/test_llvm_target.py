"""target="llvm" vs the float64 reference (SPEC A10), over layouts, dtypes, GQA, Dv<D, pse forms,
sparse modes 0–8, dropout, TND varlen, dpse, invalid rows and odd sizes.

Every case runs forward and backward on the compiled kernels; inputs are random (never zeros) and the
reference runs on the same already-rounded inputs. Outputs come from freshly allocated (unzeroed)
buffers, so an element the kernel forgets to write shows up as garbage."""
from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import fag_tvm
from fag_tvm import masks
from fag_tvm.dropout import gen_drop_mask, gen_drop_mask_tnd
from fag_tvm.testing import cann_element_pass_ratio, rel_err, tolerance

DT = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def _shape(layout, B, N, S, D):
    return {"BSH": (B, S, N * D), "SBH": (S, B, N * D), "BSND": (B, S, N, D), "BNSD": (B, N, S, D)}[layout]


def make_case(seed, layout="BNSD", dtype="fp32", B=1, N1=2, N2=None, Sq=48, Skv=None, D=16, Dv=None,
              seqs=None, mode=None, pse=None, pse_type=1, keep=1.0, pre=2147483647, nxt=2147483647,
              inner_precise=0, prefix=None, full_mask=None, q_start=None, kv_start=None, scale=None):
    """Arguments of one call; `pse` names the pse form, `full_mask` the mask form for modes 0/1/5."""
    rng = np.random.default_rng(seed)
    N2 = N2 or N1
    Skv = Skv or Sq
    Dv = Dv or D
    dt = DT[dtype]
    kw = dict(head_num=N1, input_layout=layout, scale_value=scale if scale is not None else D ** -0.5)
    if layout == "TND":
        sq = [s[0] for s in seqs]
        skv = [s[1] for s in seqs]
        T, T2 = sum(sq), sum(skv)
        q = rng.standard_normal((T, N1, D))
        k = rng.standard_normal((T2, N2, D))
        v = rng.standard_normal((T2, N2, Dv))
        dy = rng.standard_normal((T, N1, Dv))
        kw.update(actual_seq_qlen=np.cumsum(sq), actual_seq_kvlen=np.cumsum(skv))
        Bn, Sqm, Skm = len(seqs), max(sq), max(skv)
    else:
        q = rng.standard_normal(_shape(layout, B, N1, Sq, D))
        k = rng.standard_normal(_shape(layout, B, N2, Skv, D))
        v = rng.standard_normal(_shape(layout, B, N2, Skv, Dv))
        dy = rng.standard_normal(_shape(layout, B, N1, Sq, Dv))
        Bn, Sqm, Skm = B, Sq, Skv
    q, k, v, dy = (x.astype(dt) for x in (q, k, v, dy))
    if mode is not None:
        kw["sparse_mode"] = mode
        if mode in (2, 3, 4, 7, 8):
            kw["atten_mask"] = masks.compressed_causal_mask()
        elif mode == 6:
            kw["atten_mask"] = masks.compressed_prefix_mask()
        else:
            form = full_mask or "SS"
            shp = {"SS": (Sqm, Skm), "11SS": (1, 1, Sqm, Skm), "B1SS": (Bn, 1, Sqm, Skm),
                   "BNSS": (Bn, N1, Sqm, Skm)}[form]
            m = rng.random(shp) < 0.3
            if mode == 0:  # a mask consistent with the tokens (the only case CANN defines)
                m = m | masks.band_mask(Sqm, Skm, pre, nxt)
            if mode == 5:
                for b in range(Bn):
                    m[b] = masks.prefix_mask(Sqm, Skm, prefix[b])
            kw["atten_mask"] = m if seed % 2 else m.astype(np.uint8)
        kw.update(pre_tokens=pre, next_tokens=nxt)
    if prefix is not None:
        kw["prefix"] = np.asarray(prefix, dtype=np.int64)
    if pse is not None:
        kw["pse_type"] = pse_type
        if pse == "slopes_N":
            kw["pse_shift"] = (rng.random(N1) + 0.1).astype(np.float32)
        elif pse == "slopes_BN":
            kw["pse_shift"] = (rng.random((Bn, N1)) + 0.1).astype(np.float32)
        elif pse == "TND_BNSS":
            kw["pse_shift"] = rng.standard_normal(N1 * sum(a * b for a, b in seqs)).astype(dt)
        elif pse == "TND_BN1S":
            kw["pse_shift"] = rng.standard_normal(N1 * sum(b for a, b in seqs)).astype(dt)
        elif pse in ("BNHS", "1NHS"):
            # Toeplitz alibi, bottom-right aligned, last 1024 rows (SPEC §4 golden)
            W = Skm
            full_rows = max(Sqm, 1024)
            i = np.arange(full_rows)[:, None]
            j = np.arange(W)[None, :]
            slopes = rng.random((Bn if pse == "BNHS" else 1, N1)) + 0.1
            full = -slopes[:, :, None, None] * np.abs(i - j - (Sqm - W))[None, None]
            kw["pse_shift"] = full[:, :, -1024:, :].astype(dt)
        else:
            shp = {"BNSS": (Bn, N1, Sqm, Skm), "1NSS": (1, N1, Sqm, Skm), "BN1S": (Bn, N1, 1, Skm)}[pse]
            kw["pse_shift"] = rng.standard_normal(shp).astype(dt)
    if q_start is not None:
        kw["q_start_idx"] = [q_start]
    if kv_start is not None:
        kw["kv_start_idx"] = [kv_start]
    if keep < 1.0:
        kw["keep_prob"] = keep
        kw["drop_mask"] = gen_drop_mask_tnd(N1, [s[0] for s in seqs], [s[1] for s in seqs], keep, seed) \
            if layout == "TND" else gen_drop_mask(Bn, N1, Sqm, Skm, keep, seed)
    if inner_precise:
        kw["inner_precise"] = inner_precise
    return q, k, v, dy, kw


def check(case, dtype):
    q, k, v, dy, kw = case
    tol = tolerance(dtype)
    f = fag_tvm.flash_attention_score(q, k, v, target="llvm", **kw)
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    assert rel_err(f.softmax_max, fr.softmax_max) <= max(tol, 1e-6) or np.array_equal(f.softmax_max, fr.softmax_max)
    assert rel_err(f.softmax_sum, fr.softmax_sum) <= max(tol, 1e-5)
    e = rel_err(f.attention_out, fr.attention_out)
    assert e <= tol, f"attention_out rel err {e:.2e} > {tol}"
    # backward on the reference's stats/output (the same inputs for both)
    stats = dict(softmax_max=fr.softmax_max, softmax_sum=fr.softmax_sum, attention_in=fr.attention_out)
    g = fag_tvm.flash_attention_score_grad(q, k, v, dy, target="llvm", **stats, **kw)
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **stats, **kw)
    for name in ("dq", "dk", "dv", "dpse"):
        a, b = getattr(g, name), getattr(gr, name)
        if b is None:
            assert a is None, f"{name} should be None"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        e = rel_err(a, b)
        assert e <= tol, f"{name} rel err {e:.2e} > {tol}"
        if dtype == "fp32":
            assert cann_element_pass_ratio(a, b) >= 0.999, name
    return g, gr


CASES = {
    # name: (make_case kwargs)
    "bnsd_plain": dict(layout="BNSD", Sq=64, D=64),
    "bsh_gqa_causal_dv": dict(layout="BSH", B=2, N1=4, N2=2, Sq=100, D=32, Dv=16, mode=2),
    "bsnd_f16_rd_causal_pse_drop": dict(layout="BSND", dtype="fp16", Sq=70, Skv=90, D=32, mode=3, pse="BNSS",
                                        keep=0.8),
    "sbh_bf16_band_1nss_type0": dict(layout="SBH", dtype="bf16", B=2, Sq=80, D=32, mode=4, pre=20, nxt=5,
                                     pse="1NSS", pse_type=0),
    "bnsd_mode0_bnss_tokens": dict(layout="BNSD", B=2, Sq=60, Skv=50, D=16, mode=0, full_mask="BNSS", pre=12,
                                   nxt=3),
    "bnsd_mode1_ss": dict(layout="BNSD", Sq=40, Skv=72, D=8, mode=1, full_mask="SS"),
    "bnsd_mode1_11ss_bn1s": dict(layout="BNSD", B=2, Sq=33, Skv=47, D=8, mode=1, full_mask="11SS", pse="BN1S"),
    "bnsd_mode5_prefix": dict(layout="BNSD", B=2, Sq=40, Skv=64, D=16, mode=5, full_mask="B1SS", prefix=[30, 50]),
    "bsnd_mode6_prefix": dict(layout="BSND", B=2, Sq=64, Skv=48, D=16, mode=6, prefix=[0, 20]),
    "tnd_mode3_slopes": dict(layout="TND", N1=4, N2=2, seqs=[(5, 9), (33, 33), (17, 40)], D=16, mode=3,
                             pse="slopes_BN", pse_type=2),
    "tnd_mode7": dict(layout="TND", seqs=[(20, 30), (31, 25), (16, 16)], D=16, mode=7, pre=8, nxt=4),
    "tnd_mode8_bnss_drop": dict(layout="TND", seqs=[(24, 24), (13, 13)], D=16, mode=8, pre=6, nxt=2,
                                pse="TND_BNSS", keep=0.7),
    "tnd_mode6_prefix": dict(layout="TND", seqs=[(20, 30), (31, 25)], D=8, mode=6, prefix=[15, 10]),
    "tnd_nomask_bn1s_zero_len": dict(layout="TND", seqs=[(7, 11), (0, 5), (19, 0), (23, 13)], D=8),
    "tnd_bn1s_type0": dict(layout="TND", seqs=[(7, 11), (19, 23)], D=8, pse="TND_BN1S", pse_type=0),
    "slopes_sqrt_start": dict(layout="BSND", B=2, N1=3, Sq=50, Skv=61, D=8, pse="slopes_N", pse_type=3,
                              q_start=5, kv_start=2),
    "alibi_compressed": dict(layout="BNSD", N1=1, Sq=1100, D=8, mode=3, pse="BNHS", scale=0.5),
    "s1_d1": dict(layout="BNSD", N1=1, Sq=1, Skv=1, D=1),
    "odd_d3_dv1": dict(layout="BSH", N1=3, Sq=37, Skv=29, D=3, Dv=1, mode=2),
    "d256_f16": dict(layout="BNSD", dtype="fp16", N1=1, Sq=40, D=256, Dv=128, mode=2),
    "d768": dict(layout="BNSD", N1=1, Sq=20, Skv=24, D=768),
    "gqa4_bf16_drop_dpse1nss": dict(layout="BNSD", dtype="bf16", B=2, N1=4, N2=1, Sq=48, D=16, keep=0.9,
                                    pse="1NSS"),
    "invalid_rows_auto_mode3": dict(layout="BNSD", Sq=60, Skv=30, D=16, mode=3),
    "invalid_rows_band_negative": dict(layout="BNSD", Sq=50, D=16, mode=4, pre=10, nxt=-3),
    "inner_precise2_full_mask": dict(layout="BNSD", B=2, Sq=30, Skv=20, D=8, mode=1, full_mask="B1SS",
                                     inner_precise=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_llvm_matches_reference(name):
    params = dict(CASES[name])
    dtype = params.get("dtype", "fp32")
    seed = sum(map(ord, name))
    case = make_case(seed, **params)
    if name.startswith("inner_precise2"):
        case[4]["atten_mask"][:, :, 3, :] = True  # fully masked rows
    check(case, dtype)


def test_uniform_rows_without_invalid_line():
    """Mode 0 band + a mask that fully masks a row, inner_precise 0: P is uniform over ALL Skv columns,
    including tiles the band rule would skip (SPEC §8); the kernel must not skip them."""
    q, k, v, dy, kw = make_case(11, layout="BNSD", Sq=70, Skv=70, D=16, mode=0, full_mask="SS", pre=8, nxt=0)
    kw["atten_mask"] = np.asarray(kw["atten_mask"], dtype=bool).copy()
    kw["atten_mask"][40, :] = True
    g, gr = check((q, k, v, dy, kw), "fp32")
    assert np.abs(gr.dk).max() > 0


def test_invalid_row_stats_give_exact_zero():
    """Stats (-FLT_MAX, +FLT_MAX) on a row: that row's dq is exactly 0 and it adds nothing to dk/dv."""
    q, k, v, dy, kw = make_case(5, layout="BNSD", N1=1, Sq=20, Skv=30, D=8)
    f = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    smax, ssum = f.softmax_max.copy(), f.softmax_sum.copy()
    smax[0, 0, :] = -np.finfo(np.float32).max
    ssum[0, 0, :] = np.finfo(np.float32).max
    g = fag_tvm.flash_attention_score_grad(q, k, v, dy, softmax_max=smax, softmax_sum=ssum,
                                           attention_in=f.attention_out, target="llvm", **kw)
    assert np.all(g.dq == 0)
    dy0 = dy.copy()
    dy0[0, 0, 3:] = 0  # only row 0..2 carry gradient; row 0.. are invalid → dv from rows 1, 2 only
    smax1, ssum1 = smax.copy(), ssum.copy()
    smax1[0, 0, 1:3] = -np.finfo(np.float32).max
    ssum1[0, 0, 1:3] = np.finfo(np.float32).max
    g1 = fag_tvm.flash_attention_score_grad(q, k, v, dy0, softmax_max=smax1, softmax_sum=ssum1,
                                            attention_in=f.attention_out, target="llvm", **kw)
    assert np.all(g1.dk == 0) and np.all(g1.dv == 0)


def test_stats_none_runs_forward():
    q, k, v, dy, kw = make_case(3, layout="BSND", B=2, Sq=40, D=16, mode=2)
    g = fag_tvm.flash_attention_score_grad(q, k, v, dy, target="llvm", **kw)
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **kw)
    for a, b in zip(g[:3], gr[:3]):
        assert rel_err(a, b) <= 2e-5


def test_torch_tensors_roundtrip():
    torch = pytest.importorskip("torch")
    q, k, v, dy, kw = make_case(4, layout="BNSD", dtype="bf16", Sq=32, D=16, mode=2)
    tq, tk, tv, tdy = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) for x in (q, k, v, dy))
    g = fag_tvm.flash_attention_score_grad(tq, tk, tv, tdy, target="llvm", **kw)
    assert isinstance(g.dq, torch.Tensor) and g.dq.dtype == torch.bfloat16
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **kw)
    assert rel_err(g.dq.float().numpy(), gr.dq) <= 3e-2


_DET_SCRIPT = r"""
import sys, numpy as np, hashlib
sys.path.insert(0, {tests!r})
from test_llvm_target import make_case
import fag_tvm
q, k, v, dy, kw = make_case(9, layout="BNSD", B=1, N1=4, N2=2, Sq=200, Skv=180, D=32, mode=3, keep=0.9,
                            pse="BNSS")
g = fag_tvm.flash_attention_score_grad(q, k, v, dy, target="llvm", **kw)
h = hashlib.sha256()
for x in g:
    h.update(np.ascontiguousarray(x).tobytes())
print(h.hexdigest())
"""


def test_deterministic_across_runs_and_thread_counts():
    """SPEC A7: bitwise-identical results across runs and between 1 and 2 threads."""
    tests = os.path.dirname(os.path.abspath(__file__))
    digests = []
    for threads in ("1", "2", "2"):
        env = dict(os.environ, TVM_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _DET_SCRIPT.format(tests=tests)], env=env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        digests.append(out)
    assert digests[0] == digests[1] == digests[2], digests
