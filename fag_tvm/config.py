"""Validation: one function turns a call's arguments into an immutable `OpConfig` (DESIGN §1).

Every rule of SPEC A8 / §11 is checked here, before any compiled code runs; nothing after this point
re-checks user input. The per-batch view (`BatchInfo`) unifies all layouts: TND is B sequences of
their own lengths, the padded layouts are B sequences of equal length.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .arrays import DTYPE_NAMES, MASKED_ARRAY_RULE
from .errors import invalid, nullptr, unsupported

INT32_MAX = 2147483647
INT32_MIN = -2147483648
FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)  # 2**-126, the smallest normal fp32
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
MAX_B, MAX_B_PREFIX, MAX_N, MAX_S, MAX_D = 2 * 1024 * 1024, 2048, 256, 1024 * 1024, 768
MAX_TND_BATCH, MAX_TND_BATCH_PREFIX = 2048, 1024
ALIBI_ROWS = 1024
# Sanity limit on logical element counts (packed TND totals, score elements): every int64 offset the kernels
# and the ABI packing compute (element, dropout-bit, pse and mask offsets) stays far from overflow.
MAX_ELEMENTS = 2 ** 62
# ALiBi distances |(kv_start + j) - (q_start + i)| are computed in int64 and used as fp32: they must be
# integers exactly representable in fp32 (<= 2**24).
MAX_ALIBI_DISTANCE = 2 ** 24


@dataclass(frozen=True)
class BatchInfo:
    """One sequence: lengths, first rows in the packed (TND) tensors and its structural mask rule.

    visible(i, j) = (j - i <= next and i - j <= pre) or j < prefix, in local (i, j), when the config's
    `band` is on (see OpConfig.band)."""

    sq: int
    skv: int
    q_row0: int  # TND: first token of this sequence in q/dy/o; padded layouts: 0
    kv_row0: int
    pre: int = INT32_MAX
    next: int = INT32_MAX
    prefix: int = 0


@dataclass(frozen=True)
class OpConfig:
    """Canonical, validated description of one call (shapes, dtype, layout, masks, pse, dropout)."""

    direction: str  # "fwd" | "bwd"
    layout: str
    dtype: str  # "float32" | "float16" | "bfloat16"
    B: int
    N1: int
    N2: int
    Sq: int  # TND: max Sq_b
    Skv: int  # TND: max Skv_b
    D: int
    Dv: int
    batches: tuple[BatchInfo, ...]
    scale: float
    keep_prob: float
    sparse_mode: int
    mask_form: str  # "none" | "SS" | "11SS" | "B1SS" | "BNSS" | "compressed" | "compressed_prefix"
    band: bool  # a structural rule (band/causal/prefix) masks at least one cell
    full_mask: bool  # the atten_mask is read element-wise
    pse_type: int
    pse_form: str  # none|BNSS|1NSS|BN1S|BNHS|1NHS|TND_BNSS|TND_BN1S|slopes_N|slopes_BN
    q_start: int
    kv_start: int
    dropout: bool
    invalid_rows: bool  # forward: inner_precise=2 behaviour (explicit or CANN's automatic enabling)
    stats_given: bool
    deterministic: bool
    target: str
    T: int = 0  # TND: total q tokens
    T2: int = 0  # TND: total kv tokens
    prefix: tuple[int, ...] | None = None
    empty: bool = False  # q, k and v are all empty: early success with empty outputs
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def G(self) -> int:
        return self.N1 // self.N2

    @property
    def tnd(self) -> bool:
        return self.layout == "TND"

    @property
    def pse_external(self) -> bool:
        return self.pse_form in ("BNSS", "1NSS", "BN1S", "TND_BNSS", "TND_BN1S")

    @property
    def pse_alibi_compressed(self) -> bool:
        return self.pse_form in ("BNHS", "1NHS")

    @property
    def pse_slopes(self) -> bool:
        return self.pse_form in ("slopes_N", "slopes_BN")

    @property
    def dpse_computed(self) -> bool:
        """dpse is produced for external pse (A6); None for alibi-compressed and slopes forms."""
        return self.direction == "bwd" and self.pse_external

    @property
    def total_q_rows(self) -> int:
        return sum(b.sq for b in self.batches)

    @property
    def drop_bits(self) -> int:
        return self.N1 * sum(b.sq * b.skv for b in self.batches)


# --------------------------------------------------------------------------------------------------
# helpers


def _dtype_name(a: np.ndarray, param: str, float64_ok: bool = False) -> str:
    if float64_ok and a.dtype == np.float64:
        return "float64"  # the float64 oracle only (gradcheck through target="reference")
    name = DTYPE_NAMES.get(a.dtype)
    if name is None:
        raise invalid(param, f"dtype {a.dtype} not supported (float16, bfloat16 or float32)")
    return name


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _int_scalar(x: Any, param: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise invalid(param, f"must be an integer, got {x!r}")
    if not INT64_MIN <= int(x) <= INT64_MAX:
        raise invalid(param, f"must fit in int64, got {int(x)}")
    return int(x)


def _float_scalar(x: Any, param: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise invalid(param, f"must be a number, got {x!r}")
    v = float(x)
    if not math.isfinite(v):
        raise invalid(param, f"must be finite, got {v}")
    return v


def _int_array(x: Any, param: str) -> np.ndarray:
    """np.asarray of a small host integer argument (prefix, sequence ends, start index arrays).

    Ragged lists, masked arrays and objects NumPy cannot convert are FagErrors, not raw NumPy errors."""
    if isinstance(x, np.ma.MaskedArray):
        raise invalid(param, MASKED_ARRAY_RULE)
    try:
        a = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is a user input problem
        raise invalid(param, f"cannot be converted to an integer array: {exc}") from None
    if a.dtype.kind not in "iu":
        raise invalid(param, f"must be an integer array, got dtype {a.dtype}")
    return a


def _first_int(x: Any, param: str) -> int:
    """q_start_idx / kv_start_idx: the first element of an optional int array (0 if absent), in int32."""
    if x is None:
        return 0
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        v = _int_scalar(x, param)
    else:
        a = _int_array(x, param)
        if a.size < 1:
            raise invalid(param, "must be a non-empty integer array")
        v = _int_scalar(a.reshape(-1)[0], param)
    if not INT32_MIN <= v <= INT32_MAX:
        raise invalid(param, f"must lie in the int32 range [{INT32_MIN}, {INT32_MAX}], got {v}")
    return v


def _seq_array(x: Any, param: str) -> np.ndarray:
    a = _int_array(x, param)
    if a.ndim != 1 or a.size < 1:
        raise invalid(param, "must be a 1-D non-empty integer array of cumulative sequence ends")
    if a.dtype == np.uint64 and np.any(a > np.uint64(INT64_MAX)):
        raise invalid(param, "cumulative sequence ends must fit in int64")
    a = a.astype(np.int64)
    if a[0] < 0 or np.any(np.diff(a) < 0):
        raise invalid(param, "cumulative sequence ends must be non-negative and non-decreasing")
    return a


def _split_heads(layout: str, shape: tuple[int, ...], N: int | None, D: int | None, param: str,
                 n_default: int | None = None):
    """(B, S, N, D) of a tensor in a padded layout; for BSH/SBH either N or D must be given.

    `n_default`: the head count to assume for a BSH/SBH tensor with H == 0 and D == 0 (an all-empty call,
    where the head count cannot be derived from the hidden size)."""
    if layout in ("BSH", "SBH"):
        if len(shape) != 3:
            raise invalid(param, f"layout {layout} needs a 3-D tensor, got shape {shape}")
        (B, S, H) = shape if layout == "BSH" else (shape[1], shape[0], shape[2])
        if N is not None:
            if N <= 0 or H % N:
                raise invalid(param, f"hidden size {H} is not divisible by head_num {N}")
            D = H // N
        elif D == 0 and H == 0 and n_default is not None:
            N = n_default
        else:
            if D is None or D <= 0 or H % D:
                raise invalid(param, f"hidden size {H} is not a multiple of the head dim {D}")
            N = H // D
        return B, S, N, D
    if layout in ("BSND", "BNSD"):
        if len(shape) != 4:
            raise invalid(param, f"layout {layout} needs a 4-D tensor, got shape {shape}")
        if layout == "BSND":
            B, S, n, d = shape
        else:
            B, n, S, d = shape
        return B, S, n, d
    # TND
    if len(shape) != 3:
        raise invalid(param, f"layout TND needs a 3-D tensor, got shape {shape}")
    T, n, d = shape
    return 1, T, n, d


def _compose(layout: str, B: int, S: int, N: int, D: int) -> tuple[int, ...]:
    return {
        "BSH": (B, S, N * D), "SBH": (S, B, N * D), "BSND": (B, S, N, D), "BNSD": (B, N, S, D),
        "TND": (S, N, D),
    }[layout]


_TRIU_CACHE: dict[str, np.ndarray] = {}


def _compressed(kind: str) -> np.ndarray:
    if kind not in _TRIU_CACHE:
        from .masks import compressed_causal_mask, compressed_prefix_mask

        m = compressed_causal_mask() if kind == "causal" else compressed_prefix_mask()
        _TRIU_CACHE[kind] = m.view(np.uint8)
    return _TRIU_CACHE[kind]


# --------------------------------------------------------------------------------------------------


def validate(
    direction: str,
    query: np.ndarray | None,
    key: np.ndarray | None,
    value: np.ndarray | None,
    dy: np.ndarray | None = None,
    *,
    head_num: Any,
    input_layout: Any,
    pse_shift: np.ndarray | None = None,
    drop_mask: np.ndarray | None = None,
    padding_mask: np.ndarray | None = None,
    atten_mask: np.ndarray | None = None,
    softmax_max: np.ndarray | None = None,
    softmax_sum: np.ndarray | None = None,
    softmax_in: np.ndarray | None = None,
    attention_in: np.ndarray | None = None,
    prefix: Any = None,
    actual_seq_qlen: Any = None,
    actual_seq_kvlen: Any = None,
    scale_value: Any = 1.0,
    keep_prob: Any = 1.0,
    pre_tokens: Any = INT32_MAX,
    next_tokens: Any = INT32_MAX,
    inner_precise: Any = 0,
    sparse_mode: Any = 0,
    pse_type: Any = 1,
    q_start_idx: Any = None,
    kv_start_idx: Any = None,
    deterministic: bool = False,
    target: str = "llvm",
    strict: bool = False,
) -> OpConfig:
    """Check every argument (SPEC A8, §11) and return the canonical OpConfig.

    `strict=True` is the C-style mirror (fag_tvm.aclnn): attention_in / softmax stats are required."""
    bwd = direction == "bwd"
    # ---- presence (161001) ----
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t is None:
            raise nullptr(name)
    if bwd:
        if dy is None:
            raise nullptr("dy")
        stats = {"softmax_max": softmax_max, "softmax_sum": softmax_sum, "attention_in": attention_in}
        missing = [k for k, v in stats.items() if v is None]
        if strict and missing:
            raise nullptr(missing[0])
        if missing and len(missing) != 3:
            raise nullptr(missing[0] + " (softmax_max, softmax_sum and attention_in go together; pass all"
                          " three or none to let the backward recompute them)")
        stats_given = not missing
    else:
        stats_given = False

    # ---- scalars ----
    if not isinstance(target, str) or not target:
        raise invalid("target", f"must be a target name (fag_tvm.targets.names()), got {target!r}")
    if not isinstance(input_layout, str) or input_layout not in LAYOUTS:
        raise invalid("input_layout", f"must be one of {', '.join(LAYOUTS)}, got {input_layout!r}")
    layout = input_layout
    N1 = _int_scalar(head_num, "head_num")
    if N1 <= 0:
        raise invalid("head_num", f"must be > 0, got {N1}")
    scale = _float_scalar(scale_value, "scale_value")
    if abs(scale) > FLT_MAX or 0.0 < abs(scale) < FLT_MIN:
        # the kernels multiply in fp32: the value must be 0 or a normal fp32 (no inf, no denormal)
        raise invalid("scale_value", f"must be 0 or a normal fp32 value ({FLT_MIN:.6g} <= |scale| <= "
                      f"{FLT_MAX:.8g}), got {scale!r}")
    keep = _float_scalar(keep_prob, "keep_prob")
    if not (0.0 < keep <= 1.0):
        raise invalid("keep_prob", f"must be in (0, 1], got {keep}")
    if keep < FLT_MIN:
        # fp32 keep_prob and 1/keep_prob must both be finite normal numbers
        raise invalid("keep_prob", f"must be >= FLT_MIN = 2**-126 ({FLT_MIN:.6g}) so that keep_prob and "
                      f"1/keep_prob are finite normal fp32 values, got {keep!r}")
    pre_t = _int_scalar(pre_tokens, "pre_tokens")
    next_t = _int_scalar(next_tokens, "next_tokens")
    ip = _int_scalar(inner_precise, "inner_precise")
    if ip not in (0, 1, 2):  # 0/1 reserved (behave alike); 2 = invalid-line handling (SPEC §8)
        raise invalid("inner_precise", f"must be 0, 1 or 2, got {ip}")
    mode = _int_scalar(sparse_mode, "sparse_mode")
    if not 0 <= mode <= 8:
        raise invalid("sparse_mode", f"must be in [0, 8], got {mode}")
    if mode in (7, 8) and layout != "TND":
        raise invalid("sparse_mode", f"sparse_mode {mode} is only valid with input_layout TND")
    ptype = _int_scalar(pse_type, "pse_type")
    if not 0 <= ptype <= 3:
        raise invalid("pse_type", f"must be in [0, 3], got {ptype}")
    if pse_shift is None and ptype != 1:
        raise invalid("pse_type", f"pse_type {ptype} needs pse_shift; without pse only pse_type 1 is valid")
    q_start = _first_int(q_start_idx, "q_start_idx")
    kv_start = _first_int(kv_start_idx, "kv_start_idx")
    if padding_mask is not None:
        raise unsupported("padding_mask", "reserved in CANN (not used by the operator); pass None")
    if not isinstance(deterministic, (bool, np.bool_)):
        raise invalid("deterministic", "must be a bool")
    if layout != "TND":
        for name, x in (("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
            if x is not None:
                raise invalid(name, f"only valid with input_layout TND (got layout {layout}); pass None")

    # ---- dtypes ----
    f64 = target == "reference-f64"  # the oracle at its own precision (torch.autograd.gradcheck)
    dtype = _dtype_name(query, "query", f64)
    same_dtype = [("key", key), ("value", value)]
    if bwd:
        same_dtype.append(("dy", dy))
        if attention_in is not None:
            same_dtype.append(("attention_in", attention_in))
    for name, t in same_dtype:
        if _dtype_name(t, name, f64) != dtype:
            raise invalid(name, f"dtype {t.dtype} differs from query dtype {query.dtype}")

    # ---- ranks and shapes ----
    min_rank = 4 if layout in ("BSND", "BNSD") else 3
    for name, t in [("query", query), ("key", key), ("value", value)] + ([("dy", dy)] if bwd else []) + (
            [("attention_in", attention_in)] if attention_in is not None else []):
        if t.ndim < 3:
            raise invalid(name, f"rank must be >= 3, got shape {tuple(t.shape)}")
        if t.ndim != min_rank:
            raise invalid(name, f"layout {layout} needs a {min_rank}-D tensor, got shape {tuple(t.shape)}")

    # q, k and v all empty: early success (SPEC §11) after the same consistency rules; only the rules that
    # need a non-zero size (B, Sq, Skv, D > 0) are skipped.
    empty = query.size == 0 and key.size == 0 and value.size == 0
    bsh = layout in ("BSH", "SBH")
    B, Sq, nq, D = _split_heads(layout, tuple(query.shape), N1, None, "query")
    if not bsh and nq != N1:
        raise invalid("head_num", f"head_num {N1} differs from the query's head count {nq}")
    n_default = N1 if empty else None
    Bk, Skv, N2, Dk = _split_heads(layout, tuple(key.shape), None, D if bsh else None, "key", n_default)
    if not bsh and Dk != D:
        raise invalid("key", f"qD and kD should be same: query D={D}, key D={Dk}")
    if not empty:
        if D == 0 or Dk == 0:
            raise invalid("query", "head dim D must be > 0")
        if min(B, N1, Sq) == 0:
            raise invalid("query", f"B, N1, Sq and D must all be > 0, got shape {tuple(query.shape)}")
    if Bk != B:
        raise invalid("key", f"batch {Bk} differs from query batch {B}")
    if not empty and min(Skv, N2) == 0:
        raise invalid("key", f"Skv and N2 must be > 0, got shape {tuple(key.shape)}")
    if N2 <= 0 or N1 % N2:
        raise invalid("key", f"query heads {N1} must be a multiple of key heads {N2} (GQA)")
    Bv, Sv, Nv, Dv = _split_heads(layout, tuple(value.shape), N2 if bsh else None, None, "value")
    if (Bv, Sv, Nv) != (B, Skv, N2) or (Dv == 0 and not empty):
        raise invalid("value", f"shape {tuple(value.shape)} must equal key's {tuple(key.shape)} except in D")
    if Dv > D:
        raise invalid("value", f"qD must be >= vD: D={D}, Dv={Dv}")
    if B > MAX_B:
        raise invalid("query", f"batch {B} exceeds the documented maximum {MAX_B}")
    if N1 > MAX_N or N2 > MAX_N:
        raise invalid("head_num", f"head count exceeds the documented maximum {MAX_N}")
    if layout != "TND" and (Sq > MAX_S or Skv > MAX_S):  # TND: per sequence, below
        raise invalid("query" if Sq > MAX_S else "key", f"sequence length exceeds the documented maximum {MAX_S}")
    if D > MAX_D:
        raise invalid("query", f"head dim {D} exceeds the documented maximum {MAX_D}")

    dy_shape = _compose(layout, B, Sq, N1, Dv)
    if bwd:
        if tuple(dy.shape) != dy_shape:
            raise invalid("dy", f"shape {tuple(dy.shape)} must be query's shape with D->Dv, i.e. {dy_shape}")
        if attention_in is not None and tuple(attention_in.shape) != dy_shape:
            raise invalid("attention_in", f"shape {tuple(attention_in.shape)} must equal dy's shape {dy_shape}")

    # ---- per-batch sequence lengths ----
    if layout == "TND":
        if actual_seq_qlen is None:
            raise invalid("actual_seq_qlen", "required for layout TND")
        if actual_seq_kvlen is None:
            raise invalid("actual_seq_kvlen", "required for layout TND")
        cq = _seq_array(actual_seq_qlen, "actual_seq_qlen")
        ck = _seq_array(actual_seq_kvlen, "actual_seq_kvlen")
        if cq.size != ck.size:
            raise invalid("actual_seq_kvlen", f"length {ck.size} differs from actual_seq_qlen length {cq.size}")
        if cq[-1] != Sq:
            raise invalid("actual_seq_qlen", f"last cumulative length {cq[-1]} must equal T={Sq} of query")
        if ck[-1] != Skv:
            raise invalid("actual_seq_kvlen", f"last cumulative length {ck[-1]} must equal T={Skv} of key")
        lq = np.diff(np.concatenate([[0], cq]))
        lk = np.diff(np.concatenate([[0], ck]))
        n_batch = int(cq.size)
        while n_batch > 1 and lq[n_batch - 1] == 0 and lk[n_batch - 1] == 0:
            n_batch -= 1  # trailing empty batches are dropped (CANN)
        lq, lk = lq[:n_batch], lk[:n_batch]
        limit = MAX_TND_BATCH_PREFIX if mode == 6 else MAX_TND_BATCH
        if n_batch > limit:
            raise invalid("actual_seq_qlen", f"at most {limit} sequences are supported, got {n_batch}")
        T, T2 = Sq, Skv
        Bn = n_batch
        seqs = [(int(lq[b]), int(lk[b]), int(cq[b] - lq[b]), int(ck[b] - lk[b])) for b in range(Bn)]
        Sq_max, Skv_max = int(lq.max()), int(lk.max())
        if Sq_max > MAX_S:  # the documented S limit is per sequence; T itself is bounded below
            raise invalid("actual_seq_qlen", f"sequence length {Sq_max} exceeds the documented maximum {MAX_S}")
        if Skv_max > MAX_S:
            raise invalid("actual_seq_kvlen", f"sequence length {Skv_max} exceeds the documented maximum {MAX_S}")
    else:
        T = T2 = 0
        Bn = B
        seqs = [(Sq, Skv, 0, 0)] * B
        Sq_max, Skv_max = Sq, Skv
    _check_element_counts(layout, B, Sq, Skv, N1, N2, D, seqs)
    if abs(kv_start - q_start) + max(Sq_max, Skv_max) > MAX_ALIBI_DISTANCE:
        raise invalid("kv_start_idx" if kv_start_idx is not None else "q_start_idx",
                      f"|kv_start_idx - q_start_idx| + max(Sq, Skv) = |{kv_start} - {q_start}| + "
                      f"{max(Sq_max, Skv_max)} must be <= 2**24 (q_start_idx/kv_start_idx: int32 each, and every "
                      "alibi distance an integer exactly representable in fp32)")

    # ---- softmax stats ----
    if bwd and stats_given:
        st_shape = (T, N1, 8) if layout == "TND" else (B, N1, Sq, 8)
        for name, t in (("softmax_max", softmax_max), ("softmax_sum", softmax_sum)):
            if t.dtype != np.float32 and not (dtype == "float64" and t.dtype == np.float64):
                raise invalid(name, f"dtype must be float32, got {t.dtype}")
            if tuple(t.shape) != st_shape:
                raise invalid(name, f"shape {tuple(t.shape)} must be {st_shape}")

    # ---- atten_mask, sparse mode, tokens, prefix ----
    mask_form = "none"
    full_mask = False
    prefix_t: tuple[int, ...] | None = None
    if prefix is not None and (_int_array(prefix, "prefix").ndim > 1):  # typed even where it is ignored
        raise invalid("prefix", "must be a 1-D integer array")
    if atten_mask is not None:
        if atten_mask.dtype not in (np.bool_, np.uint8):
            raise invalid("atten_mask", f"dtype must be bool or uint8, got {atten_mask.dtype}")
        ms = tuple(atten_mask.shape)
        if mode in (0, 1, 5):
            if layout == "TND":
                if mode == 5:
                    raise invalid("sparse_mode", "sparse_mode 5 is not supported with layout TND")
                allowed = {(Sq_max, Skv_max): "SS", (1, 1, Sq_max, Skv_max): "11SS"}
            elif mode == 5:
                allowed = {(B, 1, Sq, Skv): "B1SS", (B, N1, Sq, Skv): "BNSS"}
            else:
                allowed = {(Sq, Skv): "SS", (1, 1, Sq, Skv): "11SS", (B, 1, Sq, Skv): "B1SS",
                           (B, N1, Sq, Skv): "BNSS"}
            if ms not in allowed:
                raise invalid("atten_mask", f"shape {ms} invalid for sparse_mode {mode}; expected one of "
                              f"{sorted(allowed)}")
            mask_form = allowed[ms]
            full_mask = True
        elif mode == 6:
            if ms != (3072, 2048):
                raise invalid("atten_mask", f"sparse_mode 6 needs the compressed (3072, 2048) prefix mask, got {ms}")
            if not np.array_equal(atten_mask.view(np.uint8), _compressed("prefix")):
                raise invalid("atten_mask", "sparse_mode 6 mask content must be vstack(triu(ones(2048,2048),1), "
                              "hstack(zeros(1024,1024), ones(1024,1024)))")
            mask_form = "compressed_prefix"
        else:
            if ms != (2048, 2048):
                raise invalid("atten_mask", f"sparse_mode {mode} needs the compressed (2048, 2048) mask, got {ms}")
            if not np.array_equal(atten_mask.view(np.uint8), _compressed("causal")):
                raise invalid("atten_mask", f"sparse_mode {mode} mask content must be triu(ones(2048,2048), 1)")
            mask_form = "compressed"
        if mode in (5, 6):
            if prefix is None:
                raise invalid("prefix", f"sparse_mode {mode} requires prefix")
            pa = _int_array(prefix, "prefix")
            if pa.ndim != 1:
                raise invalid("prefix", "must be a 1-D integer array")
            if pa.size != Bn:
                raise invalid("prefix", f"length {pa.size} must equal the batch size {Bn}")
            if Bn > MAX_B_PREFIX:
                raise invalid("query", f"batch {Bn} exceeds the maximum {MAX_B_PREFIX} with prefix")
            prefix_t = tuple(int(v) for v in pa)
            for b, (sq_b, skv_b, _, _) in enumerate(seqs):
                lo = 0 if sq_b > skv_b else skv_b - sq_b
                if not lo <= prefix_t[b] <= skv_b:
                    raise invalid("prefix", f"prefix[{b}]={prefix_t[b]} must be in [{lo}, {skv_b}]")

    batches = _structural_rules(layout, mode, atten_mask is not None, seqs, pre_t, next_t, prefix_t)
    band = any(_rule_masks_something(bi) for bi in batches)

    # ---- pse ----
    pse_form = "none"
    if pse_shift is not None:
        pse_form = _check_pse(pse_shift, ptype, dtype, layout, mode, atten_mask is not None, B, N1, Sq, Skv,
                              T2, seqs, batches, q_start, kv_start, empty)

    # ---- dropout ----
    dropout = keep < 1.0
    if dropout:
        if drop_mask is None:
            raise invalid("drop_mask", f"required when keep_prob < 1 (keep_prob={keep})")
        if drop_mask.dtype != np.uint8:
            raise invalid("drop_mask", f"dtype must be uint8 (bit-packed), got {drop_mask.dtype}")
        bits = N1 * sum(s[0] * s[1] for s in seqs)
        if drop_mask.size < (bits + 7) // 8:
            raise invalid("drop_mask", f"has {drop_mask.size} bytes, needs at least ceil({bits}/8)={(bits + 7) // 8}")

    # ---- forward invalid rows (SPEC §8) ----
    invalid_rows = ip == 2 or any(_has_empty_row(bi) for bi in batches)

    return OpConfig(
        direction=direction, layout=layout, dtype=dtype, B=Bn, N1=N1, N2=N2, Sq=Sq_max, Skv=Skv_max, D=D, Dv=Dv,
        batches=batches, scale=scale, keep_prob=keep, sparse_mode=mode, mask_form=mask_form, band=band,
        full_mask=full_mask, pse_type=ptype, pse_form=pse_form, q_start=q_start, kv_start=kv_start,
        dropout=dropout, invalid_rows=invalid_rows, stats_given=stats_given, deterministic=bool(deterministic),
        target=target, T=T, T2=T2, prefix=prefix_t, empty=empty)


def _check_element_counts(layout: str, B: int, Sq: int, Skv: int, N1: int, N2: int, D: int, seqs) -> None:
    """Sanity limit (MAX_ELEMENTS = 2**62) on logical element counts, so that no int64 offset can overflow.

    The documented S <= 1M applies per sequence; packed TND totals T, T2 are only bounded by this limit
    (and the sequence-count limit), as are the score elements N1·ΣSq_b·Skv_b (dropout bits, pse, mask)."""
    q_rows, kv_rows = (Sq, Skv) if layout == "TND" else (B * Sq, B * Skv)
    counts = (("query", q_rows * N1 * D), ("key", kv_rows * N2 * D),
              ("actual_seq_qlen" if layout == "TND" else "query", N1 * sum(s[0] * s[1] for s in seqs)))
    for name, n in counts:
        if n >= MAX_ELEMENTS:
            raise invalid(name, f"{n} logical elements (tensor or N1·ΣSq_b·Skv_b score elements) exceed the "
                          f"sanity limit 2**62 that keeps every int64 offset safe")


def _structural_rules(layout, mode, has_mask, seqs, pre, nxt, prefix) -> tuple[BatchInfo, ...]:
    """Per-batch (pre, next, prefix) in left-up origin, after CANN's sparse-mode conversions (SPEC §5)."""
    out = []
    tnd = layout == "TND"
    nonempty = [b for b, s in enumerate(seqs) if s[0] != 0]
    band_idx = None
    if mode == 7 and nonempty:
        band_idx = nonempty[-1]
    if mode == 8 and nonempty:
        band_idx = nonempty[0]
    for b, (sq, skv, q0, k0) in enumerate(seqs):
        delta = skv - sq
        p, n, pf = INT32_MAX, INT32_MAX, 0
        if has_mask:
            if mode == 0:
                p, n = pre, nxt
            elif mode == 2:
                n = 0
            elif mode == 3:
                n = delta
            elif mode == 4:
                p, n = pre - delta, nxt + delta
            elif mode in (5, 6):
                n, pf = delta, prefix[b]
            elif mode == 7:
                if b == band_idx:
                    p, n = pre - delta, nxt + delta
                else:
                    n = delta
            elif mode == 8:
                if b == band_idx:
                    p, n = pre - delta, nxt + delta
                else:
                    n = 0
            if mode in (0, 4) or (mode in (7, 8) and b == band_idx):
                _check_tokens(p, n, sq, skv, tnd)  # on the exact (Python int) converted tokens
                p, n = _clamp_tokens(p, n, sq, skv)
        out.append(BatchInfo(sq=sq, skv=skv, q_row0=q0, kv_row0=k0, pre=p, next=n, prefix=pf))
    return tuple(out)


