"""Workloads (DESIGN): the JSON objects `compile`/`tune`/`bench` take, the CPU suite S1–S9, their
configs, FLOP counts and random call arguments (the one synthesiser tuning and benchmarks share).

A workload is validated exactly like a call (through `config.validate` on zero-stride stand-in arrays),
so a workload names the same kernels a real call with those shapes would need."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .arrays import NAME_TO_DTYPE
from .config import MAX_B, OpConfig, validate
from .errors import invalid

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float32": "float32",
                 "float16": "float16", "bfloat16": "bfloat16"}
REQUIRED = ("B", "N1", "N2", "Sq", "Skv", "D", "Dv", "input_layout", "dtype", "sparse_mode")
OPTIONAL = ("pse", "keep_prob", "pse_type", "mask", "id")
_SIZES = ("B", "N1", "N2", "Sq", "Skv", "D", "Dv")
MAX_SIZE = 2 ** 31  # far above every documented limit; keeps the stand-in host arrays' arithmetic in int64

SUITE: dict[str, dict[str, Any]] = {
    sid: {"B": B, "N1": nq, "N2": nkv, "Sq": sq, "Skv": skv, "D": d, "Dv": d, "input_layout": "BNSD",
          "dtype": dt, "sparse_mode": 3 if causal else 0}
    for sid, (B, nq, nkv, sq, skv, d, causal, dt) in {
        "S1": (1, 8, 8, 1024, 1024, 64, False, "float32"),
        "S2": (1, 8, 8, 1024, 1024, 64, True, "float32"),
        "S3": (1, 8, 8, 2048, 2048, 128, True, "float32"),
        "S4": (1, 32, 8, 1024, 1024, 128, True, "float32"),
        "S5": (2, 16, 16, 512, 512, 128, False, "float32"),
        "S6": (1, 2, 2, 8192, 8192, 128, True, "float32"),
        "S7": (1, 8, 8, 512, 2048, 64, False, "float32"),
        "S8": (1, 4, 4, 1000, 1000, 64, True, "float32"),
        "S9": (1, 8, 8, 2048, 2048, 128, True, "bfloat16"),
    }.items()
}


PSE_SHAPES = {"BNSS": lambda B, N, Sq, Skv: (B, N, Sq, Skv), "1NSS": lambda B, N, Sq, Skv: (1, N, Sq, Skv),
              "BN1S": lambda B, N, Sq, Skv: (B, N, 1, Skv), "BNHS": lambda B, N, Sq, Skv: (B, N, 1024, Skv),
              "1NHS": lambda B, N, Sq, Skv: (1, N, 1024, Skv), "slopes_N": lambda B, N, Sq, Skv: (N,),
              "slopes_BN": lambda B, N, Sq, Skv: (B, N)}


def layout_shape(layout: str, B: int, S: int, N: int, d: int) -> tuple[int, ...]:
    """Shape of a q-like tensor in a layout (TND: B sequences of length S packed)."""
    return {"BSH": (B, S, N * d), "SBH": (S, B, N * d), "BSND": (B, S, N, d), "BNSD": (B, N, S, d),
            "TND": (B * S, N, d)}.get(layout, (B, N, S, d))


def _stand_in(shape: tuple[int, ...], dtype) -> np.ndarray:
    try:
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)
    except (ValueError, OverflowError, MemoryError) as e:  # a logical shape NumPy cannot describe
        raise invalid("workload", f"shape {shape} cannot be represented: {e}") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_workload(w: Any) -> None:
    """Reject (FagError 161002) anything but a JSON object with exactly the known keys and sane value types.

    A typo such as `sparse_mod` would otherwise be ignored silently and compile a different kernel."""
    if not isinstance(w, dict):
        raise invalid("workload", f"must be a JSON object, got {type(w).__name__}: {w!r:.200}")
    unknown = sorted(str(k) for k in w if k not in REQUIRED + OPTIONAL)
    if unknown:
        raise invalid("workload", f"unknown keys {unknown}; valid keys are {list(REQUIRED)} (required) and "
                      f"{list(OPTIONAL)} (optional)")
    missing = [k for k in REQUIRED if k not in w]
    if missing:
        raise invalid("workload", f"missing fields {missing} in {w}")
    for k in _SIZES + ("sparse_mode",):
        if not _is_int(w[k]):
            raise invalid(f"workload.{k}", f"must be an integer, got {w[k]!r}")
    for k in _SIZES:
        if not 1 <= w[k] <= MAX_SIZE:
            raise invalid(f"workload.{k}", f"must be in [1, 2**31], got {w[k]}")
    if w["B"] > MAX_B:  # before any per-batch host array is built
        raise invalid("workload.B", f"batch {w['B']} exceeds the documented maximum {MAX_B}")
    for k in ("input_layout", "dtype"):
        if not isinstance(w[k], str):
            raise invalid(f"workload.{k}", f"must be a string, got {w[k]!r}")
    if "pse_type" in w and not _is_int(w["pse_type"]):
        raise invalid("workload.pse_type", f"must be an integer, got {w['pse_type']!r}")
    if "keep_prob" in w:
        kp = w["keep_prob"]
        if isinstance(kp, bool) or not isinstance(kp, (int, float)) or not math.isfinite(_to_float(kp)):
            raise invalid("workload.keep_prob", f"must be a finite number, got {kp!r:.100}")
    if "pse" in w and w["pse"] is not None and not isinstance(w["pse"], str):
        raise invalid("workload.pse", f"must be a pse shape name (string) or null, got {w['pse']!r}")
    if "mask" in w and w["mask"] is not None and not isinstance(w["mask"], bool):
        raise invalid("workload.mask", f"must be true, false or null, got {w['mask']!r}")
    if "id" in w and w["id"] is not None and not isinstance(w["id"], (str, int)):
        raise invalid("workload.id", f"must be a string or an integer, got {w['id']!r}")


def _to_float(x: int | float) -> float:
    try:
        return float(x)
    except OverflowError:
        return math.inf


def load_workloads(arg: str) -> list[dict[str, Any]]:
    """A suite id (S1..S9), a comma list of ids, a JSON object/list, or a path to a JSON file."""
    ids = [s.strip() for s in arg.split(",")]
    if all(i in SUITE for i in ids):
        return [dict(SUITE[i], id=i) for i in ids]
    try:
        with open(arg) as f:
            text = f.read()
    except (OSError, ValueError):  # not a path (ValueError: e.g. an embedded NUL, undecodable bytes)
        text = arg
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise invalid("workload", f"not a suite id (S1..S9), JSON or a JSON file: {e}") from None
    out = data if isinstance(data, list) else [data]
    if not out:
        raise invalid("workload", "the workload list is empty")
    for w in out:
        check_workload(w)
    return out


def configs(w: dict[str, Any]) -> tuple[OpConfig, OpConfig]:
    """(forward config, backward config) of one workload."""
    from .masks import compressed_causal_mask, compressed_prefix_mask

    check_workload(w)
    dt_name = DTYPE_ALIASES.get(str(w["dtype"]))
    if dt_name is None:
        raise invalid("workload.dtype", f"unknown dtype {w['dtype']!r}")
    dt = NAME_TO_DTYPE[dt_name]
    B, N1, N2, Sq, Skv, D, Dv = (int(w[k]) for k in ("B", "N1", "N2", "Sq", "Skv", "D", "Dv"))
    L = w["input_layout"]
    mode = int(w["sparse_mode"])

    def shp(S, N, d):
        return layout_shape(L, B, S, N, d)

    kw: dict[str, Any] = dict(head_num=N1, input_layout=L, sparse_mode=mode,
                              keep_prob=float(w.get("keep_prob", 1.0)), pse_type=int(w.get("pse_type", 1)))
    if L == "TND":
        kw.update(actual_seq_qlen=np.arange(1, B + 1) * Sq, actual_seq_kvlen=np.arange(1, B + 1) * Skv)
    if mode in (2, 3, 4, 7, 8):
        kw["atten_mask"] = compressed_causal_mask()
    elif mode == 6:
        kw["atten_mask"] = compressed_prefix_mask()
    elif mode in (0, 1, 5) and w.get("mask", mode != 0):
        kw["atten_mask"] = _stand_in((B, 1, Sq, Skv) if mode == 5 else (Sq, Skv), np.bool_)
    if mode in (5, 6):
        kw["prefix"] = np.full(B, Skv, dtype=np.int64)
    if kw["keep_prob"] < 1.0:
        kw["drop_mask"] = _stand_in(((B * N1 * Sq * Skv + 7) // 8,), np.uint8)
    pse = w.get("pse")
    if pse:
        if pse not in PSE_SHAPES:
            raise invalid("workload.pse", f"unknown pse shape name {pse!r}; one of {sorted(PSE_SHAPES)}")
        kw["pse_shift"] = _stand_in(PSE_SHAPES[pse](B, N1, Sq, Skv), np.float32 if pse.startswith("slopes") else dt)
    q, k, v = _stand_in(shp(Sq, N1, D), dt), _stand_in(shp(Skv, N2, D), dt), _stand_in(shp(Skv, N2, Dv), dt)
    dy = _stand_in(shp(Sq, N1, Dv), dt)
    fwd = validate("fwd", q, k, v, **kw)
    st = (B * Sq, N1, 8) if L == "TND" else (B, N1, Sq, 8)
    bwd = validate("bwd", q, k, v, dy, softmax_max=_stand_in(st, np.float32), softmax_sum=_stand_in(st, np.float32),
                   attention_in=dy, **kw)
    return fwd, bwd


def flops(w: dict[str, Any], direction: str = "bwd") -> float:
    """DESIGN's convention: backward 2.5·4·B·N·Sq·Skv·D, forward 2·2·B·N·Sq·Skv·D; halved for causal."""
    causal = int(w["sparse_mode"]) in (2, 3)
    per = 2.5 * 4 if direction == "bwd" else 4.0
    return per * w["B"] * w["N1"] * w["Sq"] * w["Skv"] * w["D"] * (0.5 if causal else 1.0)


