"""target="cuda-sim": the CUDA backward's kernels (targets/cuda) run on the CPU through TVM's OpenCL codegen
and POCL, and the same TIR compiled by nvcc for sm_80 / sm_90.

The contract's random configurations run on cuda-sim through the `target` fixture (test_targets_random.py,
test_hardening_*.py). Here, what only this target has:

* every knob that changes the code (block sizes incl. tiles larger than the shapes and ragged edges, warps,
  the dQ path, shared-memory padding) against the float64 reference at SPEC A10, fp32/fp16/bf16, GQA, Dv < D,
  D = 1 and D = 256, dpse of every external form (1NSS summed over the batch, BN1S broadcast rows);
* the deterministic dQ kernel is bitwise stable across runs, `deterministic=True` of a call overrides an
  atomic schedule, and both modes agree within the A10 tolerance;
* the OpenCL source carries every float constant exactly (TVM prints 7 digits);
* nvcc: a representative list compiles for sm_80 and sm_90, shared memory within the architecture's limit."""
from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest

import fag_tvm
from fag_tvm import jit, masks, targets
from fag_tvm.core.spec import KernelSpec
from fag_tvm.dropout import gen_drop_mask
from fag_tvm.schedules import cuda as sc
from fag_tvm.targets.cuda import nvcc, opencl
from fag_tvm.targets.cuda.bwd import make_phases
from fag_tvm.testing import a10_problems

TARGET = targets.get("cuda-sim")
OK, WHY = TARGET.availability()
pytestmark = [pytest.mark.sim, pytest.mark.skipif(not OK, reason=f"cuda-sim not available here: {WHY}")]
NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
VARIANTS = {
    "m16_n16_w1": sc.Knobs(block_m=16, block_n=16, warps=1),
    "m32_n16_w2_pad0": sc.Knobs(block_m=32, block_n=16, warps=2, smem_pad=0),
    "m16_n32_w4_dqkernel": sc.Knobs(block_m=16, block_n=32, warps=4, dq="kernel"),
    "m64_n64_w8": sc.Knobs(block_m=64, block_n=64, warps=8),
}


def _provider(knobs):
    return lambda spec: jit.kernel(TARGET, spec, knobs=knobs)


def _case(dtype, seed=3, B=2, N1=4, N2=2, Sq=37, Skv=45, D=40, Dv=24, mode=2, pse="BNSS", dropout=True,
          layout="BNSD"):
    rng = np.random.default_rng(seed)
    np_dt = NP[dtype]
    q = rng.standard_normal((B, N1, Sq, D)).astype(np_dt)
    k = rng.standard_normal((B, N2, Skv, D)).astype(np_dt)
    v = rng.standard_normal((B, N2, Skv, Dv)).astype(np_dt)
    dy = rng.standard_normal((B, N1, Sq, Dv)).astype(np_dt)
    kw = dict(head_num=N1, input_layout=layout, scale_value=D ** -0.5, sparse_mode=mode)
    if mode:
        kw["atten_mask"] = masks.compressed_causal_mask()
    shapes = {"BNSS": (B, N1, Sq, Skv), "1NSS": (1, N1, Sq, Skv), "BN1S": (B, N1, 1, Skv)}
    if pse:
        kw["pse_shift"] = (0.3 * rng.standard_normal(shapes[pse])).astype(np_dt)
    if dropout:
        kw.update(keep_prob=0.8, drop_mask=gen_drop_mask(B, N1, Sq, Skv, 0.8, seed=seed))
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    st = dict(softmax_max=fr.softmax_max, softmax_sum=fr.softmax_sum, attention_in=fr.attention_out)
    return (q, k, v, dy), dict(kw, **st)


def _grad(args, kw, knobs=None, **extra):
    p = {} if knobs is None else {"_provider": _provider(knobs)}
    return fag_tvm.flash_attention_score_grad(*args, target="cuda-sim", **p, **kw, **extra)


def _check(g, args, kw, dtype):
    gr = fag_tvm.reference.flash_attention_score_grad(*args, **kw)
    for name in ("dq", "dk", "dv", "dpse"):
        a, b = getattr(g, name), getattr(gr, name)
        assert (a is None) == (b is None), name
        if b is not None:
            probs = a10_problems(name, a, b, dtype)
            assert not probs, probs