def _check_tokens(p: int, n: int, sq: int, skv: int, tnd: bool) -> None:
    """SPEC §5 token validity, on the converted (left-up origin) tokens."""
    if -p > skv:
        raise invalid("pre_tokens", f"converted pre_tokens {p} is below -Skv ({skv}): every row would be masked")
    if -n > sq:
        raise invalid("next_tokens", f"converted next_tokens {n} is below -Sq ({sq}): every row would be masked")
    if (p + n <= 0) if tnd else (p + n < 0):
        raise invalid("pre_tokens", f"pre_tokens + next_tokens after conversion ({p} + {n}) must be "
                      f"{'> 0' if tnd else '>= 0'}")


def _clamp_tokens(p: int, n: int, sq: int, skv: int) -> tuple[int, int]:
    """Converted tokens clamped to an equivalent small range, so no int64 band arithmetic can overflow.

    visible(i,j) = (j-i <= next and i-j <= pre) or j < prefix, with i in [0,sq), j in [0,skv): every
    next >= skv-1 behaves like next = skv, every pre >= sq-1 like pre = sq; below, next < -(sq-1) and
    pre < -(skv-1) mask everything (validation already bounds them by -sq and -skv)."""
    return max(min(p, sq), -(skv + 1)), max(min(n, skv), -(sq + 1))


