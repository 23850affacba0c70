"""LLVM (CPU) schedule template: the knobs of the hand-written TIR kernels in fag_tvm/kernels.

The kernel generators (fag_tvm/targets/llvm/{fwd,bwd}.py) take every tiling decision from a `Knobs`
value, so a tuner explores exactly the kernel we ship. This file holds only heuristics, feasibility
rules, the tuning space and the cost model's features; the math lives in fag_tvm/kernels/common and the
loop nests in fag_tvm/targets/llvm. Hardware facts (vector width, L2 size, cores) are parameters: the
LLVM target passes them from its hardware description.

Knobs
- block_q, block_kv: the attention tile (rows of Q x rows of K/V). Multiples of `vec`.
- mr, nr: register block of the micro-kernel, C[mr, nr*vec] fp32 accumulators kept in vector
  registers (mr*nr accumulators; 16 of the 32 zmm registers is the sweet spot on AVX-512).
- vec: fp32 lanes per vector register (16 AVX-512, 8 AVX2). Head dims are padded to a multiple of 16
  inside the tiles regardless (the workspace layout does not depend on the knobs).
- acc_regs: accumulator budget when a product's N is narrower than nr*vec (then mr grows).

Feasibility (`prune`): tile multiples of vec and of the micro-kernel's mr, and the per-thread
scratch of one task (all tiles of the kernel, fp32) within a fraction of the L2 cache.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace

from ..core.abi import PAD, pad16

UNBOUNDED_L2 = 1 << 40  # prune with hard rules only (the L2 budget is a heuristic)


@dataclass(frozen=True)
class Knobs:
    block_q: int = 64
    block_kv: int = 64
    mr: int = 4
    nr: int = 4
    vec: int = 16
    acc_regs: int = 16

    def tag(self) -> str:
        t = f"bq{self.block_q}_bkv{self.block_kv}_mr{self.mr}_nr{self.nr}"
        if self.vec != 16:
            t += f"_v{self.vec}"
        if self.acc_regs != 16:
            t += f"_acc{self.acc_regs}"
        return t


def scratch_floats(spec, knobs: Knobs) -> int:
    """fp32 scratch (per thread) of one task of the kernel for this spec and these knobs."""
    BQ, BKV = knobs.block_q, knobs.block_kv
    d, dv, dp, dvp = spec.d, spec.dv, pad16(spec.d), pad16(spec.dv)
    if spec.direction == "bwd":
        # KT, VT, K, dK acc, dV acc | Q, dY, dQ tile | S, P, dP/dS
        return d * BKV + dv * BKV + BKV * dp + BKV * dp + BKV * dvp + BQ * dp + BQ * dvp + BQ * dp \
            + 3 * BQ * BKV + 4 * BQ + BKV
    # fwd: Q, KT, V, O acc | S, P
    return BQ * d + d * BKV + BKV * dvp + BQ * dvp + 2 * BQ * BKV + 8 * BQ + BKV


def _mr_ok(mr: int) -> bool:
    return mr == 1 or mr % 2 == 0


def acc_half_bytes(mr: int, nr: int, vec: int) -> int:
    """Bytes of one accumulator buffer (the micro-kernel keeps mr/2 rows per buffer; each must stay
    below 1 KiB to become a stack alloca promoted to registers, see tir_common.make_gemm)."""
    return max(1, mr // 2) * nr * vec * 4


def gemm_shape(knobs: Knobs, M: int, N: int) -> tuple[int, int]:
    """(mr, nr) of the micro-kernel for one product C[M, N]: nr shrinks to N's vectors, mr grows to keep
    the accumulator budget (acc_regs), mr | M, mr even or 1, each accumulator half < 1 KiB."""
    nvec = max(1, N // knobs.vec)
    nr = max(1, min(knobs.nr, nvec))
    cands = [m for m in range(min(16, M), 0, -1) if M % m == 0 and _mr_ok(m)
             and acc_half_bytes(m, nr, knobs.vec) < 1024]
    target = max(knobs.mr, knobs.acc_regs // nr) if nr < knobs.nr else knobs.mr
    for m in cands:
        if m <= target and m * nr <= max(knobs.acc_regs, knobs.mr * knobs.nr):
            return m, nr
    return 1, nr


def prune(spec, knobs: Knobs, l2: int = UNBOUNDED_L2) -> tuple[bool, str]:
    """(feasible, reason). Analytic rules only; nothing is compiled or measured. `l2`: per-core L2 bytes
    (the scratch budget is 75% of it; the default applies the hard rules only)."""
    v = knobs.vec
    if v not in (4, 8, 16):
        return False, f"vec={v} not in (4, 8, 16)"
    for name in ("block_q", "block_kv"):
        b = getattr(knobs, name)
        if b < v or b % v or b % PAD:
            return False, f"{name}={b} must be a positive multiple of vec={v} and of {PAD}"
        if b > 512:
            return False, f"{name}={b} > 512"
    if knobs.mr < 1 or knobs.nr < 1 or knobs.mr > 16 or knobs.nr > 8:
        return False, f"micro-kernel mr={knobs.mr} nr={knobs.nr} out of range"
    if knobs.mr * knobs.nr > 28:
        return False, f"mr*nr={knobs.mr * knobs.nr} accumulators spill (32 vector registers)"
    if not _mr_ok(knobs.mr):
        return False, f"mr={knobs.mr} must be 1 or even (accumulators are split in two halves)"
    if acc_half_bytes(knobs.mr, knobs.nr, v) >= 1024:
        return False, f"accumulator half of mr={knobs.mr} x nr={knobs.nr} >= 1 KiB (would not stay in registers)"
    if knobs.block_q % knobs.mr or knobs.block_kv % knobs.mr:
        return False, f"mr={knobs.mr} must divide block_q and block_kv"
    budget = 0.75 * l2
    fp = 4 * scratch_floats(spec, knobs)
    if fp > budget:
        return False, f"scratch {fp / 1024:.0f} KiB > 75% of L2 ({budget / 1024 / 0.75:.0f} KiB)"
    return True, "ok"


def candidate_space(spec, vec: int = 16) -> dict[str, list[int]]:
    """Knob values a tuner explores (the cartesian product, filtered with `prune`)."""
    blocks = [b for b in (16, 32, 48, 64, 96, 128, 192, 256) if b % vec == 0]
    return {
        "block_q": blocks,
        "block_kv": blocks,
        "mr": [2, 4, 8],
        "nr": [1, 2, 4],
        "vec": [vec],
        "acc_regs": [16],
    }


def candidates(spec, vec: int = 16, l2: int = UNBOUNDED_L2) -> list[Knobs]:
    """All feasible knob settings of `candidate_space`."""
    sp = candidate_space(spec, vec)
    names = list(sp)
    out = []
    for vals in itertools.product(*(sp[n] for n in names)):
        k = Knobs(**dict(zip(names, vals)))
        if prune(spec, k, l2)[0]:
            out.append(k)
    return out


def default_knobs(spec, vec: int = 16, l2: int = 1 << 20) -> Knobs:
    """Heuristic knobs, good without tuning: the largest square-ish tile (preferring the measured
    sweet spot 64x64 for the backward, 128x64 for the forward) whose scratch fits the L2 budget."""
    mr, nr = (4, 4) if vec == 16 else (4, 2) if vec == 8 else (4, 2)
    if spec.direction == "bwd":
        prefs = [(64, 64), (64, 32), (32, 64), (32, 32), (16, 32), (32, 16), (16, 16)]
    else:
        prefs = [(128, 64), (64, 64), (64, 32), (32, 32), (16, 32), (16, 16)]
    for bq, bkv in prefs:
        k = Knobs(block_q=max(bq, vec), block_kv=max(bkv, vec), mr=mr, nr=nr, vec=vec)
        if prune(spec, k, l2)[0]:
            return k
    return Knobs(block_q=max(16, vec), block_kv=max(16, vec), mr=mr, nr=nr, vec=vec)


def with_knobs(knobs: Knobs, **kw) -> Knobs:
    return replace(knobs, **kw)


def from_tag(tag: str) -> Knobs:
    """Inverse of Knobs.tag() (kernel names spell the knobs out; packages are checked against them)."""
    vals = {"vec": 16, "acc_regs": 16}
    keys = {"bq": "block_q", "bkv": "block_kv", "mr": "mr", "nr": "nr", "v": "vec", "acc": "acc_regs"}
    for part in tag.split("_"):
        for short in sorted(keys, key=len, reverse=True):
            if part.startswith(short) and part[len(short):].isdigit():
                vals[keys[short]] = int(part[len(short):])
                break
        else:
            raise ValueError(f"not an LLVM knob tag: {tag!r}")
    missing = [f.name for f in fields(Knobs) if f.name not in vals]
    if missing:
        raise ValueError(f"knob tag {tag!r} lacks {missing}")
    return Knobs(**vals)


# ------------------------------------------------------------------------------------------------
# cost-model features (the tuner's XGBoost model learns on these; see fag_tvm/tune/cost_model.py)


def visible_tiles(w: dict, bq: int, bkv: int) -> tuple[int, int, float]:
    """(visible tiles, partial tiles, useful cells) of one (b, head) for the workload's mask."""
    Sq, Skv, mode = int(w["Sq"]), int(w["Skv"]), int(w["sparse_mode"])
    nq, nkv = -(-Sq // bq), -(-Skv // bkv)
    if mode not in (2, 3):
        return nq * nkv, 0, float(Sq * Skv)
    off = 0 if mode == 2 else Skv - Sq  # visible iff j <= i + off
    vis = part = 0
    for ib in range(nq):
        hi = min(ib * bq + bq, Sq) - 1 + off  # last visible column of the tile's last row
        lo = ib * bq + off  # last visible column of its first row
        for jb in range(nkv):
            j0, j1 = jb * bkv, min(jb * bkv + bkv, Skv) - 1
            if j0 <= hi:
                vis += 1
                part += j1 > lo
    useful = float(sum(max(0, min(Skv, i + off + 1)) for i in range(Sq)))
    return vis, part, useful


FEATURE_NAMES = (["bq", "bkv", "mr", "nr", "log2_bq", "log2_bkv", "bq_over_bkv", "tiles", "partial_tiles",
                  "partial_frac", "computed_over_useful", "tiles_total", "partial_total", "thread_balance",
                  "scratch_over_l2"]
                 + [f"{p}_{x}" for p in ("s", "dv", "dk", "dq") for x in ("mr", "nr", "acc")]
                 + ["intensity", "pad_q", "pad_kv", "D", "Dv", "group", "lowp"])


def features(spec, w: dict, knobs: Knobs, threads: int, l2: int) -> list[float]:
    """The knob vector + analytic features of one point for workload `w`: tiles under the mask, padding
    waste, register blocks of the products, scratch vs L2, parallel balance, arithmetic intensity."""
    bq, bkv = knobs.block_q, knobs.block_kv
    threads = max(1, int(threads))
    D, DV = spec.d, spec.dv
    vis, part, useful = visible_tiles(w, bq, bkv)
    computed = vis * bq * bkv
    heads = w["B"] * w["N1"]
    tasks = w["B"] * w["N2"]
    balance = math.ceil(tasks / threads) * threads / tasks
    prods = [gemm_shape(knobs, bq, bkv), gemm_shape(knobs, bkv, pad16(DV)), gemm_shape(knobs, bkv, pad16(D)),
             gemm_shape(knobs, bq, pad16(D))]
    f = [bq, bkv, knobs.mr, knobs.nr, math.log2(bq), math.log2(bkv), bq / bkv,
         vis, part, part / max(1, vis), computed / max(1.0, useful),
         heads * vis, heads * part, balance,
         4 * scratch_floats(spec, knobs) / l2]
    for m, n in prods:
        f += [m, n, m * n]
    # per-tile arithmetic intensity: 5 products of 2*bq*bkv*D flops over the q/dy/dq tile traffic
    f += [2 * bq * bkv * (2 * D + 2 * DV + D) / (4.0 * (bq * (2 * D + DV) + bkv * (D + DV))),
          -(-w["Sq"] // bq) * bq / w["Sq"], -(-w["Skv"] // bkv) * bkv / w["Skv"],
          D, DV, spec.group, 0 if spec.dtype == "float32" else 1]
    return [float(x) for x in f]
