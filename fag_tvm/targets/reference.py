"""target="reference": float64 NumPy forward/backward with CANN semantics, the oracle every kernel is
checked against (public facade: fag_tvm.reference).

Deliberately simple: per sequence, per chunk of heads, dense Sq_b×Skv_b float64 matrices, exactly the
formulas of SPEC §2/§3 (pse per pse_type, -FLT_MAX masking, invalid rows, dropout on P and dP, GQA
sums). Dense matrices exist only here (the flash property is a property of compiled kernels).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..config import ALIBI_ROWS, FLT_MAX, OpConfig
from ..dropout import unpack_bits
from ..masks import dense_masked
from .base import Target

_CHUNK_BYTES = 256 << 20
EXP_ARG_MAX = 88.3762626647949  # the kernels' exp clamps its argument here (fexp)
RR_MAX = 1.4189  # and bound 1/softmax_sum (kernels/common/softmax.RR_MAX)  # per dense float64 matrix family, bounds memory for long sequences


# ----------------------------------------------------------------------------------------- layouts

def heads_of(x: np.ndarray, cfg: OpConfig, b: int, kv: bool) -> np.ndarray:
    """View of sequence b of a q-like (kv=False) or k-like tensor as [N, S_b, D] (any layout)."""
    bi = cfg.batches[b]
    S = bi.skv if kv else bi.sq
    L = cfg.layout
    if L == "BNSD":
        return x[b]
    if L == "BSND":
        return x[b].transpose(1, 0, 2)
    if L == "TND":
        r0 = bi.kv_row0 if kv else bi.q_row0
        return x[r0:r0 + S].transpose(1, 0, 2)
    xb = x[b] if L == "BSH" else x[:, b]
    H = xb.shape[-1]
    n = (cfg.N2 if kv else cfg.N1)
    return xb.reshape(S, n, H // n).transpose(1, 0, 2)


def stats_row0(cfg: OpConfig, b: int) -> int:
    """First softmax-stat row of sequence b: row(b,n,i) = row0 + n*Sq_b + i (SPEC §7)."""
    bi = cfg.batches[b]
    return (bi.q_row0 if cfg.tnd else b * cfg.Sq) * cfg.N1


def drop_bit0(cfg: OpConfig, b: int) -> int:
    """First dropout bit of sequence b: e = bit0 + (n*Sq_b + i)*Skv_b + j (SPEC §6)."""
    return cfg.N1 * sum(x.sq * x.skv for x in cfg.batches[:b])


# --------------------------------------------------------------------------------------------- pse

def pse_dense(cfg: OpConfig, pse: np.ndarray | None, b: int, heads: slice) -> np.ndarray | None:
    """float64 pse for sequence b and the query heads `heads`: [n, Sq_b or 1, Skv_b] (SPEC §4)."""
    if cfg.pse_form == "none":
        return None
    bi = cfg.batches[b]
    sq, skv = bi.sq, bi.skv
    f = cfg.pse_form
    if f == "BNSS":
        return pse[b, heads].astype(np.float64)
    if f == "1NSS":
        return pse[0, heads].astype(np.float64)
    if f == "BN1S":
        return pse[b, heads].astype(np.float64)  # [n, 1, Skv] broadcasts over rows
    if f == "TND_BNSS":
        base = cfg.N1 * sum(x.sq * x.skv for x in cfg.batches[:b])
        return pse.reshape(-1)[base:base + cfg.N1 * sq * skv].reshape(cfg.N1, sq, skv)[heads].astype(np.float64)
    if f == "TND_BN1S":
        base = cfg.N1 * bi.kv_row0
        return pse.reshape(-1)[base:base + cfg.N1 * skv].reshape(cfg.N1, 1, skv)[heads].astype(np.float64)
    i = np.arange(sq, dtype=np.int64)[:, None]
    j = np.arange(skv, dtype=np.int64)[None, :]
    if f in ("BNHS", "1NHS"):
        comp = pse[b if f == "BNHS" else 0, heads].astype(np.float64)  # [n, 1024, W]
        W = comp.shape[-1]
        m, c = alibi_compressed_index(cfg, i, j, W)
        return comp[:, m, c]
    # slopes (pse_type 2: linear, 3: sqrt)
    slopes = pse.astype(np.float64)
    s = slopes[heads] if f == "slopes_N" else slopes[b, heads]
    dist = np.abs((j - i).astype(np.float64) + float(cfg.kv_start - cfg.q_start))  # no int64 wrap-around
    if cfg.pse_type == 3:
        dist = np.sqrt(dist)
    return -s[:, None, None] * dist[None]


def alibi_compressed_index(cfg: OpConfig, i: np.ndarray, j: np.ndarray, W: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) read in the 1024-row alibi-compressed pse for local (i, j), clamped in range.

    Non-TND: CANN's exact rule (`PseAlibiComputeOffset`). TND: a cell with the same i-j offset from the
    bottom-right (the rule is exact for the Toeplitz pse it is meant for; SPEC §4)."""
    H = ALIBI_ROWS
    if not cfg.tnd:
        Sq, Skv = cfg.Sq, cfg.Skv
        low = i >= Sq - H
        m = np.where(low, i - (Sq - H), i % H)
        c = np.where(low, j, j + (Skv - H) + (i % H) - i)
    else:
        t = i - j
        m = np.where(t >= 0, H - 1, H - 1 + t)
        c = np.where(t >= 0, W - 1 - t, W - 1)
    m = np.broadcast_to(np.clip(m, 0, H - 1), np.broadcast_shapes(i.shape, j.shape))
    c = np.broadcast_to(np.clip(c, 0, W - 1), m.shape)
    return m, c


