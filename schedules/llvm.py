"""LLVM (CPU) schedule template: the knobs of the hand-written TIR kernels in fag_tvm/kernels.

The kernel generators (fag_tvm/kernels/{fwd,bwd}.py) take every tiling decision from an `LLVMKnobs`
value, so a tuner explores exactly the kernel we ship. This file holds only heuristics and feasibility
rules; the math lives in fag_tvm/kernels.

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

import functools
import os
from dataclasses import dataclass, replace

PAD = 16  # head dims are padded to a multiple of this inside the kernels (ws layout, spec-only)


def pad16(x: int) -> int:
    return (x + PAD - 1) // PAD * PAD


@dataclass(frozen=True)
class LLVMKnobs:
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


@functools.lru_cache(maxsize=None)
def l2_bytes() -> int:
    """Per-core L2 size (bytes), from sysfs; 1 MiB if unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            p = os.path.join(base, idx)
            with open(os.path.join(p, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(p, "size")) as f:
                s = f.read().strip().upper()
            mult = 1024 * 1024 if s.endswith("M") else 1024 if s.endswith("K") else 1
            return int(s.rstrip("KMB")) * mult
    except (OSError, ValueError):
        pass
    return 1024 * 1024


def scratch_floats(spec, knobs: LLVMKnobs) -> int:
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


def gemm_shape(knobs: LLVMKnobs, M: int, N: int) -> tuple[int, int]:
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


def prune(spec, knobs: LLVMKnobs, l2: int | None = None) -> tuple[bool, str]:
    """(feasible, reason). Analytic rules only; nothing is compiled or measured."""
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
    budget = 0.75 * (l2 or l2_bytes())
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


def candidates(spec, vec: int = 16) -> list[LLVMKnobs]:
    """All feasible knob settings of `candidate_space`."""
    import itertools

    sp = candidate_space(spec, vec)
    names = list(sp)
    out = []
    for vals in itertools.product(*(sp[n] for n in names)):
        k = LLVMKnobs(**dict(zip(names, vals)))
        if prune(spec, k)[0]:
            out.append(k)
    return out


def default_knobs(spec, vec: int = 16) -> LLVMKnobs:
    """Heuristic knobs, good without tuning: the largest square-ish tile (preferring the measured
    sweet spot 64x64 for the backward, 128x64 for the forward) whose scratch fits the L2 budget."""
    mr, nr = (4, 4) if vec == 16 else (4, 2) if vec == 8 else (4, 2)
    if spec.direction == "bwd":
        prefs = [(64, 64), (64, 32), (32, 64), (32, 32), (16, 32), (32, 16), (16, 16)]
    else:
        prefs = [(128, 64), (64, 64), (64, 32), (32, 32), (16, 32), (16, 16)]
    for bq, bkv in prefs:
        k = LLVMKnobs(block_q=max(bq, vec), block_kv=max(bkv, vec), mr=mr, nr=nr, vec=vec)
        if prune(spec, k)[0]:
            return k
    return LLVMKnobs(block_q=max(16, vec), block_kv=max(16, vec), mr=mr, nr=nr, vec=vec)


def with_knobs(knobs: LLVMKnobs, **kw) -> LLVMKnobs:
    return replace(knobs, **kw)