def _rule_masks_something(bi: BatchInfo) -> bool:
    if bi.sq == 0 or bi.skv == 0 or bi.prefix >= bi.skv:
        return False
    return bi.next < bi.skv - 1 or bi.pre < bi.sq - 1


def _has_empty_row(bi: BatchInfo) -> bool:
    """A row with no visible column under the structural rule (drives CANN's auto invalid-line mode)."""
    if bi.sq == 0:
        return False
    if bi.skv == 0:
        return True
    if bi.prefix > 0:
        return False
    return bi.next < 0 or bi.pre < bi.sq - bi.skv


def _check_pse(pse, ptype, dtype, layout, mode, has_mask, B, N1, Sq, Skv, T2, seqs, batches, q_start,
               kv_start, empty: bool = False) -> str:
    shape = tuple(pse.shape)
    if ptype in (2, 3):
        if pse.dtype != np.float32 and not (dtype == "float64" and pse.dtype == np.float64):
            raise invalid("pse_shift", f"pse_type {ptype} takes float32 alibi slopes, got {pse.dtype}")
        Bn = len(seqs)
        if shape == (N1,):
            form = "slopes_N"
        elif shape == (Bn, N1):
            form = "slopes_BN"
        else:
            raise invalid("pse_shift", f"pse_type {ptype} slopes must have shape ({N1},) or ({Bn}, {N1}), got {shape}")
        if mode == 7 and has_mask:
            raise invalid("pse_type", "pse_type 2/3 is not allowed with sparse_mode 7")
        if mode == 8 and has_mask:
            ok = all(s[0] == s[1] for s in seqs) and seqs[0][0] - seqs[0][1] + q_start - kv_start == 0
            if not ok:
                raise invalid("pse_type", "pse_type 2/3 with sparse_mode 8 needs Sq_b == Skv_b for every batch "
                              "and actSeqQ[0]-actSeqKv[0]+q_start-kv_start == 0")
        if layout == "TND" and not empty and any(s[0] == 0 or s[1] == 0 for s in seqs):
            raise unsupported("pse_shift", "pse with zero-length TND sequences")
        return form
    if (DTYPE_NAMES.get(pse.dtype) if pse.dtype != np.float64 else "float64") != dtype:
        raise invalid("pse_shift", f"pse_type {ptype} pse dtype must equal query dtype {dtype}, got {pse.dtype}")
    if mode == 7 and has_mask:
        raise invalid("pse_shift", "sparse_mode 7 does not take pse")
    if layout == "TND":
        if not empty and any(s[0] == 0 or s[1] == 0 for s in seqs):
            raise unsupported("pse_shift", "pse with zero-length TND sequences")
        Bn = len(seqs)
        bnss = N1 * sum(s[0] * s[1] for s in seqs)
        bn1s = N1 * T2
        if pse.ndim == 1 and pse.size == bnss:
            return "TND_BNSS"
        if pse.ndim == 1 and pse.size == bn1s:
            return "TND_BN1S"
        Skv_max = max(s[1] for s in seqs)
        if shape in ((Bn, N1, ALIBI_ROWS, Skv_max), (1, N1, ALIBI_ROWS, Skv_max)):
            if not has_mask or mode not in (2, 3, 8) and not (mode == 0 and _causal_tokens(batches, True)):
                raise invalid("pse_shift", "the alibi-compressed pse form needs a causal sparse_mode (2, 3, 8, or 0 "
                              "with causal tokens) and an atten_mask")
            return "BNHS" if shape[0] == Bn and Bn != 1 else "1NHS"
        raise invalid("pse_shift", f"shape {shape} invalid for TND: expected 1-D ({bnss},) or ({bn1s},), or "
                      f"({Bn}|1, {N1}, 1024, {Skv_max})")
    if len(shape) != 4:
        raise invalid("pse_shift", f"pse must be 4-D, got shape {shape}")
    if shape == (B, N1, Sq, Skv):
        return "BNSS"
    if shape == (1, N1, Sq, Skv):
        return "1NSS"
    if shape == (B, N1, 1, Skv):
        return "BN1S"
    if shape in ((B, N1, ALIBI_ROWS, Skv), (1, N1, ALIBI_ROWS, Skv)):
        if not (Sq == Skv and Sq >= ALIBI_ROWS and has_mask and _causal_tokens(batches, False)):
            raise invalid("pse_shift", "the alibi-compressed (…, 1024, Skv) pse needs Sq == Skv >= 1024, an "
                          "atten_mask and causal tokens (sparse_mode 2/3, or 0 with pre >= Sq and next == 0)")
        if any(bi.prefix > 0 for bi in batches):
            # a prefix unmasks cells above the diagonal, where the compressed form holds no value (SPEC §4)
            raise unsupported("pse_shift", "the alibi-compressed pse with sparse_mode 5/6 and a prefix > 0")
        return "BNHS" if shape[0] == B and B != 1 else "1NHS"
    raise invalid("pse_shift", f"shape {shape} invalid: expected ({B},{N1},{Sq},{Skv}), (1,{N1},{Sq},{Skv}), "
                  f"({B},{N1},1,{Skv}) or the alibi-compressed ({B}|1,{N1},1024,{Skv})")


