"""Seeded random configurations of valid `flash_attention_score_grad` calls (test helper).

`gen_case(seed)` returns a `Case`: positional tensors (query, key, value, dy), the keyword arguments of the
public API (minus `target`), a one-line description, and flags from the SPEC-derived plan of
`torch_oracle.plan`: `fully_masked_rows`, `invalid_mode` and `coincide` (CANN's backward equals plain
autograd: no fully masked row, or all of them handled by invalid-line mode).

Coverage: layouts BSH/SBH/BSND/BNSD/TND × GQA (G 1–4) × Dv < D × dtypes (fp32 mostly, fp16, bf16) × pse forms
(pse_type 0/1 BNSS/1NSS/BN1S, TND packed 1-D BNSS/BN1S, alibi-compressed BNHS/1NHS for Sq = Skv ≥ 1024 and
for TND, slopes pse_type 2/3 [N] / [B,N] with q_start_idx/kv_start_idx) × sparse modes 0–8 (7/8 TND only,
compressed masks from fag_tvm.masks, modes 5/6 with prefix) × dropout (fag_tvm.dropout bit masks, sometimes
padded) × TND varlen (zero-length and trailing empty sequences). Shapes are small (S ≤ 64, D ≤ 32, some
S = 1 / D = 1) except the alibi-compressed cases (Sq = Skv ≥ 1024, N ≤ 2, D ≤ 4).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from fag_tvm import dropout as fdrop
from fag_tvm import masks as fmasks

from torch_oracle import INT32_MAX, plan

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}
PADDED = ("BSH", "SBH", "BSND", "BNSD")


@functools.lru_cache(maxsize=None)
def causal2048() -> np.ndarray:
    m = fmasks.compressed_causal_mask()
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=None)
def prefix3072() -> np.ndarray:
    m = fmasks.compressed_prefix_mask()
    m.setflags(write=False)
    return m


@dataclass
class Case:
    seed: int
    args: tuple
    kwargs: dict
    desc: str
    tags: dict = field(default_factory=dict)
    fully_masked_rows: int = 0
    invalid_mode: bool = False

    @property
    def coincide(self) -> bool:
        return self.invalid_mode or self.fully_masked_rows == 0

    def __repr__(self) -> str:
        return f"Case(seed={self.seed}: {self.desc})"


# ------------------------------------------------------------------------------------------ helpers

def rand(rng, shape, dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def compose(layout: str, B: int, S: int, N: int, D: int) -> tuple:
    return {"BSH": (B, S, N * D), "SBH": (S, B, N * D), "BSND": (B, S, N, D), "BNSD": (B, N, S, D),
            "TND": (S, N, D)}[layout]


def to_layout(x_bnsd: np.ndarray, layout: str) -> np.ndarray:
    """[B,N,S,D] → a padded layout (copy)."""
    B, N, S, D = x_bnsd.shape
    if layout == "BNSD":
        return np.ascontiguousarray(x_bnsd)
    if layout == "BSND":
        return np.ascontiguousarray(x_bnsd.transpose(0, 2, 1, 3))
    bsh = x_bnsd.transpose(0, 2, 1, 3).reshape(B, S, N * D)
    return np.ascontiguousarray(bsh if layout == "BSH" else bsh.transpose(1, 0, 2))


def from_layout(x: np.ndarray, layout: str, N: int) -> np.ndarray:
    """A padded layout → [B,N,S,D] (copy)."""
    if layout == "BNSD":
        return np.ascontiguousarray(x)
    if layout == "BSND":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    if layout == "SBH":
        x = x.transpose(1, 0, 2)
    B, S, H = x.shape
    return np.ascontiguousarray(x.reshape(B, S, N, H // N).transpose(0, 2, 1, 3))


def tokens_valid(mode: int, tnd: bool, seqs: list[tuple[int, int]], pre: int, nxt: int, band_batch) -> bool:
    """SPEC §5 token validity on the converted tokens (non-TND: sum ≥ 0; TND per batch: sum > 0)."""
    for b, (sq, skv) in enumerate(seqs):
        if mode == 0:
            p, n = pre, nxt
        elif mode == 4 or (mode in (7, 8) and b == band_batch):
            d = skv - sq
            p, n = pre - d, nxt + d
        else:
            continue
        if -p > skv or -n > sq:
            return False
        if (p + n <= 0) if tnd else (p + n < 0):
            return False
    return True


def sample_tokens(rng, mode, tnd, seqs, band_batch) -> tuple[int, int]:
    S = max(max(s) for s in seqs) + 2
    for _ in range(60):
        if rng.random() < 0.25:
            pre, nxt = INT32_MAX, INT32_MAX
            if rng.random() < 0.5:
                nxt = int(rng.integers(-S, S + 1))
            else:
                pre = int(rng.integers(-S, S + 1))
        else:
            pre, nxt = int(rng.integers(-S, S + 1)), int(rng.integers(-S, S + 1))
        if tokens_valid(mode, tnd, seqs, pre, nxt, band_batch):
            return pre, nxt
    return INT32_MAX, INT32_MAX


def _seq_len(rng, lo=1) -> int:
    r = rng.random()
    if r < 0.12:
        return max(lo, 1)
    if r < 0.85:
        return int(rng.integers(max(lo, 2), 33))
    return int(rng.integers(33, 65))


def _heads(rng) -> tuple[int, int]:
    N2 = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    G = int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.15, 0.15]))
    return N2 * G, N2


def _dims(rng) -> tuple[int, int]:
    D = 1 if rng.random() < 0.08 else int(rng.integers(2, 33))
    Dv = D if rng.random() < 0.5 else int(rng.integers(1, D + 1))
    return D, Dv


def _start_idx(rng):
    r = rng.random()
    x = int(rng.integers(-8, 41))
    if r < 0.3:
        return None
    if r < 0.6:
        return x
    if r < 0.85:
        return np.array([x], dtype=np.int64)
    return [x, int(rng.integers(0, 9))]


# ------------------------------------------------------------------------------------------ generator

def gen_case(seed: int) -> Case:
    """One random valid configuration (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    if seed % 50 == 17:
        case = _alibi_case(rng, seed)
    else:
        layout = str(rng.choice(["BSH", "SBH", "BSND", "BNSD", "TND"], p=[0.17, 0.17, 0.17, 0.17, 0.32]))
        case = _tnd_case(rng, seed) if layout == "TND" else _padded_case(rng, seed, layout)
    p = plan(*case.args[:3], **case.kwargs)
    case.fully_masked_rows = p.fully_masked_rows
    case.invalid_mode = p.invalid_mode
    return case


def _dtype(rng) -> np.dtype:
    return DTYPES[str(rng.choice(list(DTYPES), p=[0.7, 0.15, 0.15]))]


def _common_scalars(rng, D: int) -> dict:
    return dict(scale_value=float(rng.choice([1.0, 1.0 / np.sqrt(D), 0.37, 2.0])),
                inner_precise=int(rng.choice([0, 0, 0, 1, 2])))


def _random_full_mask(rng, shape, density) -> np.ndarray:
    m = rng.random(shape) < density
    if rng.random() < 0.15:  # a fully masked ("dead") row: uniform P unless invalid-line mode is on
        idx = tuple(int(rng.integers(0, s)) for s in shape[:-1])
        m[idx] = True
    return m if rng.random() < 0.5 else m.astype(np.uint8)


def _padded_case(rng, seed, layout) -> Case:
    dt = _dtype(rng)
    B = int(rng.integers(1, 4))
    Sq, Skv = _seq_len(rng), _seq_len(rng)
    N1, N2 = _heads(rng)
    D, Dv = _dims(rng)
    kw: dict[str, Any] = dict(head_num=N1, input_layout=layout, **_common_scalars(rng, D))
    q = rand(rng, compose(layout, B, Sq, N1, D), dt)
    k = rand(rng, compose(layout, B, Skv, N2, D), dt)
    v = rand(rng, compose(layout, B, Skv, N2, Dv), dt)
    dy = rand(rng, compose(layout, B, Sq, N1, Dv), dt)
    mode = int(rng.integers(0, 7))
    has_mask = rng.random() < 0.88
    seqs = [(Sq, Skv)] * B
    desc_mask = "nomask"
    if has_mask:
        kw["sparse_mode"] = mode
        if mode in (0, 4):
            pre, nxt = (INT32_MAX, INT32_MAX) if rng.random() < 0.3 else sample_tokens(rng, mode, False, seqs, None)
            kw["pre_tokens"], kw["next_tokens"] = pre, nxt
        if mode in (0, 1):
            form = str(rng.choice(["SS", "11SS", "B1SS", "BNSS"]))
            shape = {"SS": (Sq, Skv), "11SS": (1, 1, Sq, Skv), "B1SS": (B, 1, Sq, Skv), "BNSS": (B, N1, Sq, Skv)}[form]
            if mode == 0 and rng.random() < 0.5:  # the golden: a mask consistent with the band
                i = np.arange(Sq)[:, None]
                j = np.arange(Skv)[None, :]
                band = (j - i > kw.get("next_tokens", INT32_MAX)) | (i - j > kw.get("pre_tokens", INT32_MAX))
                m = np.broadcast_to(band, shape).copy()
                if rng.random() < 0.3:
                    m |= rng.random(shape) < 0.1
            else:
                m = _random_full_mask(rng, shape, float(rng.choice([0.0, 0.1, 0.3])))
            kw["atten_mask"] = m
            desc_mask = f"mode{mode}-{form}"
        elif mode in (2, 3, 4):
            kw["atten_mask"] = causal2048()
            desc_mask = f"mode{mode}"
        else:  # 5, 6: prefix
            lo = 0 if Sq > Skv else Skv - Sq
            kw["prefix"] = [int(rng.integers(lo, Skv + 1)) for _ in range(B)]
            if rng.random() < 0.3:
                kw["prefix"] = np.array(kw["prefix"], dtype=np.int64)
            if mode == 5:
                form = str(rng.choice(["B1SS", "BNSS"]))
                shape = (B, 1, Sq, Skv) if form == "B1SS" else (B, N1, Sq, Skv)
                i = np.arange(Sq)[:, None]
                j = np.arange(Skv)[None, :]
                m = np.zeros(shape, dtype=bool)
                for b in range(B):
                    m[b] = (j > i + (Skv - Sq)) & (j >= int(kw["prefix"][b]))
                if rng.random() < 0.3:
                    m |= rng.random(shape) < 0.1
                kw["atten_mask"] = m if rng.random() < 0.5 else m.astype(np.uint8)
                desc_mask = f"mode5-{form}"
            else:
                kw["atten_mask"] = prefix3072()
                desc_mask = "mode6"
    else:
        if rng.random() < 0.3:  # sparse_mode / tokens without a mask are ignored
            kw["sparse_mode"] = int(rng.integers(0, 7))
            kw["pre_tokens"], kw["next_tokens"] = 1, 0
    desc_pse = "nopse"
    if rng.random() < 0.45:
        ptype = int(rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.2, 0.2]))
        kw["pse_type"] = ptype
        if ptype in (0, 1):
            form = str(rng.choice(["BNSS", "1NSS", "BN1S"]))
            shape = {"BNSS": (B, N1, Sq, Skv), "1NSS": (1, N1, Sq, Skv), "BN1S": (B, N1, 1, Skv)}[form]
            kw["pse_shift"] = rand(rng, shape, dt)
        else:
            form = str(rng.choice(["N", "BN"]))
            shape = (N1,) if form == "N" else (B, N1)
            kw["pse_shift"] = rng.uniform(0.02, 1.0, shape).astype(np.float32)
            kw["q_start_idx"], kw["kv_start_idx"] = _start_idx(rng), _start_idx(rng)
        desc_pse = f"pse{ptype}-{form}"
    desc_drop = ""
    if rng.random() < 0.3:
        keep = float(rng.choice([0.5, 0.75, 0.9]))
        dm = fdrop.gen_drop_mask(B, N1, Sq, Skv, keep, seed=seed)
        if rng.random() < 0.3:
            dm = np.concatenate([dm, rng.integers(0, 256, 32).astype(np.uint8)])
        kw["keep_prob"], kw["drop_mask"] = keep, dm
        desc_drop = f" keep{keep}"
    elif rng.random() < 0.05:
        kw["keep_prob"], kw["drop_mask"] = 1.0, np.zeros(1, np.uint8)  # ignored at keep_prob 1
    desc = (f"{layout} {dt.name} B{B} N{N1}/{N2} Sq{Sq} Skv{Skv} D{D} Dv{Dv} {desc_mask} {desc_pse}{desc_drop} "
            f"scale{kw['scale_value']:.3g} ip{kw['inner_precise']}")
    tags = dict(layout=layout, dtype=dt.name, mode=kw.get("sparse_mode", 0) if has_mask else "none",
                pse=desc_pse, dropout=bool(desc_drop), gqa=N1 != N2, dv_lt_d=Dv < D)
    return Case(seed, (q, k, v, dy), kw, desc, tags)


