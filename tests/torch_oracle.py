"""An independent float64 torch formulation of the operator contract (SPEC.md), written from the SPEC text.

Nothing here imports fag_tvm: layouts, sequence batches, the dense mask of every sparse mode, the pse forms
(external BNSS/1NSS/BN1S, TND packed 1-D, alibi-compressed 1024-row, slopes pse_type 2/3), the dropout
keep-matrix from the packed bits and the invalid-row rules are rebuilt here from SPEC §1–§9, and the gradients
come from torch autograd on

    S = scale·(QKᵀ + pse)            (pse_type 1)
    S = scale·QKᵀ + pse              (pse_type 0, 2, 3)
    S[masked] = -FLT_MAX;  P = softmax(S);  P' = P∘M/keep;  O = P'·V;  L = Σ O∘dy

with GQA by `repeat_interleave` of the KV heads. dpse is the gradient with respect to the pse tensor *as
given* (autograd sums the broadcast axes and scatters the TND packed forms by itself).

Two deliberate knobs describe where CANN and "plain autograd" differ (SPEC §3 step 10, §8):

* `masked_cells_carry_grad=False` (default): masked cells are constants, the textbook autograd result.
  `True`: masked cells keep the value -FLT_MAX but let the gradient through (straight-through), which is
  CANN's backward formula dS = P∘(dP'−D) evaluated on every cell. The two agree unless a row is fully
  masked and invalid-row handling is off (then P is uniform on masked cells and CANN's dq/dk/dpse differ).
* invalid-row mode (SPEC A5/§8) is decided from `inner_precise` and CANN's automatic enabling rules; rows
  that are fully masked then give P = 0, O = 0, max = -FLT_MAX, sum = +FLT_MAX. `invalid_rows=` forces it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

FLT_MAX = float(np.finfo(np.float32).max)
INT32_MAX = 2147483647
ALIBI_ROWS = 1024


def as_f64(x: Any) -> np.ndarray:
    """float64 copy of a NumPy (incl. ml_dtypes bfloat16) array or a torch tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy().copy()
    return np.array(x, dtype=np.float64)


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _first(x: Any) -> int:
    if x is None:
        return 0
    return int(np.asarray(x).reshape(-1)[0])


# ------------------------------------------------------------------------------------------ planning

@dataclass
class Batch:
    sq: int
    skv: int
    q0: int  # first row of this sequence in TND q/dy/O (0 for padded layouts)
    kv0: int


@dataclass
class Plan:
    """Everything the SPEC derives from the call arguments (no tensors)."""

    layout: str
    B: int
    N1: int
    N2: int
    D: int
    Dv: int
    Sq: int
    Skv: int
    batches: list[Batch]
    mode: int
    has_mask: bool
    pre: int
    nxt: int
    prefix: list[int] | None
    band_batch: int | None  # modes 7/8: the batch that uses the band rule
    invalid_mode: bool
    masks: list[torch.Tensor] = field(default_factory=list)  # per batch bool [N1 or 1, sq, skv]

    @property
    def G(self) -> int:
        return self.N1 // self.N2

    @property
    def fully_masked_rows(self) -> int:
        """Rows (b, n, i) with no visible key (rows of a batch with Skv_b = 0 excluded)."""
        tot = 0
        for bi, m in zip(self.batches, self.masks):
            if bi.sq == 0 or bi.skv == 0:
                continue
            rows = m.all(dim=-1)
            tot += int(rows.sum()) * (self.N1 if m.shape[0] == 1 else 1)
        return tot

    @property
    def coincide(self) -> bool:
        """True when CANN's backward equals plain autograd (no fully masked row outside invalid mode)."""
        return self.invalid_mode or self.fully_masked_rows == 0


