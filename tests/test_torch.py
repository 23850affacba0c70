"""fag_tvm.torch.npu_fusion_attention: torch_npu's interface, differentiable, traceable by torch.compile.

* gradcheck in float64 through the float64 oracle (target "reference-f64") on small shapes: plain, GQA,
  TND, pse BNSS with dpse, a sparse mode, dropout with a fixed seed;
* gradients on llvm against torch's SDPA where SDPA can express the call (causal, GQA, float masks) at
  SPEC A10 tolerances;
* torch.compile(fullgraph=True) of a module using the op: forward and backward, zero graph breaks;
* meta tensors, the 7-tuple, dropout bits reproduced exactly by the backward, the autograd.Function path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fag_tvm
from fag_tvm import masks
from fag_tvm.testing import a10_problems

ft = pytest.importorskip("fag_tvm.torch")


def _t(shape, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _cm():
    return torch.from_numpy(masks.compressed_causal_mask())


# ------------------------------------------------------------------------------------------------
# gradcheck through the float64 oracle


@pytest.mark.parametrize("case", ["plain", "gqa", "tnd", "pse_dpse", "causal", "dropout", "band_mode4"])
def test_gradcheck_float64(case):
    kw = dict(scale=0.4, target="reference-f64")
    if case == "tnd":
        q, k, v = _t((7, 2, 4), seed=1), _t((9, 1, 4), seed=2), _t((9, 1, 3), seed=3)
        kw.update(actual_seq_qlen=[3, 7], actual_seq_kvlen=[4, 9], atten_mask=_cm(), sparse_mode=3)
        args, layout, n = (q, k, v), "TND", 2
    else:
        n2 = 1 if case == "gqa" else 2
        q, k, v = _t((1, 2, 5, 4), seed=1), _t((1, n2, 6, 4), seed=2), _t((1, n2, 6, 4), seed=3)
        args, layout, n = (q, k, v), "BNSD", 2
        if case == "pse_dpse":
            kw["pse"] = _t((1, 2, 5, 6), seed=4, scale=0.3)
        elif case == "causal":
            kw.update(atten_mask=_cm(), sparse_mode=3)
        elif case == "band_mode4":
            kw.update(atten_mask=_cm(), sparse_mode=4, pre_tockens=2, next_tockens=1)
        elif case == "dropout":
            kw.update(keep_prob=0.7, seed=1234)  # a fixed seed: the same bits in every call gradcheck makes
    pse = kw.pop("pse", None)

    def f(*xs):
        return ft.npu_fusion_attention(*xs[:3], n, layout, pse=xs[3] if len(xs) > 3 else None, **kw)[0]

    inputs = args + ((pse,) if pse is not None else ())
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# llvm vs torch SDPA


def _sdpa_case(case, dtype=torch.float32):
    B, N, S, D = 2, 4, 40, 16
    q, k, v = _t((B, N, S, D), dtype, 1), _t((B, N, S, D), dtype, 2), _t((B, N, S, D), dtype, 3)
    kw, skw = dict(scale=D ** -0.5), dict(scale=D ** -0.5)
    ours_kv = (k, v)
    if case == "causal":
        kw.update(atten_mask=_cm(), sparse_mode=2)
        skw["is_causal"] = True
    elif case == "gqa":
        k2, v2 = _t((B, 2, S, D), dtype, 2), _t((B, 2, S, D), dtype, 3)
        ours_kv = (k2, v2)
        skw["enable_gqa"] = True
        k, v = k2, v2
    elif case == "float_mask":
        fm = (torch.randn(B, N, S, S, generator=torch.Generator().manual_seed(5)) * 0.5).to(dtype)
        kw.update(pse=fm, pse_type=0)  # S = scale*QK^T + pse: SDPA's additive float mask
        skw["attn_mask"] = fm
    return q, ours_kv, (k, v), kw, skw


@pytest.mark.parametrize("case", ["causal", "gqa", "float_mask"])
def test_gradients_match_sdpa_on_llvm(case):
    q, (k, v), (sk, sv), kw, skw = _sdpa_case(case)
    out = ft.npu_fusion_attention(q, k, v, q.shape[1], "BNSD", **kw)[0]
    g = torch.randn_like(out)
    out.backward(g)
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, sk, sv))
    skw2 = {x: (y.double() if isinstance(y, torch.Tensor) else y) for x, y in skw.items()}
    ref = F.scaled_dot_product_attention(q2, k2, v2, **skw2)
    ref.backward(g.double())
    for name, a, b in (("attention_out", out, ref), ("dq", q.grad, q2.grad), ("dk", k.grad, k2.grad),
                       ("dv", v.grad, v2.grad)):
        probs = a10_problems(name, a.detach().numpy(), b.detach().numpy(), "float32")
        assert not probs, (case, probs)
    if case == "float_mask":
        assert kw["pse"].grad is None  # pse given without requires_grad: no dpse


def test_dpse_when_pse_requires_grad():
    q, k, v = _t((1, 2, 12, 8), torch.float32, 1), _t((1, 2, 12, 8), torch.float32, 2), _t((1, 2, 12, 8), torch.float32, 3)
    pse = _t((1, 2, 12, 12), torch.float32, 4, 0.2)
    out = ft.npu_fusion_attention(q, k, v, 2, "BNSD", pse=pse, scale=0.3)[0]
    out.sum().backward()
    r = fag_tvm.reference.flash_attention_score_grad(
        q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), np.ones((1, 2, 12, 8), np.float32),
        head_num=2, input_layout="BNSD", pse_shift=pse.detach().numpy(), scale_value=0.3)
    assert not a10_problems("dpse", pse.grad.numpy(), r.dpse, "float32")


# ------------------------------------------------------------------------------------------------
# interface


def test_seven_outputs_and_torch_npu_spellings():
    q, k, v = (_t((1, 2, 8, 4), torch.float32, s) for s in range(3))
    res = ft.npu_fusion_attention(q, k, v, 2, "BNSD", None, None, None, 0.5, 1.0, 2147483647, 2147483647, 0,
                                  None, None, None, 0, True, False)
    out, smax, ssum, sout, seed, offset, numels = res
    assert out.shape == q.shape and smax.shape == (1, 2, 8, 8) and smax.dtype == torch.float32
    assert sout.numel() == 0 and (seed, offset, numels) == (0, 0, 0)
    assert out.grad_fn is not None and not smax.requires_grad
    for path in (True, False):  # the softmax statistics are non-differentiable on every dispatch path
        o, m, s = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.5, use_custom_op=path)[:3]
        assert o.grad_fn is not None and not m.requires_grad and not s.requires_grad, path
    r = ft.npu_fusion_attention(q, k, v, head_num=2, input_layout="BNSD", pre_tockens=3, next_tockens=0,
                                atten_mask=_cm(), sparse_mode=4, scale=0.5)
    assert r[0].shape == q.shape


def test_meta_tensors_give_shapes():
    q, k, v = (torch.empty((2, 16, 4 * 8), device="meta") for _ in range(3))
    out, smax, ssum, *_ = ft.npu_fusion_attention(q, k, v, 4, "BSH", scale=0.3)
    assert out.device.type == "meta" and out.shape == (2, 16, 32) and smax.shape == (2, 4, 16, 8)


def test_dropout_bits_reused_by_the_backward():
    """Same seed -> same bits; the backward uses the forward's bits (checked against the reference run on the
    mask the op drew)."""
    q, k, v = (_t((1, 2, 16, 8), torch.float32, s) for s in range(3))
    r1 = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3, keep_prob=0.6, seed=77)
    r2 = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3, keep_prob=0.6, seed=77)
    assert torch.equal(r1[0], r2[0]) and r1[4] == 77 and r1[6] == 2 * 16 * 16
    r3 = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3, keep_prob=0.6)
    assert isinstance(r3[4], int) and r3[4] >= 0
    r1[0].sum().backward()
    mask, _ = torch.ops.fag_tvm.drop_mask(r1[6], 0.6, 77, 0)
    ref = fag_tvm.reference.flash_attention_score_grad(
        q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), np.ones((1, 2, 16, 8), np.float32),
        head_num=2, input_layout="BNSD", scale_value=0.3, keep_prob=0.6, drop_mask=mask.numpy())
    assert not a10_problems("dq", q.grad.numpy(), ref.dq, "float32")


@pytest.mark.parametrize("path", [True, False])
def test_every_dispatch_path_gives_the_same_result(path):
    """The default eager path (implementation called directly) == the custom op (use_custom_op=True) == the
    autograd.Function (False), forward and gradients, bit for bit (same kernels)."""
    q, k, v = (_t((1, 2, 10, 8), torch.float32, s) for s in range(3))
    a = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3, atten_mask=_cm(), sparse_mode=2)[0]
    a.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    b = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3, atten_mask=_cm(), sparse_mode=2,
                                use_custom_op=path)[0]
    b.sum().backward()
    assert torch.equal(a, b) and all(torch.equal(x.grad, g) for x, g in zip((q, k, v), grads))


def test_repeated_calls_never_reuse_a_plan_of_another_signature():
    """The prepared-call cache (api.run_prepared) is keyed by every scalar, the arrays' shapes and dtypes and
    the mask buffer: alternating calls that differ in one of them each match the float64 reference."""
    q, k, v = (_t((1, 2, 12, 8), torch.float32, s) for s in range(3))
    q2 = _t((1, 2, 9, 8), torch.float32, 5)
    mask = torch.from_numpy(masks.compressed_causal_mask())
    calls = [dict(scale=0.3), dict(scale=0.5), dict(scale=0.3, atten_mask=mask, sparse_mode=2),
             dict(scale=0.3, atten_mask=mask, sparse_mode=3), dict(scale=0.3, pre_tockens=2, next_tockens=0,
                                                                   atten_mask=mask, sparse_mode=4)]
    for _ in range(2):
        for x in (q, q2):
            for c in calls:
                out = ft.npu_fusion_attention(x, k, v, 2, "BNSD", **c)[0]
                kw = dict(scale_value=c["scale"], sparse_mode=c.get("sparse_mode", 0),
                          atten_mask=None if "atten_mask" not in c else mask.numpy(),
                          pre_tokens=c.get("pre_tockens", 2147483647), next_tokens=c.get("next_tockens", 2147483647))
                ref = fag_tvm.reference.flash_attention_score(x.detach().numpy(), k.detach().numpy(),
                                                              v.detach().numpy(), head_num=2, input_layout="BNSD", **kw)
                assert not a10_problems("attention_out", out.detach().numpy(), ref.attention_out, "float32"), c


def test_direct_path_only_for_plain_eager_cpu_tensors():
    """Fake/meta tensors, subclasses and dispatch modes must reach the dispatcher (fake impls, tracing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.zeros(2)
    assert ft._direct(q, None)
    assert not ft._direct(q, torch.empty(2, device="meta"))
    assert ft._direct(torch.nn.Parameter(q))  # a learned pse is a Parameter: no dispatch behaviour of its own
    with FakeTensorMode() as mode:
        assert not ft._direct(q)
        fq, fk, fv = (mode.from_tensor(torch.zeros(1, 2, 8, 4)) for _ in range(3))
        out = ft.npu_fusion_attention(fq, fk, fv, 2, "BNSD", scale=0.5)[0]
    assert tuple(out.shape) == (1, 2, 8, 4)


def test_custom_op_passes_opcheck():
    q, k, v = (_t((1, 2, 8, 4), torch.float32, s) for s in range(3))
    args = (q, k, v, None, None, None, 2, "BNSD", 0.5, 1.0, 2147483647, 2147483647, 0, None, None, None, 0, 1,
            None, None, "")
    torch.library.opcheck(torch.ops.fag_tvm.fusion_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("form", ["BNSS", "BN1S", "slopes", "alibi_compressed"])
def test_grad_op_fake_matches_real_for_every_pse_form(form):
    """The backward op's fake implementation returns dpse exactly when the kernels do (external pse forms):
    torch.compile builds its graph from the fake, so a wrong dpse shape would break compiled training."""
    s, ptype, mode, mask = 8, 1, 0, None
    if form == "alibi_compressed":
        s, mode, mask = 1088, 2, torch.from_numpy(masks.compressed_causal_mask())  # Sq > 1024 rows of the form
    q, k, v = (_t((1, 1, s, 4), torch.float32, i) for i in range(3))
    pse = {"BNSS": lambda: _t((1, 1, s, s), torch.float32, 7), "BN1S": lambda: _t((1, 1, 1, s), torch.float32, 7),
           "slopes": lambda: torch.tensor([0.25]),
           "alibi_compressed": lambda: _t((1, 1, 1024, s), torch.float32, 7)}[form]()
    if form == "slopes":
        ptype = 2
    scal = (1, "BNSD", 0.5, 1.0, 2147483647, 2147483647, 0, None, None, None, mode, ptype, None, None, "")
    out, smax, ssum = torch.ops.fag_tvm.fusion_attention(q, k, v, pse, mask, None, *scal)
    dy = _t(tuple(out.shape), torch.float32, 9)
    args = (dy, q, k, v, out, smax, ssum, pse, mask, None, *scal)
    dpse = torch.ops.fag_tvm.fusion_attention_grad(*args)[3]
    assert (dpse.numel() > 0) == (form in ("BNSS", "BN1S"))
    torch.library.opcheck(torch.ops.fag_tvm.fusion_attention_grad.default, args, test_utils=("test_faketensor",))


# ------------------------------------------------------------------------------------------------
# torch.compile


class _Block(torch.nn.Module):
    def __init__(self, d=16, n=2):
        super().__init__()
        self.n = n
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.o = torch.nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = ft.npu_fusion_attention(q.contiguous(), k.contiguous(), v.contiguous(), self.n, "BSH",
                                    atten_mask=_cm(), sparse_mode=2, scale=(d // self.n) ** -0.5)[0]
        return self.o(a)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _Block()
    x = torch.randn(2, 12, 16)
    eager = m(x)
    eager.sum().backward()
    ge = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    from torch._dynamo.utils import counters

    counters.clear()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = cm(x)
    y.sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.allclose(y, eager, atol=1e-6)
    for p, g in zip(m.parameters(), ge):
        assert torch.allclose(p.grad, g, atol=1e-5)


@pytest.mark.parametrize("kw,param", [
    (dict(scale="a"), "scale"), (dict(scale=None), "scale"), (dict(keep_prob="0.5"), "keep_prob"),
    (dict(pre_tockens=1.5), "pre_tockens"), (dict(next_tockens="3"), "next_tockens"),
    (dict(sparse_mode=2.0), "sparse_mode"), (dict(prefix=[1.5, 2.0]), "prefix"),
    (dict(prefix=torch.tensor([1.0])), "prefix"), (dict(prefix=[[1], [2, 3]]), "prefix"),
    (dict(q_start_idx=["x"]), "q_start_idx"), (dict(keep_prob=0.5, seed="x"), "seed"),
    (dict(head_num=True), "head_num"), (dict(input_layout=None), "input_layout"), (dict(target=3), "target"),
])
def test_op_arguments_are_typed_exactly(kw, param):
    """No silent truncation (int(1.5) == 1) and no raw TypeError/ValueError from argument conversion."""
    q, k, v = (_t((1, 2, 8, 4), torch.float32, s) for s in range(3))
    args = dict(head_num=2, input_layout="BNSD", scale=0.5)
    args.update(kw)
    with pytest.raises(fag_tvm.FagError) as e:
        ft.npu_fusion_attention(q, k, v, args.pop("head_num"), args.pop("input_layout"), **args)
    assert e.value.code == 161002 and param in str(e.value)


def test_dropout_of_a_malformed_call_is_a_fag_error():
    """The dropout mask is drawn before the kernels validate the call: its size computation checks too."""
    q, k, v = (_t((1, 2, 8, 4), torch.float32, s) for s in range(3))
    for call in (lambda: ft.npu_fusion_attention(q[0], k[0], v[0], 2, "TND", keep_prob=0.5),
                 lambda: ft.npu_fusion_attention(q[0], k[0], v[0], 2, "BNSD", keep_prob=0.5),
                 lambda: ft.npu_fusion_attention(q[0], k[0], v[0], 2, "TND", keep_prob=0.5, actual_seq_qlen=[4, 2],
                                                 actual_seq_kvlen=[4, 8])):
        with pytest.raises(fag_tvm.FagError):
            call()


# ------------------------------------------------------------------------------------------------
# the native eager path (fag_tvm.torch_native: a C++ autograd op on the same kernels)

from fag_tvm import torch_native  # noqa: E402


def _native_case(case: str, seed: int):
    """(args, head_num, layout, kwargs) of one native-path case; `seed` varies the data, not the signature."""
    t = lambda shape, s, dtype=torch.float32, scale=1.0: _t(shape, dtype, seed * 10 + s, scale)  # noqa: E731
    kw = dict(scale=0.3)
    if case == "tnd":
        args = (t((11, 2, 8), 0), t((13, 1, 8), 1), t((13, 1, 8), 2))
        kw.update(actual_seq_qlen=[5, 11], actual_seq_kvlen=[6, 13], atten_mask=_cm(), sparse_mode=3)
        return args, 2, "TND", kw
    if case == "bsh_causal":
        return (t((2, 19, 32), 0), t((2, 23, 32), 1), t((2, 23, 32), 2)), 2, "BSH", \
            dict(kw, atten_mask=_cm(), sparse_mode=2)
    if case == "gqa_bsnd":
        return (t((1, 17, 4, 8), 0), t((1, 17, 2, 8), 1), t((1, 17, 2, 8), 2)), 4, "BSND", kw
    args = (t((1, 2, 21, 16), 0), t((1, 2, 27, 16), 1), t((1, 2, 27, 16), 2))
    if case == "pse_dpse":
        kw["pse"] = t((1, 2, 21, 27), 3, scale=0.3)
    elif case == "dropout":
        kw.update(keep_prob=0.8, seed=7)
    elif case == "bf16":
        args = tuple(x.detach().to(torch.bfloat16).requires_grad_() for x in args)
    elif case == "band_mode4":
        kw.update(atten_mask=_cm(), sparse_mode=4, pre_tockens=3, next_tockens=1)
    elif case == "fully_masked_row":  # a band plus a full mask hiding every key of row 4: the forward's row
        args = (t((1, 2, 70, 16), 0), t((1, 2, 200, 16), 1), t((1, 2, 200, 16), 2))  # check reruns without
        m = torch.zeros(1, 2, 70, 200, dtype=torch.bool)  # tile skipping, and the backward's stats scan turns
        m[:, :, 4, :] = True  # tile skipping off (several kv tiles: the band skips some)
        m[:, :, 10:, 20:] = True
        kw.update(atten_mask=m, pre_tockens=300, next_tockens=0)
    elif case == "strided_unaligned":  # a transposed view and an offset slice: copied to aligned memory
        q = t((1, 21, 2, 16), 0).detach().transpose(1, 2).requires_grad_()
        kbuf = t((1 * 2 * 27 * 16 + 1,), 1).detach()
        k = kbuf[1:].view(1, 2, 27, 16).requires_grad_()
        args = (q, k, args[2])
    return args, 2, "BNSD", kw


_NATIVE_CASES = ["plain", "tnd", "bsh_causal", "gqa_bsnd", "pse_dpse", "dropout", "bf16", "band_mode4",
                 "fully_masked_row", "strided_unaligned"]


def _run(case, seed, **extra):
    args, n, layout, kw = _native_case(case, seed)
    pse = kw.get("pse")
    r = ft.npu_fusion_attention(*args, n, layout, **kw, **extra)
    dy = torch.randn(r[0].shape, generator=torch.Generator().manual_seed(seed)).to(r[0].dtype)
    leaves = [*args, *([pse] if pse is not None else [])]
    grads = torch.autograd.grad(r[0], leaves, dy)
    return r, grads


def test_native_path_builds_where_a_compiler_exists():
    """CI has a C++ compiler: the native path must be usable there, not silently replaced by the Python one."""
    import shutil

    if shutil.which("g++") is None and "CXX" not in __import__("os").environ:
        pytest.skip("no C++ compiler on this machine: the Python path is used")
    ok, why = torch_native.status()
    assert ok, why


@pytest.mark.parametrize("case", _NATIVE_CASES)
def test_native_path_equals_python_path(case):
    """Forward outputs and every gradient of the native path == the Python autograd.Function path, bit for
    bit (same kernels, same launches), on the first call of a signature and on a repeated one with new data
    (the bound launch); the native path is the one taken by default."""
    if not torch_native.status()[0]:
        pytest.skip(torch_native.status()[1])
    for seed in (1, 2):
        r, g = _run(case, seed)
        assert "fag_tvm_native::FusionAttention" in r[0].grad_fn.name()
        r2, g2 = _run(case, seed, use_custom_op=False)
        assert r2[0].grad_fn.name() == "FusionAttentionBackward"
        assert all(torch.equal(a, b) for a, b in zip(r[:3], r2[:3])), case
        assert all(torch.equal(a, b) for a, b in zip(g, g2)), case
        assert r[4:] == r2[4:]  # seed, offset, numels


def test_native_path_matches_the_reference():
    """Independently of the Python path: native forward and gradients against the float64 reference."""
    if not torch_native.status()[0]:
        pytest.skip(torch_native.status()[1])
    for case in ("bsh_causal", "pse_dpse"):
        args, n, layout, kw = _native_case(case, 3)
        pse = kw.pop("pse", None)
        out = ft.npu_fusion_attention(*args, n, layout, pse=pse, **kw)[0]
        dy = torch.ones_like(out)
        grads = torch.autograd.grad(out, [*args, *([pse] if pse is not None else [])], dy)
        akw = dict(scale_value=kw["scale"], sparse_mode=kw.get("sparse_mode", 0),
                   atten_mask=None if "atten_mask" not in kw else kw["atten_mask"].numpy())
        npa = [x.detach().numpy() for x in args]
        ref = fag_tvm.reference.flash_attention_score_grad(
            *npa, dy.numpy(), head_num=n, input_layout=layout,
            pse_shift=None if pse is None else pse.detach().numpy(), **akw)
        for name, got, want in zip(("dq", "dk", "dv", "dpse"), grads, ref):
            assert not a10_problems(name, got.numpy(), want, "float32"), (case, name)


def test_native_no_grad_and_non_contiguous_dy():
    """Under no_grad the native op records nothing; a non-contiguous upstream gradient is copied."""
    if not torch_native.status()[0]:
        pytest.skip(torch_native.status()[1])
    q, k, v = (_t((1, 2, 9, 8), torch.float32, s) for s in range(3))
    with torch.no_grad():
        out = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3)[0]
    assert out.grad_fn is None and not out.requires_grad
    out = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3)[0]
    dy = torch.randn(1, 2, 8, 9).transpose(2, 3)
    g = torch.autograd.grad(out, (q, k, v), dy)
    out2 = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3, use_custom_op=False)[0]
    g2 = torch.autograd.grad(out2, (q, k, v), dy.contiguous())
    assert all(torch.equal(a, b) for a, b in zip(g, g2))


def test_native_library_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    """The cached extension follows the kernel cache's rules: a truncated or modified library is rebuilt,
    never loaded (checked here with a stand-in compile command: no 30 s C++ build in the test)."""
    import sys

    monkeypatch.setenv("FAG_TVM_CACHE", str(tmp_path))
    builds = []

    def fake_command(out):
        builds.append(out)
        return [sys.executable, "-c", f"open({out!r}, 'wb').write(b'x' * 1000)"]

    monkeypatch.setattr(torch_native, "_compile_command", fake_command)
    monkeypatch.setattr(torch_native, "_build_hash", lambda cmd: "0123456789abcdef")
    monkeypatch.setitem(torch_native._STATE, "loaded", None)  # probe() as in a fresh process
    assert torch_native.probe().startswith("not built yet")
    lib = torch_native._library()
    assert lib.stat().st_size == 1000 and len(builds) == 3  # probe's and the build's hash commands, one build
    assert torch_native.probe().startswith("built")
    assert torch_native._library() == lib and len(builds) == 5  # verified: not rebuilt
    lib.write_bytes(b"x" * 999)
    assert "damaged" in torch_native.probe()  # info reports it, nothing is loaded
    with pytest.warns(UserWarning, match="rebuilding"):
        torch_native._library()
    assert lib.stat().st_size == 1000 and len(builds) == 8


def test_without_the_native_path_the_python_path_runs(tmp_path, monkeypatch):
    """FAG_TVM_NATIVE=0, or an extension that fails to build: status() says why (a warning for a failed
    build), and the op still computes through its Python path (same results as the reference)."""
    import sys

    q, k, v = (_t((1, 2, 9, 8), torch.float32, s) for s in range(3))
    ref = fag_tvm.reference.flash_attention_score(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                                                  head_num=2, input_layout="BNSD", scale_value=0.45)
    monkeypatch.setattr(torch_native, "_BOUND", {})
    for env, why in (("0", "FAG_TVM_NATIVE=0"), ("1", "failed")):
        monkeypatch.setitem(torch_native._STATE, "loaded", None)
        monkeypatch.setenv("FAG_TVM_NATIVE", env)
        monkeypatch.setenv("FAG_TVM_CACHE", str(tmp_path / env))
        monkeypatch.setattr(torch_native, "_compile_command",
                            lambda out: [sys.executable, "-c", "raise SystemExit('no compiler here')"])
        monkeypatch.setattr(torch_native, "_build_hash", lambda cmd: "0123456789abcdef")
        if env == "1":
            with pytest.warns(UserWarning, match="native path is unavailable"):
                ok, reason = torch_native.status()
        else:
            ok, reason = torch_native.status()
        assert not ok and why in reason
        out = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.45)[0]
        assert out.grad_fn.name() == "FusionAttentionBackward"
        assert not a10_problems("attention_out", out.detach().numpy(), ref.attention_out, "float32")


