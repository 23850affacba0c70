"""Public entry points: validate → dispatch through the target registry → outputs in the caller's
array kind (SPEC A9). Compiled targets get their kernels from the JIT cache unless a caller (an AOT
package) supplies a kernel provider."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, NamedTuple

import numpy as np

from . import targets
from .arrays import output_converter, to_numpy
from .config import INT32_MAX, OpConfig, check_output_memory, validate
from .core.buffers import data_ptr
from .core.memo import BoundedMemo
from .errors import invalid


class GradResult(NamedTuple):
    """dq, dk, dv have the shapes/dtypes of q, k, v; dpse has pse's shape, or None (SPEC A6)."""

    dq: Any
    dk: Any
    dv: Any
    dpse: Any


class ForwardResult(NamedTuple):
    """softmax_max/sum: fp32 [B,N1,Sq,8] ([T,N1,8] for TND); softmax_out is CANN's reserved empty output."""

    softmax_max: Any
    softmax_sum: Any
    softmax_out: Any
    attention_out: Any


ARRAY_ARGS = ("pse_shift", "drop_mask", "padding_mask", "atten_mask", "softmax_max", "softmax_sum",
              "softmax_in", "attention_in")


def collect_arrays(query, key, value, dy, kw: dict[str, Any]) -> dict[str, Any]:
    """The call's array arguments as NumPy (None stays absent)."""
    arrays = {"query": to_numpy(query, "query"), "key": to_numpy(key, "key"), "value": to_numpy(value, "value")}
    if dy is not None:
        arrays["dy"] = to_numpy(dy, "dy")
    for name in ARRAY_ARGS:
        if name in kw:
            arrays[name] = to_numpy(kw[name], name)
    return arrays


# ------------------------------------------------------------------------------------------------
# call plans: a repeated call with the same static signature reuses its validated OpConfig


_PLANS = BoundedMemo(256)  # static call signature -> validated OpConfig


