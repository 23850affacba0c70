"""C-style two-phase mirror of CANN's aclnnFlashAttentionScoreGrad (status codes instead of exceptions).

Strict like CANN: attention_in, softmax_max, softmax_sum and the outputs are required (161001).
Outputs are written in place into the arrays passed as dqOut/dkOut/dvOut/dpseOut."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrays import to_numpy
from .config import INT32_MAX, OpConfig, check_output_memory, validate
from .errors import ACLNN_ERR_PARAM_INVALID, ACLNN_SUCCESS, FagError, invalid, nullptr


@dataclass
class Executor:
    """What GetWorkspaceSize prepared: the validated config, the inputs and the output arrays."""

    cfg: OpConfig
    arrays: dict[str, Any]
    outputs: dict[str, Any]
    workspace_size: int
    used: bool = False
    last_error: FagError | None = None


def _workspace_bytes(cfg: OpConfig) -> int:
    """Bytes of scratch the target's backward uses for this call (the target says: Target.workspace_bytes)."""
    if cfg.empty:
        return 0
    from . import targets

    return targets.get(cfg.target).workspace_bytes(cfg)


def aclnnFlashAttentionScoreGradGetWorkspaceSize(
    query: Any, keyIn: Any, value: Any, dy: Any, pseShiftOptional: Any, dropMaskOptional: Any,
    paddingMaskOptional: Any, attenMaskOptional: Any, softmaxMaxOptional: Any, softmaxSumOptional: Any,
    softmaxInOptional: Any, attentionInOptional: Any, prefixOptional: Any, scaleValueOptional: float,
    keepProbOptional: float, preTokensOptional: int, nextTokensOptional: int, headNum: int, inputLayout: str,
    innerPreciseOptional: int, sparseModeOptional: int, dqOut: Any, dkOut: Any, dvOut: Any, dpseOut: Any,
    target: str = "llvm",
) -> tuple[int, int, Executor | None]:
    """Phase 1: validate everything (CANN argument order) → (status, workspace_size, executor)."""
    try:
        arrays = {"query": to_numpy(query, "query"), "key": to_numpy(keyIn, "keyIn"),
                  "value": to_numpy(value, "value"), "dy": to_numpy(dy, "dy"),
                  "pse_shift": to_numpy(pseShiftOptional, "pseShiftOptional"),
                  "drop_mask": to_numpy(dropMaskOptional, "dropMaskOptional"),
                  "padding_mask": to_numpy(paddingMaskOptional, "paddingMaskOptional"),
                  "atten_mask": to_numpy(attenMaskOptional, "attenMaskOptional"),
                  "softmax_max": to_numpy(softmaxMaxOptional, "softmaxMaxOptional"),
                  "softmax_sum": to_numpy(softmaxSumOptional, "softmaxSumOptional"),
                  "softmax_in": to_numpy(softmaxInOptional, "softmaxInOptional"),
                  "attention_in": to_numpy(attentionInOptional, "attentionInOptional")}
        outs = {"dq": dqOut, "dk": dkOut, "dv": dvOut, "dpse": dpseOut}
        for name, param in (("dq", "dqOut"), ("dk", "dkOut"), ("dv", "dvOut")):
            if outs[name] is None:
                raise nullptr(param)
        cfg = validate(
            "bwd", arrays["query"], arrays["key"], arrays["value"], arrays["dy"],
            **{k: arrays[k] for k in ("pse_shift", "drop_mask", "padding_mask", "atten_mask", "softmax_max",
                                      "softmax_sum", "softmax_in", "attention_in")},
            prefix=prefixOptional, scale_value=scaleValueOptional, keep_prob=keepProbOptional,
            pre_tokens=INT32_MAX if preTokensOptional is None else preTokensOptional,
            next_tokens=INT32_MAX if nextTokensOptional is None else nextTokensOptional, head_num=headNum,
            input_layout=inputLayout, inner_precise=0 if innerPreciseOptional is None else innerPreciseOptional,
            sparse_mode=0 if sparseModeOptional is None else sparseModeOptional, target=target, strict=True)
        for name, src, param in (("dq", "query", "dqOut"), ("dk", "key", "dkOut"), ("dv", "value", "dvOut")):
            _check_output(outs[name], param, arrays[src], src)
        if dpseOut is not None and cfg.dpse_computed:
            _check_output(dpseOut, "dpseOut", arrays["pse_shift"], "pseShiftOptional")
        from . import targets

        targets.get(cfg.target)  # unknown target: 161002 naming it
        if not cfg.empty:
            check_output_memory(cfg, forward=False, backward=True)
        ex = Executor(cfg, arrays, outs, _workspace_bytes(cfg))
        return ACLNN_SUCCESS, ex.workspace_size, ex
    except FagError as e:
        return e.code, 0, None
    except MemoryError:
        return ACLNN_ERR_PARAM_INVALID, 0, None