def canonical_workload(w: dict[str, Any]) -> dict[str, Any]:
    """The identity of a workload: required fields normalised, optional ones only when they matter."""
    out = {k: w[k] for k in REQUIRED}
    for k in ("B", "N1", "N2", "Sq", "Skv", "D", "Dv", "sparse_mode"):
        out[k] = int(out[k])
    out["dtype"] = DTYPE_ALIASES.get(str(out["dtype"]), str(out["dtype"]))
    for k in ("pse", "keep_prob", "pse_type", "mask"):
        if k in w and w[k] is not None:
            out[k] = w[k]
    if float(out.get("keep_prob", 1.0)) == 1.0:
        out.pop("keep_prob", None)
    return out


def workload_id(w: dict[str, Any]) -> str:
    """The suite id (S1..S9) of a workload with a suite shape, else a readable shape name."""
    if w.get("id"):
        return str(w["id"])
    c = canonical_workload(w)
    for sid, sw in SUITE.items():
        if canonical_workload(sw) == c:
            return sid
    return (f"B{c['B']}_N{c['N1']}x{c['N2']}_S{c['Sq']}x{c['Skv']}_D{c['D']}x{c['Dv']}_{c['input_layout']}_"
            f"{c['dtype']}_m{c['sparse_mode']}")