@pytest.mark.parametrize("variant,dtype", [
    ("m16_n16_w1", "float32"), ("m32_n16_w2_pad0", "float16"), ("m16_n32_w4_dqkernel", "bfloat16"),
    ("m64_n64_w8", "float32"), ("m16_n32_w4_dqkernel", "float32"), ("m16_n16_w1", "bfloat16")])
def test_knob_variants_match_the_reference(variant, dtype):
    """37 x 45 under a causal band with pse, dropout, GQA and Dv < D: ragged edges in every tile size, tiles
    larger than the whole shape (64 x 64), skipped blocks, dQ by atomics and by its own kernel."""
    args, kw = _case(dtype)
    _check(_grad(args, kw, VARIANTS[variant]), args, kw, dtype)


@pytest.mark.parametrize("pse,B", [("1NSS", 3), ("BN1S", 2)])
def test_dpse_shared_elements(pse, B):
    """dpse elements several cells add into: 1NSS summed over the batch (one CTA walks the batches in order)
    and BN1S rows broadcast over every query row (one thread per column, rows in order)."""
    args, kw = _case("float32", B=B, pse=pse, dropout=False)
    _check(_grad(args, kw, VARIANTS["m16_n16_w1"]), args, kw, "float32")


@pytest.mark.parametrize("D,Dv,dtype", [(1, 1, "float32"), (256, 256, "bfloat16"), (200, 72, "float16")])
def test_head_dims(D, Dv, dtype):
    args, kw = _case(dtype, B=1, N1=2, N2=1, Sq=19, Skv=23, D=D, Dv=Dv, pse=None)
    _check(_grad(args, kw), args, kw, dtype)


def test_deterministic_mode_is_bitwise_stable_and_agrees_with_atomics():
    args, kw = _case("float32", mode=0, pse=None, dropout=False, Sq=70, Skv=50)
    a = _grad(args, kw, VARIANTS["m16_n16_w1"], deterministic=True)
    b = _grad(args, kw, VARIANTS["m16_n16_w1"], deterministic=True)
    for name in ("dq", "dk", "dv"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    c = _grad(args, kw, VARIANTS["m16_n16_w1"])  # atomic dQ
    _check(a, args, kw, "float32")
    _check(c, args, kw, "float32")
    assert np.array_equal(a.dk, c.dk) and np.array_equal(a.dv, c.dv)  # dK/dV never use atomics


def test_opencl_literals_are_exact():
    src = "x = 3.402823e+38f; y = 1.987569e-04f; z = 2.000000e+00f;"
    out = opencl.exact_literals(src, [3.4028234663852886e38, 1.9875691500e-4])
    assert "0x1.fffffe0000000p+127f" in out and float(np.float32(1.9875691500e-4)).hex() + "f" in out
    assert "2.000000e+00f" in out  # exactly representable integers stay
    with pytest.raises(ValueError, match="matches no float32 constant"):
        opencl.exact_literals("w = 1.234567e-01f;", [0.5])


HEAVY = dict(direction="bwd", group=2, band=True, full_mask=True, pse="ext", pse_add_first=False, dropout=True,
             dpse=True, dpse_sum_b=False)


@pytest.mark.skipif(nvcc.nvcc_path() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d,dtype", [(64, "bfloat16"), (128, "float16"), (256, "float32")])
def test_nvcc_compiles_the_default_schedule(arch, d, dtype):
    """Every phase of the default schedule (every feature on) compiles with nvcc; the dynamic shared memory the
    kernels declare fits the architecture's opt-in limit; ptxas reports registers for all four kernels."""
    spec = KernelSpec(dtype=dtype, d=d, dv=d, **HEAVY)
    k = sc.default_knobs(spec, arch)
    res = nvcc.ptxas_resources(nvcc.cuda_source(make_phases(spec, k, "shared.dyn", "fag_t"), arch), arch)
    assert sorted(n.split("_")[2] for n in res) == ["dkdv", "dq", "post", "pre"]
    assert 4 * sc.smem_floats(spec, k, "dkdv") <= sc.ARCHS[arch]["smem_bytes"]
    assert all(0 < r["registers"] <= 255 and r["smem_static"] == 0 for r in res.values()), res