def _scalar_sig(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return type(v).__name__, v
    a = np.asarray(v)  # prefix / sequence lengths / start indices: their values shape the config
    return "array", a.dtype.str, a.shape, tuple(a.reshape(-1).tolist())


_BWD_NAMES = ("query", "key", "value", "dy", *ARRAY_ARGS)
_FWD_NAMES = ("query", "key", "value", "pse_shift", "drop_mask", "padding_mask", "atten_mask")


def _plan_key(direction: str, names: tuple[str, ...], a: dict[str, Any], scalars: dict[str, Any]) -> tuple | None:
    """The static signature of a call, or None where it cannot be hashed (unusual argument types)."""
    get = a.get
    arrays = tuple([None if x is None else (x.shape, x.dtype) for x in map(get, names)])
    mask = get("atten_mask")  # compressed masks are validated by content: a new buffer is validated again
    vals = tuple(scalars.values())
    key = (direction, arrays, None if mask is None else data_ptr(mask), vals, tuple(map(type, vals)))
    try:
        hash(key)
        return key
    except TypeError:  # prefix / sequence lengths / start indices given as lists or arrays: key their values
        pass
    try:
        key = (direction, arrays, key[2], tuple((k, _scalar_sig(v)) for k, v in scalars.items()))
        hash(key)
        return key
    except (TypeError, ValueError):
        return None


def validated(direction: str, a: dict[str, Any], scalars: dict[str, Any]) -> OpConfig:
    """The OpConfig of a call, from the plan cache when the same static signature (array shapes/dtypes, the
    compressed mask's buffer, every scalar and small integer array) was validated before; else validate()
    (everything validate() reads is in the key, so a cached plan is exactly what validation would give)."""
    names = _BWD_NAMES if direction == "bwd" else _FWD_NAMES
    key = _plan_key(direction, names, a, scalars)
    if key is not None:
        hit = _PLANS.get(key)
        if hit is not None:
            return hit[0]
    arrays = {n: a.get(n) for n in names[3 if direction == "fwd" else 4:]}
    cfg = validate(direction, a["query"], a["key"], a["value"], *([a.get("dy")] if direction == "bwd" else []),
                   **arrays, **scalars)
    if key is not None:
        # the entry holds the mask: while it is cached its buffer stays alive, so no other array can take its
        # address and hit this plan without being validated (a freed mask's address reused by a bad one did)
        _PLANS.put(key, (cfg, a.get("atten_mask")))
    return cfg


def _check_target(target: Any) -> None:
    """Unknown targets are FagError 161002 naming `target` (before any array is looked at)."""
    if isinstance(target, str) and target:
        targets.get(target)


def kernels_for(target: targets.Target, provider: targets.KernelProvider | None) -> targets.KernelProvider | None:
    """The kernel provider of a call: the caller's (AOT package), else the JIT cache (compiled targets)."""
    if provider is not None or not target.compiled:
        return provider
    from . import jit

    return jit.provider(target)


def run_forward(cfg: OpConfig, a: dict[str, Any], provider=None) -> dict[str, Any]:
    t = targets.get(cfg.target)
    return t.forward_arrays(cfg, a, kernels_for(t, provider))


def run_backward(cfg: OpConfig, a: dict[str, Any], provider=None) -> dict[str, Any]:
    t = targets.get(cfg.target)
    return t.backward_arrays(cfg, a, kernels_for(t, provider))


def _out_of_memory(exc: MemoryError) -> Exception:
    """A MemoryError while computing (working buffers beyond what the output check counts) → 161002."""
    return invalid("query", f"not enough memory for this call ({exc or 'MemoryError'}); use smaller inputs")


_MEMORY_OK = BoundedMemo(1024)  # (config, directions) whose outputs were found to fit


def _check_memory(cfg: OpConfig, forward: bool, backward: bool) -> None:
    """check_output_memory, once per (config, directions): it depends on nothing else."""
    key = (cfg, forward, backward)
    if key not in _MEMORY_OK:
        check_output_memory(cfg, forward=forward, backward=backward)
        _MEMORY_OK.put(key, True)


class Prepared(NamedTuple):
    """A repeated signature's resolved call: its validated config, the target's NumPy driver (`run(a)` ->
    the target's raw outputs) and, where the target binds one (Target.prepare), its launch on flat buffers
    of any DLPack kind (the torch op's path), else None."""

    cfg: OpConfig
    run: Callable[[dict[str, np.ndarray]], dict[str, Any]]
    launch: Any


_PREPARED = BoundedMemo(256)  # (direction, scalars, array shapes/dtypes, mask buffer) -> Prepared


def prepared(direction: str, a: dict[str, np.ndarray], scalar_key: tuple,
             scalars: Callable[[], dict[str, Any]]) -> Prepared | None:
    """The Prepared call of arrays `a` (NumPy, absent ones left out) whose scalars the caller summarises as
    the hashable `scalar_key` (`scalars()` gives them as keywords of this module's functions). For bindings
    (the torch op) that call one signature many times: a repeated (scalar_key, array shapes and dtypes,
    compressed mask buffer) skips argument collection, validation, the memory check and kernel resolution --
    everything validation reads is in the key. A backward must come with its stats. None where the full
    path is needed (an empty call, no stats)."""
    mask = a.get("atten_mask")
    key = (direction, scalar_key, tuple([(n, x.shape, x.dtype) for n, x in a.items()]),
           None if mask is None else data_ptr(mask))
    p = _PREPARED.get(key)
    if p is None:
        sc = scalars()
        _check_target(sc.get("target", "llvm"))
        if direction == "bwd" and ("softmax_max" not in a or "softmax_sum" not in a or "attention_in" not in a):
            return None
        cfg = validated(direction, a, sc)
        if cfg.empty:
            return None
        _check_memory(cfg, direction == "fwd", direction == "bwd")
        t = targets.get(cfg.target)
        kernels = kernels_for(t, None)
        arrays = t.forward_arrays if direction == "fwd" else t.backward_arrays
        p = _PREPARED.put(key, Prepared(cfg, lambda a, f=arrays, c=cfg, k=kernels: f(c, a, k),
                                        t.prepare(cfg, direction, a, kernels)))
    return p


def guard_memory(run: Callable[..., Any], *args: Any) -> Any:
    """run(*args), a MemoryError while computing (working buffers beyond what the output check counts) as
    FagError 161002."""
    try:
        return run(*args)
    except MemoryError as exc:
        raise _out_of_memory(exc) from None


def run_prepared(direction: str, a: dict[str, np.ndarray], scalar_key: tuple,
                 scalars: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """The target's raw outputs (NumPy) of a `prepared` call, or None where the full path is needed."""
    p = prepared(direction, a, scalar_key, scalars)
    return None if p is None else guard_memory(p.run, a)


def flash_attention_score_grad(
    query: Any, key: Any, value: Any, dy: Any, *, head_num: int, input_layout: str,
    pse_shift: Any = None, drop_mask: Any = None, padding_mask: Any = None, atten_mask: Any = None,
    softmax_max: Any = None, softmax_sum: Any = None, softmax_in: Any = None, attention_in: Any = None,
    prefix: Any = None, actual_seq_qlen: Any = None, actual_seq_kvlen: Any = None, scale_value: float = 1.0,
    keep_prob: float = 1.0, pre_tokens: int = INT32_MAX, next_tokens: int = INT32_MAX, inner_precise: int = 0,
    sparse_mode: int = 0, pse_type: int = 1, q_start_idx: Any = None, kv_start_idx: Any = None,
    deterministic: bool = False, target: str = "llvm", _provider=None,
) -> GradResult:
    """Backward of flash attention with CANN aclnnFlashAttentionScoreGrad semantics (SPEC §3).

    If softmax_max, softmax_sum and attention_in are all None, they are computed with the forward (A4)."""
    _check_target(target)
    kw = dict(pse_shift=pse_shift, drop_mask=drop_mask, padding_mask=padding_mask, atten_mask=atten_mask,
              softmax_max=softmax_max, softmax_sum=softmax_sum, softmax_in=softmax_in, attention_in=attention_in)
    a = collect_arrays(query, key, value, dy, kw)
    scalars = dict(head_num=head_num, input_layout=input_layout, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
                   actual_seq_kvlen=actual_seq_kvlen, scale_value=scale_value, keep_prob=keep_prob,
                   pre_tokens=pre_tokens, next_tokens=next_tokens, inner_precise=inner_precise,
                   sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=q_start_idx, kv_start_idx=kv_start_idx,
                   deterministic=deterministic, target=target)
    cfg = validated("bwd", a, scalars)
    conv = output_converter(query)
    if cfg.empty:
        pse = a.get("pse_shift")
        dpse = np.zeros(pse.shape, pse.dtype) if cfg.dpse_computed else None
        return GradResult(conv(np.empty_like(a["query"])), conv(np.empty_like(a["key"])),
                          conv(np.empty_like(a["value"])), conv(dpse))
    _check_memory(cfg, not cfg.stats_given, True)
    try:
        if not cfg.stats_given:
            f = run_forward(validated("fwd", a, scalars), a, _provider)
            a = dict(a, softmax_max=f["softmax_max"], softmax_sum=f["softmax_sum"], attention_in=f["attention_out"])
        g = run_backward(cfg, a, _provider)
    except MemoryError as exc:
        raise _out_of_memory(exc) from None
    return GradResult(conv(g["dq"]), conv(g["dk"]), conv(g["dv"]), conv(g["dpse"]))


def flash_attention_score(
    query: Any, key: Any, value: Any, *, head_num: int, input_layout: str, pse_shift: Any = None,
    drop_mask: Any = None, padding_mask: Any = None, atten_mask: Any = None, prefix: Any = None,
    actual_seq_qlen: Any = None, actual_seq_kvlen: Any = None, scale_value: float = 1.0, keep_prob: float = 1.0,
    pre_tokens: int = INT32_MAX, next_tokens: int = INT32_MAX, inner_precise: int = 0, sparse_mode: int = 0,
    pse_type: int = 1, q_start_idx: Any = None, kv_start_idx: Any = None, deterministic: bool = False,
    target: str = "llvm", _provider=None,
) -> ForwardResult:
    """Forward of flash attention (CANN aclnnFlashAttentionScore): stats + output, invalid-row handling (§8)."""
    _check_target(target)
    kw = dict(pse_shift=pse_shift, drop_mask=drop_mask, padding_mask=padding_mask, atten_mask=atten_mask)
    a = collect_arrays(query, key, value, None, kw)
    cfg = validated("fwd", a, dict(
        head_num=head_num, input_layout=input_layout, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen, scale_value=scale_value, keep_prob=keep_prob, pre_tokens=pre_tokens,
        next_tokens=next_tokens, inner_precise=inner_precise, sparse_mode=sparse_mode, pse_type=pse_type,
        q_start_idx=q_start_idx, kv_start_idx=kv_start_idx, deterministic=deterministic, target=target))
    conv = output_converter(query)
    empty_out = np.empty((0,), dtype=a["query"].dtype)
    _check_memory(cfg, True, False)
    try:
        # An all-empty call (no kernel can run) still has well-defined stats: usually empty, but with D == 0
        # and rows present they are those of all-zero scores, which the float64 reference computes exactly.
        f = run_forward(replace(cfg, target="reference") if cfg.empty else cfg, a, _provider)
    except MemoryError as exc:
        raise _out_of_memory(exc) from None
    return ForwardResult(conv(f["softmax_max"]), conv(f["softmax_sum"]), conv(empty_out), conv(f["attention_out"]))


def config_for(*args: Any, **kwargs: Any) -> OpConfig:
    """The validated OpConfig of a backward call (for tools: kernel keys, workspace sizes)."""
    return validate(*args, **kwargs)