def shape_key(w: Any) -> tuple[int, ...]:
    """(B, N1, N2, Sq, Skv) of a workload dict or an OpConfig."""
    if isinstance(w, dict):
        return tuple(int(w[k]) for k in ("B", "N1", "N2", "Sq", "Skv"))
    return tuple(int(getattr(w, k)) for k in ("B", "N1", "N2", "Sq", "Skv"))


def call_args(w: dict[str, Any], seed: int = 0) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """(query, key, value, dy, keyword arguments) of a real call of workload `w` with random data (the
    arrays of `random_call`, the scalars of `configs`), for benchmarks and examples."""
    a = random_call(w, seed)
    B, Sq, Skv = int(w["B"]), int(w["Sq"]), int(w["Skv"])
    mode = int(w["sparse_mode"])
    kw: dict[str, Any] = dict(head_num=int(w["N1"]), input_layout=w["input_layout"], sparse_mode=mode,
                              keep_prob=float(w.get("keep_prob", 1.0)), pse_type=int(w.get("pse_type", 1)))
    for name in ("atten_mask", "drop_mask", "pse_shift"):
        if name in a:
            kw[name] = a[name]
    if w["input_layout"] == "TND":
        kw.update(actual_seq_qlen=np.arange(1, B + 1) * Sq, actual_seq_kvlen=np.arange(1, B + 1) * Skv)
    if mode in (5, 6):
        kw["prefix"] = np.full(B, Skv, dtype=np.int64)
    return a["query"], a["key"], a["value"], a["dy"], kw


def random_call(w: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random call arrays of a workload (the shapes and masks of `configs`), well-conditioned: scores
    ~ N(0, 1) with scale 1, finite stats; for tuning measurements and benchmarks."""
    from .masks import compressed_causal_mask, compressed_prefix_mask

    rng = np.random.default_rng(seed)
    dt = NAME_TO_DTYPE[DTYPE_ALIASES[str(w["dtype"])]]
    B, N1, N2, Sq, Skv, D, Dv = (int(w[k]) for k in ("B", "N1", "N2", "Sq", "Skv", "D", "Dv"))
    L, mode = w["input_layout"], int(w["sparse_mode"])

    def rnd(shape, s=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(s)).astype(dt)

    qs = D ** -0.25
    a: dict[str, Any] = {"query": rnd(layout_shape(L, B, Sq, N1, D), qs), "key": rnd(layout_shape(L, B, Skv, N2, D), qs),
                         "value": rnd(layout_shape(L, B, Skv, N2, Dv)), "dy": rnd(layout_shape(L, B, Sq, N1, Dv)),
                         "attention_in": rnd(layout_shape(L, B, Sq, N1, Dv))}
    st = (B * Sq, N1, 8) if L == "TND" else (B, N1, Sq, 8)
    a["softmax_max"] = np.full(st, 3.0, dtype=np.float32)
    a["softmax_sum"] = np.full(st, float(min(Skv, 64)), dtype=np.float32)
    if mode in (2, 3, 4, 7, 8):
        a["atten_mask"] = compressed_causal_mask()
    elif mode == 6:
        a["atten_mask"] = compressed_prefix_mask()
    elif mode in (0, 1, 5) and w.get("mask", mode != 0):
        a["atten_mask"] = np.zeros((B, 1, Sq, Skv) if mode == 5 else (Sq, Skv), np.bool_)
    if float(w.get("keep_prob", 1.0)) < 1.0:
        a["drop_mask"] = rng.integers(0, 256, ((B * N1 * Sq * Skv + 7) // 8,), dtype=np.uint8)
    pse = w.get("pse")
    if pse:
        a["pse_shift"] = (rng.standard_normal(PSE_SHAPES[pse](B, N1, Sq, Skv), dtype=np.float32) * 0.1).astype(
            np.float32 if pse.startswith("slopes") else dt)
    return a