def _check_output(dst: Any, param: str, like: np.ndarray, src: str) -> None:
    """An output must be a writable NumPy array (or CPU torch tensor) with the shape and dtype of `src`."""
    o = to_numpy(dst, param)
    if o.shape != like.shape or o.dtype != like.dtype:
        raise invalid(param, f"shape/dtype {o.shape}/{o.dtype} must equal {src}'s {like.shape}/{like.dtype}")
    if isinstance(dst, np.ndarray) and not dst.flags.writeable:
        raise invalid(param, "output array is read-only (flags.writeable is False)")


def aclnnFlashAttentionScoreGrad(workspace: Any, workspaceSize: Any, executor: Any, stream: Any = None) -> int:
    """Phase 2: run the prepared call; writes dqOut/dkOut/dvOut (and dpseOut when computed).

    Returns a status code for every bad argument (never raises), like the C API."""
    if not isinstance(executor, Executor):
        return ACLNN_ERR_PARAM_INVALID  # None, or not an executor made by phase 1
    if executor.used:
        executor.last_error = invalid("executor", "an executor runs once (CANN semantics)")
        return ACLNN_ERR_PARAM_INVALID
    if isinstance(workspaceSize, (bool, np.bool_)) or not isinstance(workspaceSize, (int, np.integer)):
        executor.last_error = invalid("workspaceSize", f"must be an integer, got {workspaceSize!r}")
        return ACLNN_ERR_PARAM_INVALID
    if workspaceSize < 0:
        executor.last_error = invalid("workspaceSize", f"must be >= 0, got {workspaceSize}")
        return ACLNN_ERR_PARAM_INVALID
    if workspaceSize < executor.workspace_size:
        executor.last_error = invalid("workspaceSize", f"{workspaceSize} < required {executor.workspace_size}")
        return ACLNN_ERR_PARAM_INVALID
    cfg = executor.cfg
    try:
        for name, param in (("dq", "dqOut"), ("dk", "dkOut"), ("dv", "dvOut"), ("dpse", "dpseOut")):
            dst = executor.outputs[name]
            if isinstance(dst, np.ndarray) and not dst.flags.writeable:  # made read-only after phase 1
                raise invalid(param, "output array is read-only (flags.writeable is False)")
        executor.used = True
        if cfg.empty:
            return ACLNN_SUCCESS
        from .api import run_backward

        try:
            g = run_backward(cfg, executor.arrays)
        except MemoryError as e:
            raise invalid("query", f"not enough memory for this call ({e or 'MemoryError'})") from None
        for name, param in (("dq", "dqOut"), ("dk", "dkOut"), ("dv", "dvOut"), ("dpse", "dpseOut")):
            dst = executor.outputs[name]
            if dst is None or g[name] is None:
                continue
            _write_into(dst, g[name], param)
    except FagError as e:
        executor.last_error = e
        return e.code
    return ACLNN_SUCCESS


def _write_into(dst: Any, src: np.ndarray, param: str) -> None:
    try:
        if isinstance(dst, np.ndarray):
            dst[...] = src
            return
        import torch

        from .arrays import output_converter

        with torch.no_grad():
            dst.copy_(output_converter(dst)(src))
    except (ValueError, TypeError, RuntimeError) as e:
        raise invalid(param, f"cannot write the result into this output: {e}") from None
