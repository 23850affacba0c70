"""The float64 oracle with the public signatures (`fag_tvm.reference.flash_attention_score{,_grad}`), and
`exact` (float64 end to end). The math lives in fag_tvm.targets.reference (target="reference")."""
from __future__ import annotations

from typing import Any

import numpy as np

from .api import ARRAY_ARGS, collect_arrays, flash_attention_score as _api_fwd
from .api import flash_attention_score_grad as _api_bwd
from .config import check_output_memory, validate
from .targets.reference import backward_arrays, forward_arrays


def flash_attention_score(query: Any, key: Any, value: Any, **kwargs: Any):
    """float64 reference forward (same signature as fag_tvm.flash_attention_score)."""
    kwargs["target"] = "reference"
    return _api_fwd(query, key, value, **kwargs)


def flash_attention_score_grad(query: Any, key: Any, value: Any, dy: Any, **kwargs: Any):
    """float64 reference backward (same signature as fag_tvm.flash_attention_score_grad)."""
    kwargs["target"] = "reference"
    return _api_bwd(query, key, value, dy, **kwargs)


def exact(query: Any, key: Any, value: Any, dy: Any, **kwargs: Any) -> dict[str, np.ndarray | None]:
    """Forward + backward entirely in float64 (stats and O kept in float64, outputs not rounded).

    For cross-checks against other float64 implementations (e.g. torch autograd): keys
    attention_out, softmax_max, softmax_sum, dq, dk, dv, dpse, all float64 arrays (dpse may be None)."""
    kw = {k: kwargs.pop(k) for k in list(kwargs) if k in ARRAY_ARGS}
    kwargs["target"] = "reference"
    a = collect_arrays(query, key, value, dy, kw)
    arrays = {k: a.get(k) for k in ARRAY_ARGS if k not in ("softmax_max", "softmax_sum", "attention_in")}
    fcfg = validate("fwd", a["query"], a["key"], a["value"], **arrays, **kwargs)
    check_output_memory(fcfg, forward=True, backward=True)
    f = forward_arrays(fcfg, a)
    a = dict(a, softmax_max=f["softmax_max_f64"], softmax_sum=f["softmax_sum_f64"],
             attention_in=f["attention_out_f64"])
    bcfg = validate("bwd", a["query"], a["key"], a["value"], a["dy"], **arrays, softmax_max=f["softmax_max"],
                    softmax_sum=f["softmax_sum"], attention_in=f["attention_out"], **kwargs)
    g = backward_arrays(bcfg, a)
    return {"attention_out": f["attention_out_f64"], "softmax_max": f["softmax_max_f64"],
            "softmax_sum": f["softmax_sum_f64"], "dq": g["dq_f64"], "dk": g["dk_f64"], "dv": g["dv_f64"],
            "dpse": g["dpse_f64"]}
