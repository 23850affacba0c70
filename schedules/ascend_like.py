"""Ascend-like schedule template: the knobs of CANN's FAG structure (the "sab" template, ASCEND_MODEL.md §1),
CANN's own default choice for a shape, and an analytic `prune` that rejects every capacity, fractal and
alignment violation before anything is built. Hardware facts come from the machine description
(fag_tvm/targets/ascend_like/machines.json), so the rules hold for every variant.

Knobs
- cv_s1 x cv_s2: the CV block, one work item (Cube1 -> Vector1 -> Cube2 round trip). Multiples of 16; the
  two AIVs each take half the rows, so cv_s1 is a multiple of 32. CANN's default 512 x 512.
- base_m, base_n, base_k: the L0 matmul tile (L1 holds the Q/dO and K/V slices of a base tile, the head
  dimension in chunks of at most 256) the cube streams the CV block in (CANN mm1: baseM =
  min(cv_s1, 128), baseN = 128, 256 at D = 64; catlass A2: 128 x 256 x 64). Multiples of 16 (fp32 K: 8).
- vec_rows x vec_cols: the vector sub-tile each AIV works on (CANN 32 x 256 = 8192 fp32, VEC_S2_LEN 256).
- db_l1, db_l0, db_ub: buffers per scope (2 = ping-pong, what lets pipes overlap; 1 = the sum rule).
- db_l0c: L0C accumulator buffers (CANN single-buffers a 128 x 256 fp32 tile at D = 64; the model does
  not price it: the FixPipe drains while the next tile's operands load [I]).
- handoff_bytes: S/dP cube -> vector width (4 = fp32, CANN; 2 = fp16, for 2-byte inputs only).
- kv_resident: the K/V slices of a CV column stay in L1 over its S1 blocks.
- dkdv: where dK/dV accumulate: "gm" (fp32 workspace, fixpipe atomics, CANN) or "l1" (KV-outer, resident
  in L1, written once per column; atomics only for dQ).
- accumulate: "atomic" or "deterministic" (per-core fp32 slots, ordered sums, two SyncAll per round).

Feasibility (`prune`; ASCEND_MODEL.md §1.4, §4.4): fractal multiples; cv_s1 halves evenly for the two AIVs;
base tiles and the vector sub-tile inside the CV block (tails are streamed); L0A (base_m x base_k), L0B (base_k x base_n) and L0C (base_m x base_n
fp32) per buffer count; L1 (the Q/dO and K/V slices per buffer, the resident K/V column, resident dK/dV);
UB per AIV (S and dP in at the hand-off width per buffer, P and dS out at the input width, mask bytes,
dropout bits, pse, the row statistics); the vector sub-tile within one instruction's 255 repeats and its
rows 32-byte aligned (32 elements with a mask or dropout); GM workspace slots 512-byte aligned. The UB
budget is CANN's TOTAL_SIZE (189 KiB); the accounting of what lives in it is ours [I]: P and dS are
computed in place of S and dP, their casts to the input dtype (none when the widths match) go to
single-buffered outputs.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DKDV = ("gm", "l1")
L1_K_CHUNK = 256
ACCUMULATE = ("atomic", "deterministic")


@dataclass(frozen=True)
class Knobs:
    cv_s1: int = 512
    cv_s2: int = 512
    base_m: int = 128
    base_n: int = 128
    base_k: int = 64
    vec_rows: int = 32
    vec_cols: int = 256
    db_l1: int = 2
    db_l0: int = 2
    db_ub: int = 2
    db_l0c: int = 2
    handoff_bytes: int = 4
    kv_resident: bool = True
    dkdv: str = "gm"
    accumulate: str = "atomic"

    def tag(self) -> str:
        t = (f"cv{self.cv_s1}x{self.cv_s2}_b{self.base_m}x{self.base_n}x{self.base_k}"
             f"_v{self.vec_rows}x{self.vec_cols}_db{self.db_l1}{self.db_l0}{self.db_ub}{self.db_l0c}_h{self.handoff_bytes}")
        if not self.kv_resident:
            t += "_kvgm"
        if self.dkdv != "gm":
            t += f"_dkdv{self.dkdv}"
        if self.accumulate != "atomic":
            t += "_det"
        return t


_TAG = re.compile(r"cv(\d+)x(\d+)_b(\d+)x(\d+)x(\d+)_v(\d+)x(\d+)_db([12])([12])([12])([12])_h([24])"
                  r"(_kvgm)?(_dkdvl1)?(_det)?")


def from_tag(tag: str) -> Knobs:
    """Inverse of Knobs.tag() (ValueError if `tag` is not one)."""
    m = _TAG.fullmatch(tag)
    if not m:
        raise ValueError(f"not an ascend-like knob tag: {tag!r}")
    v = [int(x) for x in m.groups()[:12]]
    return Knobs(cv_s1=v[0], cv_s2=v[1], base_m=v[2], base_n=v[3], base_k=v[4], vec_rows=v[5], vec_cols=v[6],
                 db_l1=v[7], db_l0=v[8], db_ub=v[9], db_l0c=v[10], handoff_bytes=v[11], kv_resident=not m.group(13),
                 dkdv="l1" if m.group(14) else "gm", accumulate="deterministic" if m.group(15) else "atomic")


def from_dict(d: Any) -> Knobs:
    """Knobs from a JSON object (tuning records, manifests), every field's type checked (ValueError if bad)."""
    fields = {f.name: f for f in dataclasses.fields(Knobs)}
    if not isinstance(d, dict) or set(d) != set(fields):
        raise ValueError(f"knobs must have exactly the fields {sorted(fields)}, got {d!r}")
    for name, value in d.items():
        want = type(getattr(Knobs(), name))
        if type(value) is not want:  # noqa: E721 - bool is not an int here
            raise ValueError(f"knob {name}={value!r} is not a {want.__name__}")
    return Knobs(**d)