def test_native_path_from_several_threads():
    """4 threads training through the op at once (3 signatures, first calls racing to bind them): every
    forward and gradient equals the one computed alone."""
    import threading

    if not torch_native.status()[0]:
        pytest.skip(torch_native.status()[1])
    cases = [("plain", 11), ("bsh_causal", 12), ("gqa_bsnd", 13)]
    torch_native._BOUND.clear()  # the threads race to bind (register) the signatures

    def one(case, seed):
        r, g = _run(case, seed)
        return [x.detach().clone() for x in (*r[:3], *g)]

    results, errors = {}, []

    def work(t):
        try:
            for i in range(6):
                case, seed = cases[(t + i) % len(cases)]
                results[(t, i)] = (case, seed, one(case, seed))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not errors, errors
    alone = {(c, s): one(c, s) for c, s in cases}
    assert len(results) == 24
    for case, seed, got in results.values():
        assert all(torch.equal(a, b) for a, b in zip(got, alone[(case, seed)])), case


def test_native_path_a_new_mask_tensor_every_step_registers_nothing_new():
    """A training loop that builds its compressed causal mask every step (a new buffer each time, so a new
    call signature) reuses the launches bound for the first one: the extension's slots are not used up."""
    if not torch_native.status()[0]:
        pytest.skip(torch_native.status()[1])
    q, k, v = (_t((1, 2, 40, 16), torch.float32, s) for s in range(3))
    outs, alive = [], []
    for step in range(6):
        mask = torch.from_numpy(masks.compressed_causal_mask().copy())  # a fresh buffer every step
        alive.append(mask)  # kept alive: every step's buffer has its own address
        out = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.25, atten_mask=mask, sparse_mode=2)[0]
        if step == 0:
            slots = torch.ops.fag_tvm_native.capacity()
        outs.append(out.detach())
        out.sum().backward()
    assert len({m.data_ptr() for m in alive}) == 6 and torch.ops.fag_tvm_native.capacity() == slots
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_inference_calls_bind_no_backward():
    """Without gradients the op takes the direct implementation: no native binding, so no backward kernel is
    compiled or memory-checked for an inference-only call."""
    if not torch_native.status()[0]:
        pytest.skip(torch_native.status()[1])
    q, k, v = (_t((1, 2, 23, 8), torch.float32, s).detach() for s in range(3))
    before = len(torch_native._BOUND)
    out = ft.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.35)[0]
    with torch.no_grad():
        ft.npu_fusion_attention(q.requires_grad_(), k, v, 2, "BNSD", scale=0.35)
    assert out.grad_fn is None and len(torch_native._BOUND) == before