def _heads_dims(layout: str, q: tuple, k: tuple, v: tuple, head_num: int):
    """(B, N1, N2, Sq, Skv, D, Dv) from the shapes, per SPEC §1 (T for TND in Sq/Skv)."""
    if layout in ("BSH", "SBH"):
        if layout == "BSH":
            B, Sq, Hq = q
            _, Skv, Hk = k
            Hv = v[2]
        else:
            Sq, B, Hq = q
            Skv, _, Hk = k
            Hv = v[2]
        N1 = head_num
        D = Hq // N1
        N2 = Hk // D
        Dv = Hv // N2
        return B, N1, N2, Sq, Skv, D, Dv
    if layout == "BSND":
        return q[0], q[2], k[2], q[1], k[1], q[3], v[3]
    if layout == "BNSD":
        return q[0], q[1], k[1], q[2], k[2], q[3], v[3]
    # TND
    return 1, q[1], k[1], q[0], k[0], q[2], v[2]


def structural_masked(mode: int, sq: int, skv: int, pre: int, nxt: int, prefix: int, band: bool) -> torch.Tensor:
    """Bool [sq, skv], True = masked by the sparse mode's own rule (SPEC §5 table), local (i, j)."""
    i = torch.arange(sq, dtype=torch.int64)[:, None]
    j = torch.arange(skv, dtype=torch.int64)[None, :]
    d = skv - sq
    none = torch.zeros(sq, skv, dtype=torch.bool)
    if mode == 0:
        return (j - i > nxt) | (i - j > pre)
    if mode == 1:
        return none
    if mode == 2:
        return j > i
    if mode == 3:
        return j > i + d
    if mode == 4:
        return (j - i > nxt + d) | (i - j > pre - d)
    if mode in (5, 6):
        return (j > i + d) & (j >= prefix)
    if mode == 7:
        return ((j - i > nxt + d) | (i - j > pre - d)) if band else (j > i + d)
    if mode == 8:
        return ((j - i > nxt + d) | (i - j > pre - d)) if band else (j > i)
    raise ValueError(mode)


def _full_mask_part(atten_mask: np.ndarray, layout: str, b: int, bi: Batch) -> torch.Tensor:
    """Element-wise mask for batch b: [N1 or 1, sq, skv] (SPEC §5 shapes, §9 TND corner)."""
    m = torch.from_numpy(_np(atten_mask).astype(np.uint8) != 0)
    if m.ndim == 2:
        part = m[None]
    elif m.shape[0] == 1 and m.shape[1] == 1:
        part = m[0]
    elif layout == "TND":
        raise ValueError("TND full masks are SS/11SS")
    elif m.shape[1] == 1:
        part = m[b]
    else:
        part = m[b]
    return part[:, : bi.sq, : bi.skv]


def _invalid_auto(mode: int, bi: Batch, pre: int, nxt: int, prefix: int, band: bool) -> bool:
    """CANN's automatic enabling of invalid-line mode (SPEC §8), for one sequence."""
    sq, skv = bi.sq, bi.skv
    d = skv - sq

    def band_rule(p, n):  # band with pre' < Sq - Skv or next' < 0 (left-up origin tokens)
        return p < sq - skv or n < 0

    if mode == 3:
        return sq > skv
    if mode == 0:
        return band_rule(pre, nxt)
    if mode == 4:
        return band_rule(pre - d, nxt + d)
    if mode in (5, 6):
        return sq > skv and prefix == 0
    if mode == 7:
        return band_rule(pre - d, nxt + d) if band else sq > skv
    if mode == 8:
        return band_rule(pre - d, nxt + d) if band else False
    return False