# ------------------------------------------------------------------ non-finite inputs, saturation

def _nonfinite(x: np.ndarray) -> bool:
    x = np.asarray(x)
    return bool(x.size) and not bool(np.all(np.isfinite(x.astype(np.float64, copy=False))))


def pse_block(cfg: OpConfig, pse: np.ndarray | None, b: int, n: int) -> np.ndarray | None:
    """The pse block query head n of sequence b reads (its [Sq_b, Skv_b] rows, the broadcast row of BN1S
    forms, the whole [1024, W] compressed block, or its slope): the pse part of a task's inputs."""
    if pse is None or cfg.pse_form == "none":
        return None
    f, bi = cfg.pse_form, cfg.batches[b]
    flat = pse.reshape(-1)
    if f in ("BNSS", "BN1S", "BNHS"):
        return pse[b, n]
    if f in ("1NSS", "1NHS"):
        return pse[0, n]
    if f == "TND_BNSS":
        base = cfg.N1 * sum(x.sq * x.skv for x in cfg.batches[:b]) + n * bi.sq * bi.skv
        return flat[base:base + bi.sq * bi.skv]
    if f == "TND_BN1S":
        base = cfg.N1 * bi.kv_row0 + n * bi.skv
        return flat[base:base + bi.skv]
    return pse[n] if f == "slopes_N" else pse[b, n]