def _a(x: int, m: int = 16) -> int:
    return -(-x // m) * m


def _hw(hw: Any, name: str) -> Any:
    return hw[name] if isinstance(hw, dict) else getattr(hw, name)


def buffer_bytes(spec: Any, k: Knobs) -> dict[str, int]:
    """Bytes each on-chip buffer holds under these knobs (per AIC for L1/L0, per AIV for UB)."""
    eb = DTYPE_BYTES[spec.dtype]
    dp, dvp = _a(spec.d), _a(spec.dv)
    kc = L1_K_CHUNK  # the head dim streams through L1 in chunks (catlass A2: L1 tile K = 256)
    l1 = (k.base_m + k.base_n) * (min(dp, kc) + min(dvp, kc)) * eb * k.db_l1  # Q/dO and K/V slices
    if k.kv_resident:
        l1 += k.cv_s2 * (dp + dvp) * eb  # the CV column's K/V stay for its S1 blocks
    if k.dkdv == "l1":
        l1 += k.cv_s2 * (dp + dvp) * 4  # fp32 dK/dV accumulators of the column
    e = k.vec_rows * k.vec_cols
    ub = 2 * e * k.handoff_bytes * k.db_ub  # S, dP in (ping-pong); P and dS are computed in place
    if eb != k.handoff_bytes:
        ub += 2 * e * eb  # ... and cast to the input width into their own outputs
    if spec.full_mask:
        ub += e  # uint8 mask
    if spec.dropout:
        ub += -(-e // 8)  # keep bits
    if spec.pse == "ext":
        ub += e * eb
    ub += 3 * k.vec_rows * 8 * 4  # max, sum, rowsum(dO o O): 8 fp32 lanes per row each
    return {"l1": l1,
            "l0a": k.base_m * k.base_k * eb * k.db_l0,
            "l0b": k.base_k * k.base_n * eb * k.db_l0,
            "l0c": k.base_m * k.base_n * 4 * k.db_l0c,
            "ub": ub}


CAPACITY = {"l1": "l1_bytes", "l0a": "l0a_bytes", "l0b": "l0b_bytes", "l0c": "l0c_bytes", "ub": "ub_usable_bytes"}


def prune(spec: Any, k: Knobs, hw: Any) -> tuple[bool, str]:
    """(feasible, why not) for `spec` (a KernelSpec) and knobs on machine `hw` (a Machine or its dict)."""
    fp32 = spec.dtype == "float32"
    frac = _hw(hw, "fractal")
    kfrac = _hw(hw, "fractal_k_f32") if fp32 else frac
    if k.dkdv not in DKDV or k.accumulate not in ACCUMULATE or k.handoff_bytes not in (2, 4):
        return False, f"unknown choice (dkdv {k.dkdv!r}, accumulate {k.accumulate!r}, handoff {k.handoff_bytes!r})"
    if min(k.db_l1, k.db_l0, k.db_ub, k.db_l0c) < 1 or max(k.db_l1, k.db_l0, k.db_ub, k.db_l0c) > 2:
        return False, "buffers per scope must be 1 or 2"
    if k.handoff_bytes < DTYPE_BYTES[spec.dtype]:
        return False, f"handoff_bytes={k.handoff_bytes} would round fp32 S/dP below the inputs' precision"
    for name in ("cv_s1", "cv_s2", "base_m", "base_n"):
        v = getattr(k, name)
        if v < frac or v % frac:
            return False, f"{name}={v} is not a positive multiple of the {frac}-element fractal"
    if k.base_k < kfrac or k.base_k % kfrac:
        return False, f"base_k={k.base_k} is not a positive multiple of {kfrac} (the fractal's K)"
    if k.cv_s1 % (2 * frac):
        return False, f"cv_s1={k.cv_s1}: the two AIVs take half the rows each, a multiple of {frac}"
    if k.base_m > k.cv_s1 or k.base_n > k.cv_s2:
        return False, f"base tile {k.base_m}x{k.base_n} larger than the CV block {k.cv_s1}x{k.cv_s2}"
    half = k.cv_s1 // 2
    if k.vec_rows < 1 or k.vec_cols < 1 or k.vec_rows > half or k.vec_cols > k.cv_s2:
        return False, f"vector sub-tile {k.vec_rows}x{k.vec_cols} larger than the AIV half {half}x{k.cv_s2}"
    row_align = 32 if (spec.full_mask or spec.dropout) else _hw(hw, "ub_block_bytes") // 4
    if k.vec_cols % row_align:
        return False, f"vec_cols={k.vec_cols}: UB rows must be 32-byte aligned ({row_align} elements)"
    repeats = -(-k.vec_rows * k.vec_cols * 4 // _hw(hw, "vector_bytes_per_repeat"))
    if repeats > _hw(hw, "vector_repeat_max"):
        return False, f"vector sub-tile needs {repeats} repeats per instruction (max {_hw(hw, 'vector_repeat_max')})"
    if (k.cv_s1 * k.cv_s2 * k.handoff_bytes) % _hw(hw, "gm_align_bytes"):
        return False, "GM workspace slots would not be 512-byte aligned"
    for buf, used in buffer_bytes(spec, k).items():
        cap = _hw(hw, CAPACITY[buf])
        if used > cap:
            return False, f"{buf.upper()} needs {used} B > {cap} B"
    return True, ""


def cann_default(spec: Any, s1: int, s2: int, sparse: bool, hw: Any, deterministic: bool = False) -> Knobs:
    """CANN's own choice for a shape (ASCEND_MODEL.md §1.3-1.4). fp32 takes the generic template: a 128 x 1024
    cube block, 8 x 1024 vector blocks, K/V streamed. Otherwise the sab template: 512 x 512 CV blocks;
    non-sparse with S2 < 2048 a fit keeping cv_s1 * cv_s2 <= 512^2 in steps of 16, each side at most 1024
    [the exact fit is ours, I]; baseM = min(cv_s1, 128), baseN = 256 at D = 64 else 128; vector sub-tiles
    of 32 x 256; deterministic mode drops to 256 x 256. L0C is single-buffered where two accumulators do
    not fit (CANN's 128 x 256 fp32 tile at D = 64); where our L1 accounting says the tiles do not fit,
    K/V residency and then L1 double buffering are dropped [I]."""
    acc = "deterministic" if deterministic else "atomic"
    if spec.dtype == "float32":
        cv2 = min(1024, max(32, _a(s2, 32)))  # the block never longer than the (aligned) sequence
        k = Knobs(cv_s1=128, cv_s2=cv2, base_m=128, base_n=min(128, cv2), base_k=32, vec_rows=8, vec_cols=cv2,
                  kv_resident=False, accumulate=acc)
    else:
        cv1, cv2 = 512, 512
        if not sparse and s2 < 2048:
            cv2 = min(1024, max(32, _a(s2, 32)))
            cv1 = min(1024, max(32, _a(s1, 32)), (512 * 512 // cv2) // 32 * 32)
        if deterministic and (cv1, cv2) == (512, 512):
            cv1, cv2 = 256, 256
        k = Knobs(cv_s1=cv1, cv_s2=cv2, base_m=min(cv1, 128), base_n=min(cv2, 256 if spec.d == 64 else 128),
                  vec_rows=min(32, cv1 // 2), vec_cols=min(256, cv2), accumulate=acc)
    if k.base_m * k.base_n * 4 * 2 > _hw(hw, "l0c_bytes"):
        k = dataclasses.replace(k, db_l0c=1)
    # where our L1 accounting says the documented tiles do not fit (large D, fp32), stream K/V instead of
    # keeping the column resident, then single-buffer L1 [I]
    for change in ({"kv_resident": False}, {"db_l1": 1}):
        if prune(spec, k, hw)[0]:
            break
        k = dataclasses.replace(k, **change)
    return k


def candidate_space(spec: Any, hw: Any) -> dict[str, list]:
    """The tuning space (before `prune`)."""
    return {"cv_s1": [64, 128, 256, 512, 1024], "cv_s2": [64, 128, 256, 512, 1024],
            "base_m": [64, 128, 256], "base_n": [64, 128, 256], "base_k": [32, 64, 128],
            "vec_rows": [8, 16, 32, 64], "vec_cols": [64, 128, 256, 512], "db_l1": [1, 2], "db_l0": [1, 2],
            "db_ub": [1, 2], "db_l0c": [1, 2], "handoff_bytes": [2, 4], "kv_resident": [True, False], "dkdv": list(DKDV),
            "accumulate": list(ACCUMULATE)}


def feasible_points(spec: Any, hw: Any, fixed: dict | None = None) -> list[Knobs]:
    """Every feasible point of the space (with `fixed` knobs held), for sweeps and tests."""
    space = dict(candidate_space(spec, hw), **{n: [v] for n, v in (fixed or {}).items()})
    names = list(space)
    out = []
    for values in itertools.product(*(space[n] for n in names)):
        k = Knobs(**dict(zip(names, values)))
        if prune(spec, k, hw)[0]:
            out.append(k)
    return out


def to_tiling(k: Knobs, deterministic: bool | None = None):
    """The pipeline model's Tiling for these knobs (the model prices the CV block, hand-off, residency,
    double buffering -- overlap only when every scope ping-pongs -- and the accumulation mode)."""
    from ..targets.ascend_like.pipeline_model import Tiling  # noqa: PLC0415

    return Tiling(cv_s1=k.cv_s1, cv_s2=k.cv_s2, handoff_bytes=k.handoff_bytes, kv_resident=k.kv_resident,
                  dkdv_resident=k.dkdv == "l1", double_buffer=min(k.db_l1, k.db_l0, k.db_ub) == 2,
                  deterministic=k.accumulate == "deterministic" if deterministic is None else deterministic)


FEATURE_NAMES = ("cv_s1", "cv_s2", "base_m", "base_n", "base_k", "vec_rows", "vec_cols", "db_l1", "db_l0", "db_ub",
                 "db_l0c", "handoff_bytes", "kv_resident", "dkdv_l1", "deterministic", "log2_cv_area", "items",
                 "rounds", "round_balance", "computed_over_visible", "l1_fill", "l0c_fill", "ub_fill",
                 "d", "dv", "group", "low_precision")


def features(spec: Any, w: dict, k: Knobs, hw: Any) -> list[float]:
    """The knob vector + analytic features of one point for workload `w` (what the tuner's cost model learns the
    pipeline model's time from): work items left after band skipping, rounds over the cube cores and their
    balance, cells computed per visible cell, buffer fill per scope. The model's time itself is not a feature."""
    import math  # noqa: PLC0415

    from ..targets.ascend_like.pipeline_model import model_inputs  # noqa: PLC0415

    shape, _, _ = model_inputs(w)
    cv1, cv2 = min(k.cv_s1, _a(shape.s1, 32)), min(k.cv_s2, _a(shape.s2))
    items = shape.b * shape.n1 * shape.valid_blocks(cv1, cv2)
    cores = _hw(hw, "aic_cores")
    rounds = -(-items // cores)
    used = buffer_bytes(spec, k)
    f = [k.cv_s1, k.cv_s2, k.base_m, k.base_n, k.base_k, k.vec_rows, k.vec_cols, k.db_l1, k.db_l0, k.db_ub, k.db_l0c,
         k.handoff_bytes, int(k.kv_resident), int(k.dkdv == "l1"), int(k.accumulate == "deterministic"),
         math.log2(k.cv_s1 * k.cv_s2), items, rounds, rounds * cores / max(1, items),
         items * cv1 * cv2 / max(1, shape.b * shape.n1 * shape.visible_cells()),
         used["l1"] / _hw(hw, "l1_bytes"), used["l0c"] / _hw(hw, "l0c_bytes"), used["ub"] / _hw(hw, "ub_usable_bytes"),
         spec.d, spec.dv, spec.group, 0 if spec.dtype == "float32" else 1]
    return [float(x) for x in f]


def tuning_values(spec: Any, hw: Any, default: Knobs) -> dict[str, list]:
    """What the tuner samples: the knobs the pipeline model prices (CV block, base tiles, vector sub-tile, L1
    buffering, hand-off width, K/V residency, where dK/dV accumulate, accumulation mode) over their candidate
    values (plus the default's own value), the rest held at CANN's default; only values that occur in a
    feasible point are kept."""
    space = candidate_space(spec, hw)
    vals = {f.name: [getattr(default, f.name)] for f in dataclasses.fields(Knobs)}
    for name in ("cv_s1", "cv_s2", "base_m", "base_n", "vec_rows", "vec_cols", "db_l1", "kv_resident", "dkdv",
                 "accumulate"):
        vals[name] = list(space[name]) + [v for v in vals[name] if v not in space[name]]  # the default stays in
    vals["handoff_bytes"] = [4] if spec.dtype == "float32" else [2, 4]
    names = list(vals)
    feas = [p for p in (Knobs(**dict(zip(names, v))) for v in itertools.product(*vals.values()))
            if prune(spec, p, hw)[0]]
    return {n: [v for v in vals[n] if any(getattr(p, n) == v for p in feas)] for n in names}