def plan(query, key, value, *, head_num, input_layout, atten_mask=None, prefix=None, actual_seq_qlen=None,
         actual_seq_kvlen=None, pre_tokens=INT32_MAX, next_tokens=INT32_MAX, inner_precise=0, sparse_mode=0,
         invalid_rows: bool | None = None, **_ignored) -> Plan:
    layout = input_layout
    B, N1, N2, Sq, Skv, D, Dv = _heads_dims(layout, tuple(query.shape), tuple(key.shape), tuple(value.shape),
                                            int(head_num))
    if layout == "TND":
        cq = [int(x) for x in np.asarray(actual_seq_qlen).reshape(-1)]
        ck = [int(x) for x in np.asarray(actual_seq_kvlen).reshape(-1)]
        lq = [cq[0]] + [cq[t] - cq[t - 1] for t in range(1, len(cq))]
        lk = [ck[0]] + [ck[t] - ck[t - 1] for t in range(1, len(ck))]
        nb = len(lq)
        while nb > 1 and lq[nb - 1] == 0 and lk[nb - 1] == 0:  # trailing empty batches are dropped
            nb -= 1
        batches = [Batch(lq[b], lk[b], cq[b] - lq[b], ck[b] - lk[b]) for b in range(nb)]
    else:
        batches = [Batch(Sq, Skv, 0, 0) for _ in range(B)]
    mode = int(sparse_mode)
    has_mask = atten_mask is not None
    nonempty = [b for b, x in enumerate(batches) if x.sq != 0]
    band_batch = None
    if mode == 7 and nonempty:
        band_batch = nonempty[-1]
    elif mode == 8 and nonempty:
        band_batch = nonempty[0]
    pf = [int(x) for x in np.asarray(prefix).reshape(-1)] if prefix is not None else None
    masks = []
    auto = False
    for b, bi in enumerate(batches):
        m = torch.zeros(1, bi.sq, bi.skv, dtype=torch.bool)
        if has_mask:
            pb = pf[b] if (pf is not None and mode in (5, 6)) else 0
            m = m | structural_masked(mode, bi.sq, bi.skv, int(pre_tokens), int(next_tokens), pb,
                                      b == band_batch)[None]
            if mode in (0, 1, 5):
                m = m | _full_mask_part(atten_mask, layout, b, bi)
            if bi.sq:
                auto = auto or _invalid_auto(mode, bi, int(pre_tokens), int(next_tokens), pb, b == band_batch)
        if bi.sq and not bi.skv:
            # A sequence without keys: outside CANN's contract (varlen must have no fully masked rows, §9).
            # fag_tvm treats its rows as invalid rows by construction, which turns invalid-line mode on.
            auto = True
        masks.append(m)
    inv = (int(inner_precise) == 2 or auto) if invalid_rows is None else bool(invalid_rows)
    return Plan(layout=layout, B=len(batches), N1=N1, N2=N2, D=D, Dv=Dv, Sq=Sq, Skv=Skv, batches=batches,
                mode=mode, has_mask=has_mask, pre=int(pre_tokens), nxt=int(next_tokens), prefix=pf,
                band_batch=band_batch, invalid_mode=inv, masks=masks)


# ------------------------------------------------------------------------------------------ layouts