def _tnd_case(rng, seed) -> Case:
    dt = _dtype(rng)
    N1, N2 = _heads(rng)
    D, Dv = _dims(rng)
    nb = int(rng.integers(1, 5))
    lq, lk = [], []
    for _ in range(nb):
        lq.append(0 if rng.random() < 0.1 else int(rng.integers(1, 21)))
        lk.append(0 if rng.random() < 0.1 else int(rng.integers(1, 21)))
    if sum(lq) == 0:
        lq[0] = int(rng.integers(1, 21))
    if sum(lk) == 0:
        lk[-1] = int(rng.integers(1, 21))
    trailing = 0
    if rng.random() < 0.1:
        trailing = int(rng.integers(1, 3))
    seqs = list(zip(lq, lk))
    has_zero = any(a == 0 or b == 0 for a, b in seqs)
    T, T2 = sum(lq), sum(lk)
    cq = np.cumsum(lq + [0] * trailing).astype(np.int64)
    ck = np.cumsum(lk + [0] * trailing).astype(np.int64)
    kw: dict[str, Any] = dict(head_num=N1, input_layout="TND", **_common_scalars(rng, D),
                              actual_seq_qlen=cq if rng.random() < 0.5 else [int(x) for x in cq],
                              actual_seq_kvlen=ck if rng.random() < 0.5 else [int(x) for x in ck])
    q, k = rand(rng, (T, N1, D), dt), rand(rng, (T2, N2, D), dt)
    v, dy = rand(rng, (T2, N2, Dv), dt), rand(rng, (T, N1, Dv), dt)
    mode = int(rng.choice([0, 1, 2, 3, 4, 6, 7, 8]))
    has_mask = rng.random() < 0.88
    nonempty = [b for b, s in enumerate(seqs) if s[0] != 0]
    band_batch = (nonempty[-1] if mode == 7 else nonempty[0]) if mode in (7, 8) else None
    desc_mask = "nomask"
    Sqm, Skvm = max(lq), max(lk)
    if has_mask:
        kw["sparse_mode"] = mode
        if mode in (0, 4, 7, 8):
            if rng.random() < 0.3 and tokens_valid(mode, True, seqs, INT32_MAX, INT32_MAX, band_batch):
                pre, nxt = INT32_MAX, INT32_MAX
            else:
                pre, nxt = sample_tokens(rng, mode, True, seqs, band_batch)
            kw["pre_tokens"], kw["next_tokens"] = pre, nxt
        if mode in (0, 1):
            form = str(rng.choice(["SS", "11SS"]))
            shape = (Sqm, Skvm) if form == "SS" else (1, 1, Sqm, Skvm)
            if mode == 0 and rng.random() < 0.5:
                i = np.arange(Sqm)[:, None]
                j = np.arange(Skvm)[None, :]
                band = (j - i > kw["next_tokens"]) | (i - j > kw["pre_tokens"])
                m = np.broadcast_to(band, shape).copy()
            else:
                m = _random_full_mask(rng, shape, float(rng.choice([0.0, 0.1, 0.25])))
            kw["atten_mask"] = m
            desc_mask = f"mode{mode}-{form}"
        elif mode == 6:
            kw["atten_mask"] = prefix3072()
            n_eff = len(seqs)
            while n_eff > 1 and seqs[n_eff - 1] == (0, 0):  # trailing empty sequences are dropped (SPEC §9)
                n_eff -= 1
            kw["prefix"] = [int(rng.integers(0 if a > b else b - a, b + 1)) for a, b in seqs[:n_eff]]
            desc_mask = "mode6"
        else:
            kw["atten_mask"] = causal2048()
            desc_mask = f"mode{mode}"
    desc_pse = "nopse"
    if not has_zero and not trailing and not (has_mask and mode == 7) and rng.random() < 0.5:
        ptype = int(rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.2, 0.2]))
        alibi_ok = has_mask and mode in (2, 3, 8) and all(a <= Skvm for a in lq)
        if ptype in (0, 1) and alibi_ok and rng.random() < 0.7:
            # alibi-compressed TND: Toeplitz [.., 1024, Skv_max], read on m-k = (i-j) - (Skv_max-1024)
            Bp = int(rng.choice([1, nb])) if nb > 1 else 1
            h = rng.standard_normal((Bp, N1, 1024 + Skvm - 1)).astype(np.float32)
            mm = np.arange(1024)[:, None]
            kk = np.arange(Skvm)[None, :]
            comp = h[:, :, (mm - kk) + Skvm - 1]
            kw["pse_type"], kw["pse_shift"] = ptype, comp.astype(dt)
            form = "BNHS" if Bp > 1 else "1NHS"
        elif ptype in (0, 1):
            form = str(rng.choice(["TND_BNSS", "TND_BN1S"]))
            size = N1 * sum(a * b for a, b in seqs) if form == "TND_BNSS" else N1 * T2
            kw["pse_type"], kw["pse_shift"] = ptype, rand(rng, (size,), dt)
        else:
            qs, ks = _start_idx(rng), _start_idx(rng)
            if has_mask and mode == 8:
                ok = all(a == b for a, b in seqs) and lq[0] - lk[0] + (
                    0 if qs is None else int(np.asarray(qs).reshape(-1)[0])) - (
                    0 if ks is None else int(np.asarray(ks).reshape(-1)[0])) == 0
                if not ok:
                    qs = ks = None
                    ok = all(a == b for a, b in seqs)
            else:
                ok = True
            if ok:
                form = str(rng.choice(["N", "BN"]))
                shape = (N1,) if form == "N" else (nb, N1)
                kw["pse_type"], kw["pse_shift"] = ptype, rng.uniform(0.02, 1.0, shape).astype(np.float32)
                kw["q_start_idx"], kw["kv_start_idx"] = qs, ks
            else:
                form = "none"
        if "pse_shift" in kw:
            desc_pse = f"pse{ptype}-{form}"
    desc_drop = ""
    if rng.random() < 0.3:
        keep = float(rng.choice([0.5, 0.75, 0.9]))
        dm = fdrop.gen_drop_mask_tnd(N1, lq, lk, keep, seed=seed)
        if rng.random() < 0.3:
            dm = np.concatenate([dm, np.full(16, 0xA5, np.uint8)])
        kw["keep_prob"], kw["drop_mask"] = keep, dm
        desc_drop = f" keep{keep}"
    desc = (f"TND {dt.name} N{N1}/{N2} D{D} Dv{Dv} seqq{lq}+{trailing}x0 seqkv{lk} {desc_mask} {desc_pse}"
            f"{desc_drop} scale{kw['scale_value']:.3g} ip{kw['inner_precise']}")
    tags = dict(layout="TND", dtype=dt.name, mode=mode if has_mask else "none", pse=desc_pse,
                dropout=bool(desc_drop), gqa=N1 != N2, dv_lt_d=Dv < D, zero_len=has_zero, trailing=bool(trailing))
    return Case(seed, (q, k, v, dy), kw, desc, tags)