def poisoned_tasks(cfg: OpConfig, a: dict[str, Any], backward: bool) -> set[tuple[int, int]]:
    """Tasks whose inputs hold a NaN or ±Inf (SPEC decision "non-finite inputs"): every output element of
    such a task is NaN, on every target.

    backward: task (b, n2) reads, for its query heads n = n2·G .. n2·G+G-1 in sequence b, the rows of q, dy
    and attention_in, lane 0 of softmax_max / softmax_sum of those rows, the rows of k and v of KV head
    n2, and the pse block of each head; it owns dq of those rows, dk/dv of those KV rows and dpse of
    those pse blocks. forward: task (b, n) reads the q rows of head n, the k/v rows of KV head n//G and
    the pse block of head n; it owns the o rows and the stats of head n."""
    out = set()
    pse = a.get("pse_shift")
    for b, bi in enumerate(cfg.batches):
        q = heads_of(a["query"], cfg, b, False)
        k = heads_of(a["key"], cfg, b, True)
        v = heads_of(a["value"], cfg, b, True)
        kv_bad = [_nonfinite(k[n2]) or _nonfinite(v[n2]) for n2 in range(cfg.N2)]
        if backward:
            dy = heads_of(a["dy"], cfg, b, False)
            o = heads_of(a["attention_in"], cfg, b, False)
            r0 = stats_row0(cfg, b)
            m = a["softmax_max"].reshape(-1, 8)[:, 0]
            s_ = a["softmax_sum"].reshape(-1, 8)[:, 0]
        for n in range(cfg.N1):
            bad = kv_bad[n // cfg.G] or _nonfinite(q[n])
            blk = pse_block(cfg, pse, b, n)
            bad = bad or (blk is not None and _nonfinite(blk))
            if backward:
                rows = slice(r0 + n * bi.sq, r0 + (n + 1) * bi.sq)
                bad = bad or _nonfinite(dy[n]) or _nonfinite(o[n]) or _nonfinite(m[rows]) or _nonfinite(s_[rows])
            if bad:
                out.add((b, n // cfg.G) if backward else (b, n))
    return out


def _clip(x: np.ndarray, dtype) -> np.ndarray:
    """Saturate to the finite range of `dtype` (NaN kept): finite inputs never give inf (SPEC A10)."""
    dt = np.dtype(dtype)
    hi = float(np.finfo(np.float64).max) if dt == np.float64 else float(np.finfo(np.float32).max) if \
        dt == np.float32 else 65504.0 if dt == np.float16 else 3.3895313892515355e38
    return np.clip(x, -hi, hi)


# ------------------------------------------------------------------------------------------- core

def _scores(cfg: OpConfig, q: np.ndarray, k: np.ndarray, pse: np.ndarray | None,
            masked: np.ndarray) -> np.ndarray:
    """S = scale·(QKᵀ+pse) (pse_type 1) or scale·QKᵀ + pse, masked cells = -FLT_MAX."""
    A = q @ k.transpose(0, 2, 1)
    if pse is None:
        S = cfg.scale * A
    elif cfg.pse_type == 1:
        S = cfg.scale * (A + pse)
    else:
        S = cfg.scale * A + pse
    return np.where(masked, -FLT_MAX, np.clip(S, -FLT_MAX, FLT_MAX))


def _head_chunks(cfg: OpConfig, b: int):
    bi = cfg.batches[b]
    per_head = max(1, bi.sq * bi.skv * 8 * 6)
    step = max(cfg.G, (_CHUNK_BYTES // per_head) // cfg.G * cfg.G)
    for n0 in range(0, cfg.N1, step):
        yield slice(n0, min(cfg.N1, n0 + step))


def _kv_for(x: np.ndarray, cfg: OpConfig, heads: slice) -> np.ndarray:
    """K/V heads used by query heads `heads` (query head n uses KV head n // G)."""
    return x[np.arange(heads.start, heads.stop) // cfg.G]


def _keep(cfg: OpConfig, drop_mask, b: int, heads: slice) -> np.ndarray | None:
    if not cfg.dropout:
        return None
    bi = cfg.batches[b]
    n = heads.stop - heads.start
    bits = unpack_bits(drop_mask, drop_bit0(cfg, b) + heads.start * bi.sq * bi.skv, n * bi.sq * bi.skv)
    return bits.reshape(n, bi.sq, bi.skv)


def forward_arrays(cfg: OpConfig, a: dict[str, Any]) -> dict[str, np.ndarray]:
    """Forward on validated NumPy inputs; returns attention_out (input dtype) and fp32 stats [...,8].
    Non-finite inputs give NaN in their tasks' outputs (poisoned_tasks); NumPy's warnings about the
    arithmetic on them are silenced, the results are overwritten."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _forward(cfg, a)


def _forward(cfg: OpConfig, a: dict[str, Any]) -> dict[str, np.ndarray]:
    dt = a["query"].dtype
    out = np.zeros(_dy_shape(cfg, a), dtype=np.float64)
    rows = (cfg.T if cfg.tnd else cfg.B * cfg.Sq) * cfg.N1
    smax = np.empty(rows, dtype=np.float64)
    ssum = np.empty(rows, dtype=np.float64)
    for b, bi in enumerate(cfg.batches):
        if bi.sq == 0:
            continue
        q = heads_of(a["query"], cfg, b, False).astype(np.float64, order="C")
        k = heads_of(a["key"], cfg, b, True).astype(np.float64, order="C")
        v = heads_of(a["value"], cfg, b, True).astype(np.float64, order="C")
        o_b = heads_of(out, cfg, b, False)
        r0 = stats_row0(cfg, b)
        for h in _head_chunks(cfg, b):
            n = h.stop - h.start
            rs = slice(r0 + h.start * bi.sq, r0 + h.stop * bi.sq)
            if bi.skv == 0:  # no key at all: an invalid row by construction
                o_b[h] = 0.0
                smax[rs], ssum[rs] = -FLT_MAX, FLT_MAX
                continue
            masked = dense_masked(cfg, b, a.get("atten_mask"))
            masked = masked[h] if masked.shape[0] > 1 else masked
            S = _scores(cfg, q[h], _kv_for(k, cfg, h), pse_dense(cfg, a.get("pse_shift"), b, h), masked)
            m = S.max(axis=-1, keepdims=True)
            e = np.exp(S - m)
            l = e.sum(axis=-1, keepdims=True)
            P = e / l
            if cfg.invalid_rows:
                bad = m == -FLT_MAX
                P = np.where(bad, 0.0, P)
                l = np.where(bad, FLT_MAX, l)
            keep = _keep(cfg, a.get("drop_mask"), b, h)
            if keep is not None:
                P = P * keep / cfg.keep_prob
            o_b[h] = P @ _kv_for(v, cfg, h)
            smax[rs] = m.reshape(n * bi.sq)
            ssum[rs] = l.reshape(n * bi.sq)
    for b, n in poisoned_tasks(cfg, a, backward=False):
        bi = cfg.batches[b]
        heads_of(out, cfg, b, False)[n] = np.nan
        rs = slice(stats_row0(cfg, b) + n * bi.sq, stats_row0(cfg, b) + (n + 1) * bi.sq)
        smax[rs] = ssum[rs] = np.nan
    stat_shape = (cfg.T, cfg.N1, 8) if cfg.tnd else (cfg.B, cfg.N1, cfg.Sq, 8)
    st_dt = np.float64 if cfg.dtype == "float64" else np.float32  # float64 only for the oracle's own precision
    return {
        "attention_out": _clip(out, dt).astype(dt),
        "softmax_max": np.repeat(smax.astype(st_dt)[:, None], 8, axis=1).reshape(stat_shape),
        "softmax_sum": np.repeat(ssum.astype(st_dt)[:, None], 8, axis=1).reshape(stat_shape),
        "attention_out_f64": out,
        "softmax_max_f64": np.repeat(smax[:, None], 8, axis=1).reshape(stat_shape),
        "softmax_sum_f64": np.repeat(ssum[:, None], 8, axis=1).reshape(stat_shape),
    }


def _dy_shape(cfg: OpConfig, a: dict[str, Any]) -> tuple[int, ...]:
    q = a["query"].shape
    if cfg.layout in ("BSH", "SBH"):
        return (*q[:2], cfg.N1 * cfg.Dv)
    return (*q[:-1], cfg.Dv)


def backward_arrays(cfg: OpConfig, a: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """Backward on validated NumPy inputs with supplied stats; dq/dk/dv in input dtype, dpse or None.
    Non-finite inputs give NaN in their tasks' outputs (poisoned_tasks)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _backward(cfg, a)


def _backward(cfg: OpConfig, a: dict[str, Any]) -> dict[str, np.ndarray | None]:
    dt = a["query"].dtype
    dq = np.zeros(a["query"].shape, dtype=np.float64)
    dk = np.zeros(a["key"].shape, dtype=np.float64)
    dv = np.zeros(a["value"].shape, dtype=np.float64)
    pse = a.get("pse_shift")
    dpse = np.zeros(pse.shape, dtype=np.float64) if cfg.dpse_computed else None
    smax_all = a["softmax_max"].reshape(-1, 8)[:, 0].astype(np.float64)
    ssum_all = a["softmax_sum"].reshape(-1, 8)[:, 0].astype(np.float64)
    for b, bi in enumerate(cfg.batches):
        if bi.sq == 0 or bi.skv == 0:
            continue
        q = heads_of(a["query"], cfg, b, False).astype(np.float64, order="C")
        k = heads_of(a["key"], cfg, b, True).astype(np.float64, order="C")
        v = heads_of(a["value"], cfg, b, True).astype(np.float64, order="C")
        dy = heads_of(a["dy"], cfg, b, False).astype(np.float64, order="C")
        o = heads_of(a["attention_in"], cfg, b, False).astype(np.float64, order="C")
        dq_b, dk_b, dv_b = heads_of(dq, cfg, b, False), heads_of(dk, cfg, b, True), heads_of(dv, cfg, b, True)
        r0 = stats_row0(cfg, b)
        masked_all = dense_masked(cfg, b, a.get("atten_mask"))
        for h in _head_chunks(cfg, b):
            n = h.stop - h.start
            rs = slice(r0 + h.start * bi.sq, r0 + h.stop * bi.sq)
            m = smax_all[rs].reshape(n, bi.sq, 1)
            l = ssum_all[rs].reshape(n, bi.sq, 1)
            masked = masked_all[h] if masked_all.shape[0] > 1 else masked_all
            kk, vv = _kv_for(k, cfg, h), _kv_for(v, cfg, h)
            S = _scores(cfg, q[h], kk, pse_dense(cfg, pse, b, h), masked)
            # exp's argument and 1/sum bounded as in the kernels (kernels/common/softmax): with stats that do
            # not belong to these scores P stays finite instead of overflowing (never for forward-made stats)
            P = np.exp(np.minimum(S - m, EXP_ARG_MAX)) * np.minimum(1.0 / l, RR_MAX)
            P = np.where((m == -FLT_MAX) & (l == FLT_MAX), 0.0, P)  # invalid rows contribute exactly 0 (A5)
            dP = dy[h] @ vv.transpose(0, 2, 1)
            keep = _keep(cfg, a.get("drop_mask"), b, h)
            if keep is not None:
                Pd = P * keep / cfg.keep_prob
                dP = dP * keep / cfg.keep_prob
            else:
                Pd = P
            Di = np.sum(dy[h] * o[h], axis=-1, keepdims=True)
            dS = P * (dP - Di)
            dq_b[h] = cfg.scale * (dS @ kk)
            dK = cfg.scale * (dS.transpose(0, 2, 1) @ q[h])
            dV = Pd.transpose(0, 2, 1) @ dy[h]
            for t in range(n):  # GQA: KV head sums over its group, in head order
                kvh = (h.start + t) // cfg.G
                dk_b[kvh] += dK[t]
                dv_b[kvh] += dV[t]
            if dpse is not None:
                _accumulate_dpse(cfg, dpse, b, h, dS * (cfg.scale if cfg.pse_type == 1 else 1.0))
    for b, n2 in poisoned_tasks(cfg, a, backward=True):
        heads_of(dk, cfg, b, True)[n2] = np.nan
        heads_of(dv, cfg, b, True)[n2] = np.nan
        for n in range(n2 * cfg.G, (n2 + 1) * cfg.G):
            heads_of(dq, cfg, b, False)[n] = np.nan
            if dpse is not None:
                pse_block(cfg, dpse, b, n)[...] = np.nan
    return {
        "dq": _clip(dq, dt).astype(dt), "dk": _clip(dk, dt).astype(dt), "dv": _clip(dv, dt).astype(dt),
        "dpse": None if dpse is None else _clip(dpse, pse.dtype).astype(pse.dtype),
        "dq_f64": dq, "dk_f64": dk, "dv_f64": dv, "dpse_f64": dpse,
    }


def _accumulate_dpse(cfg: OpConfig, dpse: np.ndarray, b: int, h: slice, g: np.ndarray) -> None:
    """dpse = dL/dpse reduced over the broadcast axes of the pse form (SPEC A6)."""
    bi = cfg.batches[b]
    f = cfg.pse_form
    if f == "BNSS":
        dpse[b, h] += g
    elif f == "1NSS":
        dpse[0, h] += g
    elif f == "BN1S":
        dpse[b, h, 0] += g.sum(axis=1)
    elif f == "TND_BNSS":
        base = cfg.N1 * sum(x.sq * x.skv for x in cfg.batches[:b])
        dpse.reshape(-1)[base:base + cfg.N1 * bi.sq * bi.skv].reshape(cfg.N1, bi.sq, bi.skv)[h] += g
    elif f == "TND_BN1S":
        base = cfg.N1 * bi.kv_row0
        dpse.reshape(-1)[base:base + cfg.N1 * bi.skv].reshape(cfg.N1, bi.skv)[h] += g.sum(axis=1)


class ReferenceTarget(Target):
    """The float64 oracle behind the same API (like PyTorch's math backend): no kernels, no knobs."""

    name = "reference"
    description = "float64 NumPy implementation of the SPEC (the oracle of every test)"
    compiled = False

    def availability(self) -> tuple[bool, str]:
        return True, "NumPy float64, always available"

    def forward_arrays(self, cfg: OpConfig, a: dict[str, Any], kernels=None) -> dict[str, np.ndarray]:
        return forward_arrays(cfg, a)

    def backward_arrays(self, cfg: OpConfig, a: dict[str, Any], kernels=None) -> dict[str, np.ndarray | None]:
        return backward_arrays(cfg, a)


class ReferenceF64Target(ReferenceTarget):
    """The same oracle at its own precision: float64 inputs, stats and outputs (validation accepts float64
    only for this target), so torch.autograd.gradcheck can run through the operator's exact semantics."""

    name = "reference-f64"
    description = "the float64 oracle taking and returning float64 arrays (for gradcheck)"


TARGET = ReferenceTarget()
TARGET_F64 = ReferenceF64Target()