def split_batches(x: torch.Tensor, p: Plan, heads: int, kv: bool) -> list[torch.Tensor]:
    """Per-sequence views [heads, S_b, d] of a tensor in the plan's layout (differentiable)."""
    L = p.layout
    if L == "TND":
        out = []
        for bi in p.batches:
            r0, S = (bi.kv0, bi.skv) if kv else (bi.q0, bi.sq)
            out.append(x[r0:r0 + S].permute(1, 0, 2))
        return out
    if L == "BNSD":
        y = x
    elif L == "BSND":
        y = x.permute(0, 2, 1, 3)
    else:
        if L == "SBH":
            x = x.permute(1, 0, 2)
        Bx, S, H = x.shape
        y = x.reshape(Bx, S, heads, H // heads).permute(0, 2, 1, 3)
    return [y[b] for b in range(p.B)]


def merge_batches(parts: list[torch.Tensor], p: Plan) -> torch.Tensor:
    """Inverse of split_batches for q-like outputs [N1, Sq_b, d] → the layout."""
    L = p.layout
    if L == "TND":
        return torch.cat([t.permute(1, 0, 2) for t in parts], dim=0)
    y = torch.stack(parts)  # [B, N, S, d]
    if L == "BNSD":
        return y
    if L == "BSND":
        return y.permute(0, 2, 1, 3)
    Bx, N, S, d = y.shape
    y = y.permute(0, 2, 1, 3).reshape(Bx, S, N * d)
    return y if L == "BSH" else y.permute(1, 0, 2)


def stats_layout(rows: list[torch.Tensor], p: Plan) -> np.ndarray:
    """Per-batch [N1, Sq_b] statistics → the API's [B,N1,Sq,8] or TND [T,N1,8] (SPEC §7 memory order)."""
    if p.layout == "TND":
        flat = torch.cat([r.reshape(-1) for r in rows]) if rows else torch.zeros(0, dtype=torch.float64)
        T = sum(bi.sq for bi in p.batches)
        return flat[:, None].expand(-1, 8).reshape(T, p.N1, 8).numpy().copy()
    return torch.stack(rows)[..., None].expand(-1, -1, -1, 8).numpy().copy()


def stats_rows(stat: Any, p: Plan) -> list[torch.Tensor]:
    """Given [B,N1,Sq,8] / TND [T,N1,8] statistics → per batch [N1, Sq_b] (lane 0; SPEC §7 memory order)."""
    flat = torch.from_numpy(as_f64(stat).reshape(-1, 8)[:, 0].copy())
    out, r0 = [], 0
    for bi in p.batches:
        n = p.N1 * (bi.sq if p.layout == "TND" else p.Sq)
        out.append(flat[r0:r0 + n].reshape(p.N1, -1))
        r0 += n
    return out


# ------------------------------------------------------------------------------------------ pse

def _toeplitz_read(C: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Value of a Toeplitz [.., 1024, W] matrix on the diagonal m − k = u (0 where u is out of range)."""
    H, W = C.shape[-2], C.shape[-1]
    # first choice: last row m = H-1, k = H-1-u; else last column k = W-1, m = u + W - 1
    k1 = (H - 1) - u
    use1 = (k1 >= 0) & (k1 <= W - 1)
    m2 = u + W - 1
    ok2 = (m2 >= 0) & (m2 <= H - 1)
    m = torch.where(use1, torch.full_like(u, H - 1), m2).clamp(0, H - 1)
    k = torch.where(use1, k1, torch.full_like(u, W - 1)).clamp(0, W - 1)
    val = C[..., m, k]
    return torch.where(use1 | ok2, val, torch.zeros_like(val))


def pse_for_batch(pse: torch.Tensor | None, p: Plan, b: int, pse_type: int, q_start: int, kv_start: int):
    """Dense float64 pse [N1, Sq_b or 1, Skv_b] for sequence b (differentiable in pse for types 0/1)."""
    if pse is None:
        return None
    bi = p.batches[b]
    sq, skv, N1 = bi.sq, bi.skv, p.N1
    i = torch.arange(sq, dtype=torch.int64)[:, None]
    j = torch.arange(skv, dtype=torch.int64)[None, :]
    if pse_type in (2, 3):  # slopes [N1] or [B, N1] (SPEC §4)
        s = pse if pse.ndim == 1 else pse[b]
        dist = ((j + kv_start) - (i + q_start)).abs().to(torch.float64)
        if pse_type == 3:
            dist = dist.sqrt()
        return -s[:, None, None] * dist[None]
    if p.layout == "TND":
        if pse.ndim == 1:
            bnss = N1 * sum(x.sq * x.skv for x in p.batches)
            if pse.numel() == bnss:  # packed per batch: [N1, Sq_b, Skv_b] blocks
                base = N1 * sum(x.sq * x.skv for x in p.batches[:b])
                return pse[base:base + N1 * sq * skv].reshape(N1, sq, skv)
            base = N1 * bi.kv0  # BN1S-like: per batch [N1, Skv_b] blocks
            return pse[base:base + N1 * skv].reshape(N1, 1, skv)
        # alibi-compressed [B|1, N1, 1024, Skv_max]: read on m − k = (i − j) − (Skv_max − 1024) (SPEC §4)
        C = pse[b] if pse.shape[0] == p.B and p.B != 1 else pse[0]
        W = C.shape[-1]
        u = (i - j) - (W - ALIBI_ROWS)
        return _toeplitz_read(C, u)
    Bp, Np, R, W = pse.shape
    if R == p.Sq:  # BNSS / 1NSS
        return pse[b] if Bp == p.B else pse[0]
    if R == 1:  # BN1S: one row broadcast over all query rows
        return pse[b]
    # alibi-compressed: the last 1024 rows of a Toeplitz [Sq, Skv] pse; full row r = Sq - 1024 + m
    C = pse[b] if (Bp == p.B and p.B != 1) else pse[0]
    t = i - j  # value depends on t only; diagonal m - k = t - (Sq - 1024)
    return _toeplitz_read(C, t - (p.Sq - ALIBI_ROWS))


def pse_is_external(pse, pse_type: int, p: Plan) -> bool:
    """types 0/1 with an external (non alibi-compressed) pse: dpse is compared."""
    if pse is None or pse_type in (2, 3):
        return False
    if p.layout == "TND":
        return pse.ndim == 1
    return pse.shape[2] in (p.Sq, 1)


# ------------------------------------------------------------------------------------------ dropout

def keep_for_batch(drop_mask: np.ndarray, p: Plan, b: int) -> torch.Tensor:
    """Keep matrix [N1, Sq_b, Skv_b] from the LSB-first bit mask (SPEC §6 element index)."""
    bi = p.batches[b]
    if p.layout == "TND":
        base = p.N1 * sum(x.sq * x.skv for x in p.batches[:b])
    else:
        base = b * p.N1 * bi.sq * bi.skv
    n = torch.arange(p.N1, dtype=torch.int64)[:, None, None]
    i = torch.arange(bi.sq, dtype=torch.int64)[None, :, None]
    j = torch.arange(bi.skv, dtype=torch.int64)[None, None, :]
    e = base + (n * bi.sq + i) * bi.skv + j
    bytes_ = torch.from_numpy(_np(drop_mask).reshape(-1).astype(np.int64))
    return ((bytes_[e >> 3] >> (e & 7)) & 1).to(torch.float64)


# ------------------------------------------------------------------------------------------ oracle

def oracle(query, key, value, dy=None, *, head_num, input_layout, pse_shift=None, drop_mask=None,
           atten_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, scale_value=1.0,
           keep_prob=1.0, pre_tokens=INT32_MAX, next_tokens=INT32_MAX, inner_precise=0, sparse_mode=0,
           pse_type=1, q_start_idx=None, kv_start_idx=None, masked_cells_carry_grad: bool = False,
           invalid_rows: bool | None = None, softmax_max=None, softmax_sum=None, attention_in=None,
           **_ignored) -> dict[str, Any]:
    """float64 forward (+ autograd backward when dy is given), single-threaded (the shapes are small; on a
    2-core machine torch's thread pool only fights NumPy's). All outputs are float64 NumPy arrays in the
    API's shapes: attention_out, softmax_max, softmax_sum, dq, dk, dv, dpse (None unless external pse).

    With `softmax_max`, `softmax_sum` and `attention_in` given, the backward follows SPEC §3 with supplied
    statistics instead of differentiating the softmax: P = exp(S − max)/sum with the given stats (rows with
    stats (−FLT_MAX, +FLT_MAX) contribute exactly 0, A5) and the loss Σ (P'V)∘dy − Σ_i D_i·Σ_j P_ij with the
    constant D_i = Σ_d dy_id·O_id of the given O, whose autograd is exactly dS = P∘(dP' − D)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _oracle(query, key, value, dy, head_num=head_num, input_layout=input_layout, pse_shift=pse_shift,
                       drop_mask=drop_mask, atten_mask=atten_mask, prefix=prefix, actual_seq_qlen=actual_seq_qlen,
                       actual_seq_kvlen=actual_seq_kvlen, scale_value=scale_value, keep_prob=keep_prob,
                       pre_tokens=pre_tokens, next_tokens=next_tokens, inner_precise=inner_precise,
                       sparse_mode=sparse_mode, pse_type=pse_type, q_start_idx=q_start_idx,
                       kv_start_idx=kv_start_idx, masked_cells_carry_grad=masked_cells_carry_grad,
                       invalid_rows=invalid_rows, softmax_max=softmax_max, softmax_sum=softmax_sum,
                       attention_in=attention_in)
    finally:
        torch.set_num_threads(threads)


def _oracle(query, key, value, dy, *, head_num, input_layout, pse_shift, drop_mask, atten_mask, prefix,
            actual_seq_qlen, actual_seq_kvlen, scale_value, keep_prob, pre_tokens, next_tokens, inner_precise,
            sparse_mode, pse_type, q_start_idx, kv_start_idx, masked_cells_carry_grad, invalid_rows, softmax_max,
            softmax_sum, attention_in) -> dict[str, Any]:
    p = plan(query, key, value, head_num=head_num, input_layout=input_layout, atten_mask=atten_mask,
             prefix=prefix, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
             pre_tokens=pre_tokens, next_tokens=next_tokens, inner_precise=inner_precise,
             sparse_mode=sparse_mode, invalid_rows=invalid_rows)
    want_grad = dy is not None
    q = torch.tensor(as_f64(query), requires_grad=want_grad)
    k = torch.tensor(as_f64(key), requires_grad=want_grad)
    v = torch.tensor(as_f64(value), requires_grad=want_grad)
    ptype = int(pse_type)
    external = pse_is_external(pse_shift, ptype, p) if pse_shift is not None else False
    pse = None
    if pse_shift is not None:
        pse = torch.tensor(as_f64(pse_shift), requires_grad=want_grad and external)
    q_start, kv_start = _first(q_start_idx), _first(kv_start_idx)
    scale = float(scale_value)
    keep = float(keep_prob)
    qs, ks, vs = split_batches(q, p, p.N1, False), split_batches(k, p, p.N2, True), split_batches(v, p, p.N2, True)
    dys = split_batches(torch.from_numpy(as_f64(dy)), p, p.N1, False) if want_grad else None
    given = want_grad and attention_in is not None
    if given:
        o_in = split_batches(torch.from_numpy(as_f64(attention_in)), p, p.N1, False)
        st_max, st_sum = stats_rows(softmax_max, p), stats_rows(softmax_sum, p)
    outs, mx, sm = [], [], []
    loss = torch.zeros((), dtype=torch.float64)
    for b, bi in enumerate(p.batches):
        if bi.sq == 0:
            outs.append(torch.zeros(p.N1, 0, p.Dv, dtype=torch.float64))
            mx.append(torch.zeros(p.N1, 0, dtype=torch.float64))
            sm.append(torch.zeros(p.N1, 0, dtype=torch.float64))
            continue
        if bi.skv == 0:  # no key at all: output 0, invalid-row statistics
            outs.append(torch.zeros(p.N1, bi.sq, p.Dv, dtype=torch.float64))
            mx.append(torch.full((p.N1, bi.sq), -FLT_MAX, dtype=torch.float64))
            sm.append(torch.full((p.N1, bi.sq), FLT_MAX, dtype=torch.float64))
            continue
        kr = ks[b].repeat_interleave(p.G, dim=0)
        vr = vs[b].repeat_interleave(p.G, dim=0)
        A = qs[b] @ kr.transpose(1, 2)
        ps = pse_for_batch(pse, p, b, ptype, q_start, kv_start)
        if ps is None:
            S = scale * A
        elif ptype == 1:
            S = scale * (A + ps)
        else:
            S = scale * A + ps
        mask = p.masks[b]
        if masked_cells_carry_grad:
            S = S + torch.where(mask, (-FLT_MAX - S).detach(), torch.zeros((), dtype=torch.float64))
        else:
            S = torch.where(mask, torch.full((), -FLT_MAX, dtype=torch.float64), S)
        m = S.detach().amax(dim=-1)
        l = torch.exp(S.detach() - m[..., None]).sum(dim=-1)
        P = torch.softmax(S, dim=-1)
        if p.invalid_mode:
            bad = mask.all(dim=-1).expand(p.N1, bi.sq)
            P = torch.where(bad[..., None], torch.zeros((), dtype=torch.float64), P)
            m = torch.where(bad, torch.full_like(m, -FLT_MAX), m)
            l = torch.where(bad, torch.full_like(l, FLT_MAX), l)
        M = keep_for_batch(drop_mask, p, b) / keep if keep < 1.0 else None
        O = P @ vr if M is None else (P * M) @ vr
        if want_grad and not given:
            loss = loss + (O * dys[b]).sum()
        elif want_grad:
            gm, gl = st_max[b][..., None], st_sum[b][..., None]
            Pg = torch.exp(S - gm) / gl
            Pg = torch.where((gm == -FLT_MAX) & (gl == FLT_MAX), torch.zeros((), dtype=torch.float64), Pg)
            Og = Pg @ vr if M is None else (Pg * M) @ vr
            Dg = (dys[b] * o_in[b]).sum(dim=-1, keepdim=True)
            loss = loss + (Og * dys[b]).sum() - (Dg * Pg).sum()
        outs.append(O)
        mx.append(m)
        sm.append(l)
    res: dict[str, Any] = {
        "attention_out": merge_batches(outs, p).detach().numpy().copy(),
        "softmax_max": stats_layout(mx, p),
        "softmax_sum": stats_layout(sm, p),
        "plan": p,
    }
    if want_grad:
        if loss.requires_grad:
            loss.backward()
        res["dq"] = q.grad.numpy().copy() if q.grad is not None else np.zeros(q.shape)
        res["dk"] = k.grad.numpy().copy() if k.grad is not None else np.zeros(k.shape)
        res["dv"] = v.grad.numpy().copy() if v.grad is not None else np.zeros(v.shape)
        if external:
            res["dpse"] = pse.grad.numpy().copy() if pse.grad is not None else np.zeros(pse.shape)
        else:
            res["dpse"] = None
    return res


# ------------------------------------------------------------------------------------------ metrics

def rel_err(a: Any, b: Any, floor: float = 1e-4) -> float:
    """‖a−b‖₂ / max(‖b‖₂, floor·√n): relative error per output, with an absolute floor (in RMS units) so an
    output that is exactly 0 mathematically (e.g. dq when every row sees one key) compares on noise."""
    a = as_f64(a)
    b = as_f64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    den = max(float(np.linalg.norm(b.reshape(-1))), floor * np.sqrt(b.size))
    return float(np.linalg.norm((a - b).reshape(-1))) / den


def cann_bad_ratio(a: Any, b: Any) -> float:
    """Fraction of elements failing CANN's rule |a−b| ≤ max(0.005·max(|a|,|b|), 2.5e-5) (SPEC §12)."""
    a = as_f64(a)
    b = as_f64(b)
    if a.size == 0:
        return 0.0
    bad = np.abs(a - b) > np.maximum(0.005 * np.maximum(np.abs(a), np.abs(b)), 2.5e-5)
    return float(bad.mean())


OUTPUT_KEYS = ("attention_out", "softmax_max", "softmax_sum", "dq", "dk", "dv", "dpse")


def compare(got: dict, want: dict, keys=OUTPUT_KEYS, tol: float = 1e-10) -> dict:
    """{output: problem} for every output of `got` that differs from `want` by more than `tol` (rel_err), has
    another shape, or is None on one side only. Empty dict = all good."""
    errs = {}
    for key in keys:
        a, b = got.get(key), want.get(key)
        if (a is None) != (b is None):
            errs[key] = f"None mismatch ({a is None} vs {b is None})"
            continue
        if a is None:
            continue
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            errs[key] = f"shape {tuple(np.shape(a))} vs {tuple(np.shape(b))}"
            continue
        if key in ("softmax_max", "softmax_sum"):
            # a ±FLT_MAX sentinel row would dominate a relative L2 over all rows (and hide every other row):
            # sentinel rows must match exactly, the others are compared among themselves
            a, b = as_f64(a).reshape(-1), as_f64(b).reshape(-1)
            sent = np.abs(b) >= float(np.finfo(np.float32).max)
            if np.any(a[sent] != b[sent]) or np.any(np.abs(a[~sent]) >= float(np.finfo(np.float32).max)):
                errs[key] = "sentinel rows differ"
                continue
            a, b = a[~sent], b[~sent]
        e = rel_err(a, b)
        if not e <= tol:
            errs[key] = f"{e:.3g}"
    return errs