def toeplitz_compressed(rng, Bp: int, N: int, Sq: int, Skv: int) -> np.ndarray:
    """The last 1024 rows of a random Toeplitz pse f(i−j) of shape [Bp, N, Sq, Skv] (SPEC §4 golden form)."""
    f = rng.standard_normal((Bp, N, Sq + Skv - 1)).astype(np.float32)  # index t + Skv - 1, t = i - j
    m = np.arange(1024)[:, None]
    kk = np.arange(Skv)[None, :]
    return f[:, :, (Sq - 1024 + m - kk) + Skv - 1]


def _alibi_case(rng, seed) -> Case:
    """Non-TND alibi-compressed pse (BNHS/1NHS): Sq = Skv ≥ 1024, causal, small N and D."""
    layout = str(rng.choice(PADDED))
    dt = DTYPES[str(rng.choice(["float32", "float16"], p=[0.75, 0.25]))]
    B = int(rng.integers(1, 3))
    N2 = 1
    N1 = int(rng.choice([1, 2]))
    S = 1040 if (seed // 50) % 2 == 0 else 1024  # 1040 exercises the rows i < Sq-1024 (wrapped read)
    D = int(rng.choice([2, 4]))
    Dv = int(rng.choice([D, 1]))
    kw: dict[str, Any] = dict(head_num=N1, input_layout=layout, scale_value=float(rng.choice([1.0, 0.5])))
    q, k = rand(rng, compose(layout, B, S, N1, D), dt), rand(rng, compose(layout, B, S, N2, D), dt)
    v, dy = rand(rng, compose(layout, B, S, N2, Dv), dt), rand(rng, compose(layout, B, S, N1, Dv), dt)
    mode = int(rng.choice([2, 3, 0, 4]))
    kw["sparse_mode"] = mode
    if mode == 0:
        kw["pre_tokens"], kw["next_tokens"] = S + int(rng.integers(0, 3)), 0
        kw["atten_mask"] = np.triu(np.ones((S, S), dtype=bool), 1)
    else:
        kw["atten_mask"] = causal2048()
        if mode == 4:
            kw["pre_tokens"], kw["next_tokens"] = INT32_MAX, 0
    Bp = B if (B > 1 and rng.random() < 0.5) else 1
    ptype = int(rng.choice([0, 1]))
    kw["pse_type"], kw["pse_shift"] = ptype, toeplitz_compressed(rng, Bp, N1, S, S).astype(dt)
    form = "BNHS" if Bp > 1 else "1NHS"
    desc_drop = ""
    if rng.random() < 0.3:
        kw["keep_prob"] = 0.9
        kw["drop_mask"] = fdrop.gen_drop_mask(B, N1, S, S, 0.9, seed=seed)
        desc_drop = " keep0.9"
    desc = f"{layout} {dt.name} B{B} N{N1}/{N2} S{S} D{D} Dv{Dv} mode{mode} pse{ptype}-{form}{desc_drop}"
    tags = dict(layout=layout, dtype=dt.name, mode=mode, pse=f"pse{ptype}-{form}", dropout=bool(desc_drop),
                gqa=N1 != N2, dv_lt_d=Dv < D, alibi=True)
    return Case(seed, (q, k, v, dy), kw, desc, tags)
