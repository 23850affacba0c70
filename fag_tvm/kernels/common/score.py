"""The score of one cell (SPEC §2 steps 1–3): scale and pse per pse_type, saturated to the fp32 range
(finite inputs never overflow to inf; kernels/common/finite), then masking to -FLT_MAX."""
from __future__ import annotations

from .finite import sat
from .mask import cell_masked
from .pse import pse_value
from .tir import T, neg_flt_max


def score_expr(c, raw, gi, gj, check_band: bool):
    """Scaled (+pse, saturated, masked -> -FLT_MAX) score of cell (gi, gj) from the raw QK^T value `raw`."""
    pv = pse_value(c, gi, gj)
    if pv is None:
        s = raw * c.scale
    elif c.spec.pse_add_first:
        s = (raw + pv) * c.scale
    else:
        s = raw * c.scale + pv
    s = sat(s)
    m = cell_masked(c, gi, gj, check_band)
    if m is not None:
        s = T.Select(m, neg_flt_max(), s)
    return s
