"""PyTorch integration: torch_npu's `npu_fusion_attention` on fag_tvm's kernels, differentiable and
traceable by torch.compile.

    out, smax, ssum, softmax_out, seed, offset, numels = fag_tvm.torch.npu_fusion_attention(
        q, k, v, head_num, "BNSD", atten_mask=mask, scale=0.125, keep_prob=0.9, sparse_mode=2)
    out.sum().backward()          # q.grad, k.grad, v.grad (and pse.grad for an external pse)

* Same argument names, defaults and 7-tuple return as torch_npu (including its spellings `pre_tockens`,
  `next_tockens`); the V2 extensions `pse_type`, `q_start_idx`, `kv_start_idx` are keyword arguments.
* Implemented as torch.library custom ops (`fag_tvm::fusion_attention`, `fag_tvm::fusion_attention_grad`,
  `fag_tvm::drop_mask`) with fake (meta) implementations and a registered autograd formula, so
  `torch.compile(fullgraph=True)` traces it without graph breaks; the backward forwards every option
  (masks, tokens, prefix, sparse mode, pse with dpse when pse requires grad, layout, TND lengths) to
  `fag_tvm.flash_attention_score_grad`. In eager mode plain CPU tensors that need gradients take the
  native path (fag_tvm.torch_native: a C++ autograd op on the same kernels) where it is available;
  `FusionAttention` is the plain `torch.autograd.Function` path (older torch, no compiler,
  `use_custom_op=False`).
* Dropout: the forward draws the bit mask from (seed, offset) — seed from torch's default generator
  unless given — and the backward reuses exactly those bits (the mask tensor is saved, never re-drawn);
  the same seed gives the same mask. seed comes back as an int (a 0-d tensor while torch.compile traces),
  offset is 0, numels the number of mask bits.
* Tensors cross zero-copy both ways (DLPack-compatible CPU tensors in, torch tensors out); the target
  follows the tensors' device: CPU -> "llvm" (override with target=...), CUDA -> "cuda"."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import api, torch_launch, torch_native
from .arrays import numpy_to_torch
from .config import INT32_MAX
from .core.buffers import poisoning
from .errors import invalid

__all__ = ["npu_fusion_attention", "FusionAttention"]


# ------------------------------------------------------------------------------------------------
# tensors <-> arrays (zero copy)


def _t(a: Optional[np.ndarray]) -> Tensor:
    return torch.empty(0) if a is None else numpy_to_torch(a)


def _target(t: Tensor, target: str) -> str:
    if target:
        return target
    return "cuda" if t.device.type == "cuda" else "llvm"


def _list(x: Any, param: str) -> Optional[list[int]]:
    """A host integer array argument as a list of ints (exact: floats, bools and strings are FagErrors)."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise invalid(param, f"must be an integer tensor, got {x.dtype}")
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return [int(x)]
    try:
        a = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - ragged lists and other unconvertible objects
        raise invalid(param, f"cannot be converted to an integer array: {exc}") from None
    if a.dtype.kind not in "iu":
        raise invalid(param, f"must be integers, got {x!r}")
    return [int(v) for v in a.reshape(-1)]