def _causal_tokens(batches, tnd: bool) -> bool:
    return all(bi.next == (bi.skv - bi.sq if tnd else 0) or bi.next == 0 for bi in batches if bi.sq) and all(
        bi.pre >= bi.sq for bi in batches if bi.sq)


# --------------------------------------------------------------------------------------------------
# memory


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def output_sizes(cfg: OpConfig, forward: bool, backward: bool) -> list[tuple[str, str, int]]:
    """(output, input parameter it derives from, bytes) of every output a call allocates."""
    it = _ITEMSIZE[cfg.dtype]
    q_rows = cfg.T if cfg.tnd else cfg.B * cfg.Sq
    kv_rows = cfg.T2 if cfg.tnd else cfg.B * cfg.Skv
    out: list[tuple[str, str, int]] = []
    if forward:
        stat = q_rows * cfg.N1 * 8 * 4
        out += [("attention_out", "query", q_rows * cfg.N1 * cfg.Dv * it), ("softmax_max", "query", stat),
                ("softmax_sum", "query", stat)]
    if backward:
        out += [("dq", "query", q_rows * cfg.N1 * cfg.D * it), ("dk", "key", kv_rows * cfg.N2 * cfg.D * it),
                ("dv", "value", kv_rows * cfg.N2 * cfg.Dv * it)]
        if cfg.dpse_computed:
            n = {"BNSS": cfg.B * cfg.N1 * cfg.Sq * cfg.Skv, "1NSS": cfg.N1 * cfg.Sq * cfg.Skv,
                 "BN1S": cfg.B * cfg.N1 * cfg.Skv, "TND_BNSS": cfg.N1 * sum(b.sq * b.skv for b in cfg.batches),
                 "TND_BN1S": cfg.N1 * cfg.T2}[cfg.pse_form]
            out.append(("dpse", "pse_shift", n * it))
    return out


@functools.lru_cache(maxsize=None)
def machine_memory() -> int:
    """Total memory of this machine in bytes (read once: it does not change while a process runs)."""
    import psutil

    return int(psutil.virtual_memory().total)


def check_output_memory(cfg: OpConfig, forward: bool, backward: bool) -> None:
    """Refuse (161002) a call whose outputs alone exceed this machine's memory, before anything is allocated.

    Zero-stride (broadcast) inputs can describe enormous logical shapes; without this check the output
    allocation would fail later with a raw MemoryError."""
    sizes = output_sizes(cfg, forward, backward)
    total = sum(n for _, _, n in sizes)
    mem = machine_memory()
    if total > mem:
        name, param, n = max(sizes, key=lambda x: x[2])
        parts = ", ".join(f"{o} {b}" for o, _, b in sizes)
        raise invalid(param, f"the outputs need {total} bytes ({parts}; largest: {name} from {param}), more than "
                      f"this machine's memory ({mem} bytes)")