def _int(x: Any, param: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise invalid(param, f"must be an integer, got {x!r}")
    return int(x)


def _float(x: Any, param: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise invalid(param, f"must be a number, got {x!r}")
    return float(x)


def _str(x: Any, param: str) -> str:
    if not isinstance(x, str):
        raise invalid(param, f"must be a string, got {x!r}")
    return x


def _opt(x: Optional[list[int]]) -> Optional[np.ndarray]:
    return None if x is None else np.asarray(x, dtype=np.int64)


def _kwargs(head_num, input_layout, scale, keep_prob, pre_tokens, next_tokens, inner_precise, prefix,
            actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type, q_start_idx, kv_start_idx, target) -> dict:
    return dict(head_num=head_num, input_layout=input_layout, scale_value=scale, keep_prob=keep_prob,
                pre_tokens=pre_tokens, next_tokens=next_tokens, inner_precise=inner_precise, prefix=_opt(prefix),
                actual_seq_qlen=_opt(actual_seq_qlen), actual_seq_kvlen=_opt(actual_seq_kvlen),
                sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=_opt(q_start_idx),
                kv_start_idx=_opt(kv_start_idx), target=target)


# ------------------------------------------------------------------------------------------------
# shapes (for the fake implementations: no data)


def _out_shape(query: Tensor, key: Tensor, value: Tensor, head_num: int, layout: str) -> list[int]:
    if layout in ("BSH", "SBH"):
        d = query.shape[-1] // head_num
        n2 = key.shape[-1] // d
        dv = value.shape[-1] // n2
        return [query.shape[0], query.shape[1], head_num * dv]
    return [*query.shape[:-1], value.shape[-1]]


def _stats_shape(query: Tensor, head_num: int, layout: str) -> list[int]:
    if layout == "TND":
        return [query.shape[0], head_num, 8]
    b, s = {"BSH": (0, 1), "SBH": (1, 0), "BSND": (0, 1), "BNSD": (0, 2)}.get(layout, (0, 1))
    return [query.shape[b], head_num, query.shape[s], 8]


# ------------------------------------------------------------------------------------------------
# custom ops


def _draw_drop_mask(numels: int, keep_prob: float, seed: int, offset: int) -> tuple[Tensor, Tensor]:
    """(packed uint8 keep-bits of `numels` elements, the seed used); seed < 0 draws one from torch's default
    generator. The same (seed, offset) always gives the same bits."""
    if seed < 0:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    keep = np.random.default_rng([seed, offset]).random(numels) < keep_prob
    return torch.from_numpy(np.packbits(keep, bitorder="little")), torch.tensor(seed, dtype=torch.int64)


_drop_mask = torch.library.custom_op("fag_tvm::drop_mask", mutates_args=())(_draw_drop_mask)


@_drop_mask.register_fake
def _drop_mask_fake(numels, keep_prob, seed, offset):
    return torch.empty((numels + 7) // 8, dtype=torch.uint8), torch.empty((), dtype=torch.int64)


def _scalar_key(scalars: tuple) -> tuple:
    """The op's scalar arguments as a hashable key (list arguments as tuples)."""
    return tuple([tuple(s) if isinstance(s, list) else s for s in scalars])


def _fwd_impl(query: Tensor, key: Tensor, value: Tensor, pse: Optional[Tensor], atten_mask: Optional[Tensor],
         drop_mask: Optional[Tensor], head_num: int, input_layout: str, scale: float, keep_prob: float,
         pre_tokens: int, next_tokens: int, inner_precise: int, prefix: Optional[list[int]],
         actual_seq_qlen: Optional[list[int]], actual_seq_kvlen: Optional[list[int]], sparse_mode: int,
         pse_type: int, q_start_idx: Optional[list[int]], kv_start_idx: Optional[list[int]],
         target: str) -> tuple[Tensor, Tensor, Tensor]:
    scalars = (head_num, input_layout, scale, keep_prob, pre_tokens, next_tokens, inner_precise, prefix,
               actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type, q_start_idx, kv_start_idx,
               _target(query, target))
    tensors = dict(query=query, key=key, value=value, pse_shift=pse, atten_mask=atten_mask, drop_mask=drop_mask)
    f = torch_launch.call("fwd", tensors, _scalar_key(scalars), lambda: _kwargs(*scalars))
    if f is None:  # an empty call: the full path
        a = torch_launch.numpy_arrays(tensors)
        r = api.flash_attention_score(a.pop("query"), a.pop("key"), a.pop("value"), **a, **_kwargs(*scalars))
        f = [_t(r.attention_out), _t(r.softmax_max), _t(r.softmax_sum)]
    return f[0], f[1], f[2]


_fwd = torch.library.custom_op("fag_tvm::fusion_attention", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _fwd_fake(query, key, value, pse, atten_mask, drop_mask, head_num, input_layout, *args):
    st = _stats_shape(query, head_num, input_layout)
    return (query.new_empty(_out_shape(query, key, value, head_num, input_layout)),
            query.new_empty(st, dtype=torch.float32), query.new_empty(st, dtype=torch.float32))


def _bwd_impl(dy: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, softmax_max: Tensor,
         softmax_sum: Tensor, pse: Optional[Tensor], atten_mask: Optional[Tensor], drop_mask: Optional[Tensor],
         head_num: int, input_layout: str, scale: float, keep_prob: float, pre_tokens: int, next_tokens: int,
         inner_precise: int, prefix: Optional[list[int]], actual_seq_qlen: Optional[list[int]],
         actual_seq_kvlen: Optional[list[int]], sparse_mode: int, pse_type: int, q_start_idx: Optional[list[int]],
         kv_start_idx: Optional[list[int]], target: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    scalars = (head_num, input_layout, scale, keep_prob, pre_tokens, next_tokens, inner_precise, prefix,
               actual_seq_qlen, actual_seq_kvlen, sparse_mode, pse_type, q_start_idx, kv_start_idx,
               _target(query, target))
    tensors = dict(query=query, key=key, value=value, dy=dy, pse_shift=pse, atten_mask=atten_mask,
                   drop_mask=drop_mask, softmax_max=softmax_max, softmax_sum=softmax_sum, attention_in=out)
    g = torch_launch.call("bwd", tensors, _scalar_key(scalars), lambda: _kwargs(*scalars))
    if g is None:  # an empty call: the full path
        a = torch_launch.numpy_arrays(tensors)
        r = api.flash_attention_score_grad(a.pop("query"), a.pop("key"), a.pop("value"), a.pop("dy"), **a,
                                           **_kwargs(*scalars))
        g = [_t(r.dq), _t(r.dk), _t(r.dv), None if r.dpse is None else _t(r.dpse)]
    return g[0], g[1], g[2], g[3] if g[3] is not None else query.new_empty(0)


_bwd = torch.library.custom_op("fag_tvm::fusion_attention_grad", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _bwd_fake(dy, query, key, value, out, smax, ssum, pse, atten_mask, drop_mask, head_num, input_layout, scale,
              keep_prob, pre_tokens, next_tokens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
              sparse_mode, pse_type, *args):
    dpse = pse.new_empty(pse.shape) if _has_dpse(query, pse, head_num, input_layout, pse_type) else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dpse


def _has_dpse(query: Tensor, pse: Optional[Tensor], head_num: int, layout: str, pse_type: int) -> bool:
    """Whether the backward returns dpse (SPEC A6: external pse forms only; not slopes (pse_type 2/3) and not
    the alibi-compressed (..., 1024, Skv) form), from shapes alone -- config.py's pse-form rule."""
    if pse is None or pse_type in (2, 3):
        return False
    if layout == "TND":
        return pse.dim() == 1
    return pse.dim() == 4 and pse.shape[2] in (1, _stats_shape(query, head_num, layout)[2])


_SCALARS = ("head_num", "input_layout", "scale", "keep_prob", "pre_tokens", "next_tokens", "inner_precise", "prefix",
            "actual_seq_qlen", "actual_seq_kvlen", "sparse_mode", "pse_type", "q_start_idx", "kv_start_idx", "target")


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, pse, atten_mask, drop_mask = inputs[:6]
    out, smax, ssum = output
    ctx.save_for_backward(query, key, value, out, smax, ssum, pse, atten_mask, drop_mask)
    ctx.mark_non_differentiable(smax, ssum)  # softmax statistics: outputs, not differentiable (as torch_npu)
    ctx.scalars = inputs[6:]
    ctx.pse_grad = pse is not None and pse.requires_grad


def _grads(ctx, grad_out: Tensor) -> tuple:
    """(dq, dk, dv, dpse or None): the backward kernels with every forward option."""
    query, key, value, out, smax, ssum, pse, atten_mask, drop_mask = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    bwd = _bwd_impl if getattr(ctx, "direct", False) and _direct(grad_out) else _bwd
    dq, dk, dv, dpse = bwd(grad_out, query, key, value, out, smax, ssum, pse, atten_mask, drop_mask, *ctx.scalars)
    return dq, dk, dv, dpse if ctx.pse_grad and dpse.numel() else None


def _backward(ctx, grad_out, grad_smax, grad_ssum):
    return (*_grads(ctx, grad_out), None, None, *([None] * len(_SCALARS)))


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# the plain autograd.Function path (older torch, or code that wants no custom op)


def _dispatch_modes_active() -> bool:
    """Whether a torch dispatch mode (FakeTensorMode, functionalisation, a user's mode, ...) is active; True
    when this torch cannot tell, so that the op then goes through the dispatcher."""
    length = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return True if length is None else length() > 0


def _direct(*tensors: Optional[Tensor]) -> bool:
    """Whether the op's implementation may be called directly, skipping the dispatcher (whose Python
    custom-op path costs ~100-300 us a call, more than the kernels of a small call): plain CPU tensors in
    eager mode only. Anything traced or intercepted -- torch.compile, fake or meta tensors, tensor
    subclasses, an active dispatch mode -- goes through the custom op, which is what makes it traceable."""
    if torch.compiler.is_compiling() or _dispatch_modes_active():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.device.type != "cpu"):
            return False
    return True


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)  # tensor types with no dispatch behaviour of their own


class FusionAttention(torch.autograd.Function):
    """forward(query, key, value, pse, atten_mask, drop_mask, scalars) -> (out, softmax_max, softmax_sum), with
    `scalars` the tuple of the custom op's 15 scalar arguments (one argument: apply() costs per argument).
    The eager path (the implementation called directly when `_direct` allows it, else the custom ops), and
    the path for torch versions without torch.library.custom_op / compile."""

    @staticmethod
    def forward(ctx, query, key, value, pse, atten_mask, drop_mask, scalars):
        direct = _direct(query, key, value, pse, atten_mask, drop_mask)
        fwd = _fwd_impl if direct else _fwd
        out, smax, ssum = fwd(query, key, value, pse, atten_mask, drop_mask, *scalars)
        _setup_context(ctx, (query, key, value, pse, atten_mask, drop_mask, *scalars), (out, smax, ssum))
        ctx.direct = direct
        return out, smax, ssum

    @staticmethod
    def backward(ctx, grad_out, grad_smax, grad_ssum):
        return (*_grads(ctx, grad_out), None, None, None)


# ------------------------------------------------------------------------------------------------
# the public op


def _mask_bits(query: Tensor, key: Tensor, head_num: int, layout: str, seq_q: Optional[list[int]],
               seq_kv: Optional[list[int]]) -> int:
    """Number of dropout-mask bits of a call (drawn before validation, so shapes are checked here too)."""
    if layout == "TND":
        if seq_q is None or seq_kv is None or len(seq_q) != len(seq_kv):
            raise invalid("actual_seq_qlen", "TND needs actual_seq_qlen and actual_seq_kvlen of the same length")
        lq, lk = np.diff([0, *seq_q]), np.diff([0, *seq_kv])
        if (lq < 0).any() or (lk < 0).any():
            raise invalid("actual_seq_qlen", "cumulative sequence ends must not decrease")
        return int(head_num * np.sum(lq * lk))
    if query.dim() != (3 if layout in ("BSH", "SBH") else 4) or key.dim() != query.dim():
        raise invalid("query", f"rank {query.dim()} does not match input_layout {layout!r}")
    sq = _stats_shape(query, head_num, layout)
    skv = _stats_shape(key, 1, layout)[2]
    return int(sq[0] * head_num * sq[2] * skv)


def npu_fusion_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
                         pse: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                         atten_mask: Optional[Tensor] = None, scale: float = 1.0, keep_prob: float = 1.0,
                         pre_tockens: int = INT32_MAX, next_tockens: int = INT32_MAX, inner_precise: int = 0,
                         prefix: Optional[Sequence[int]] = None, actual_seq_qlen: Optional[Sequence[int]] = None,
                         actual_seq_kvlen: Optional[Sequence[int]] = None, sparse_mode: int = 0,
                         gen_mask_parallel: bool = True, sync: bool = False, *, pse_type: int = 1,
                         q_start_idx: Optional[Sequence[int]] = None, kv_start_idx: Optional[Sequence[int]] = None,
                         seed: Optional[int] = None, target: str = "", use_custom_op: Optional[bool] = None):
    """torch_npu.npu_fusion_attention on fag_tvm: returns (attention_out, softmax_max, softmax_sum,
    softmax_out, seed, offset, numels). Differentiable in query, key, value and pse (external forms).
    gen_mask_parallel and sync are accepted for compatibility (they only concern NPU streams).

    use_custom_op: None (default) uses the registered custom op under torch.compile; in eager mode, plain CPU
    tensors that need gradients take the native path (fag_tvm.torch_native: a C++ autograd op, the
    low-overhead training path) where it is available, else FusionAttention, which calls the implementation
    directly for plain CPU tensors and the custom op otherwise (meta/fake tensors, dispatch modes); without
    gradients the implementation is called directly; True always the custom op, False always
    FusionAttention."""
    if padding_mask is not None:
        raise invalid("padding_mask", "unsupported: reserved in CANN (not used by the operator); pass None")
    scalars = (_int(head_num, "head_num"), _str(input_layout, "input_layout"), _float(scale, "scale"),
               _float(keep_prob, "keep_prob"), _int(pre_tockens, "pre_tockens"), _int(next_tockens, "next_tockens"),
               _int(inner_precise, "inner_precise"), _list(prefix, "prefix"),
               _list(actual_seq_qlen, "actual_seq_qlen"), _list(actual_seq_kvlen, "actual_seq_kvlen"),
               _int(sparse_mode, "sparse_mode"), _int(pse_type, "pse_type"), _list(q_start_idx, "q_start_idx"),
               _list(kv_start_idx, "kv_start_idx"), _str(target, "target"))
    drop_mask, seed_out, numels = None, 0, 0
    if scalars[3] < 1.0:
        numels = _mask_bits(query, key, scalars[0], scalars[1], scalars[8], scalars[9])
        try:
            eager = use_custom_op is None and _direct(query, key)  # eager plain tensors: no dispatcher
            draw = _draw_drop_mask if eager else _drop_mask
            drop_mask, seed_t = draw(numels, scalars[3], -1 if seed is None else _int(seed, "seed"), 0)
        except MemoryError:
            raise invalid("keep_prob", f"the dropout mask ({numels} bits) does not fit in memory") from None
        seed_out = seed_t if torch.compiler.is_compiling() else int(seed_t)
    if use_custom_op or (use_custom_op is None and torch.compiler.is_compiling()):
        out, smax, ssum = _fwd(query, key, value, pse, atten_mask, drop_mask, *scalars)
    else:
        r = None
        direct = use_custom_op is None and _direct(query, key, value, pse, atten_mask, drop_mask)
        if direct and _needs_grad(query, key, value, pse):  # eager training, plain CPU tensors: the native
            # path where this call has one (it binds the backward too: inference takes _fwd_impl below)
            resolved = (*scalars[:-1], _target(query, scalars[-1]))
            r = torch_native.attention(query, key, value, pse, atten_mask, drop_mask, _scalar_key(resolved),
                                       lambda: _kwargs(*resolved), poisoning())
        if r is not None:
            out, smax, ssum = r
        elif direct and not _needs_grad(query, key, value, pse):
            out, smax, ssum = _fwd_impl(query, key, value, pse, atten_mask, drop_mask, *scalars)  # no graph
        else:
            out, smax, ssum = FusionAttention.apply(query, key, value, pse, atten_mask, drop_mask, scalars)
    return out, smax, ssum, query.new_empty(0), seed_out, 0, numels
