"""CUDA schedule template (FA2 structure, fag_tvm/targets/cuda): the knobs of the backward's kernels, the
default per architecture, an analytic `prune` (shared memory per CTA, accumulator registers per thread,
thread-to-element divisibility) and the tuning space. `cuda` and `cuda-sim` share it: the simulation runs
the same grid, block and shared-memory schedule.

Knobs
- block_m: query rows of a tile (the dK/dV kernel loops over the G heads' query blocks of this size; the
  deterministic dQ kernel owns one such block per CTA).
- block_n: key/value rows of a CTA of the dK/dV kernel (and of each step of the dQ kernel's loop).
- warps: threads per CTA / 32.
- dq: "atomic" (dQ += dS K by fp32 atomics into a workspace accumulator, in the dK/dV kernel) or "kernel"
  (a separate dQ kernel over query blocks recomputes S and dP: no float atomics, bitwise reproducible).
  A call's `deterministic=True` forces "kernel".
- smem_pad: 1 pads every shared tile's rows by one float (row stride D+1: the column walks of the tile
  products hit 32 different banks instead of one), 0 leaves them dense.

Feasibility (`prune`): block sizes multiples of 16 (the m16n8k16 tensor-core tile), every tile's element
count a multiple of the CTA's threads (each thread owns a fixed set of elements), shared memory per CTA within
the architecture's opt-in limit, and fp32 accumulators per thread (dK + dV, or dQ) within HARD_ACC_REGS --
MAX_ACC_REGS for defaults and tuning, so they stay in registers (`python -m fag_tvm.targets.cuda.resources`
prints what ptxas makes of the defaults)."""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

DQ = ("atomic", "kernel")
MAX_ACC_REGS = 32  # the budget of defaults and tuning (strict); beyond HARD_ACC_REGS nothing can compile well
HARD_ACC_REGS = 128
# per architecture: opt-in dynamic shared memory per block (bytes) and registers per thread
ARCHS = {"sm_80": {"smem_bytes": 166912, "max_regs": 255, "sms": 108},
         "sm_90": {"smem_bytes": 232448, "max_regs": 255, "sms": 132}}


@dataclass(frozen=True)
class Knobs:
    block_m: int = 64
    block_n: int = 64
    warps: int = 4
    dq: str = "atomic"
    smem_pad: int = 1

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def tag(self) -> str:
        return f"m{self.block_m}_n{self.block_n}_w{self.warps}_dq{self.dq}_p{self.smem_pad}"


_TAG = re.compile(r"m(\d+)_n(\d+)_w(\d+)_dq(atomic|kernel)_p([01])")


def from_tag(tag: str) -> Knobs:
    """Inverse of Knobs.tag() (ValueError if `tag` is not one)."""
    m = _TAG.fullmatch(tag)
    if not m:
        raise ValueError(f"not a cuda knob tag: {tag!r}")
    return Knobs(block_m=int(m.group(1)), block_n=int(m.group(2)), warps=int(m.group(3)), dq=m.group(4),
                 smem_pad=int(m.group(5)))


def from_dict(d: Any) -> Knobs:
    """Knobs from a JSON object (tuning records, manifests), every field's type checked (ValueError if bad)."""
    fields = {f.name for f in dataclasses.fields(Knobs)}
    if not isinstance(d, dict) or set(d) != fields:
        raise ValueError(f"knobs must have exactly the fields {sorted(fields)}, got {d!r}")
    for name, value in d.items():
        want = type(getattr(Knobs(), name))
        if type(value) is not want:  # noqa: E721 - bool is not an int here
            raise ValueError(f"knob {name}={value!r} is not a {want.__name__}")
    return Knobs(**d)


def pad16(x: int) -> int:
    return -(-x // 16) * 16


def smem_floats(spec: Any, k: Knobs, kernel: str) -> int:
    """fp32 elements of shared memory one CTA of `kernel` ("dkdv" or "dq") declares (the generator in
    targets/cuda/bwd.py allocates exactly these: tiles.shared_tiles)."""
    dp, dvp, pad = pad16(spec.d), pad16(spec.dv), k.smem_pad
    bm, bn = k.block_m, k.block_n
    tiles = bn * (dp + pad) + bn * (dvp + pad) + bm * (dp + pad) + bm * (dvp + pad) + 2 * bm * (bn + pad)
    if spec.dpse:
        tiles += bm * (bn + pad)
    return tiles + 3 * bm + k.threads


def acc_floats(spec: Any, k: Knobs, kernel: str) -> int:
    """fp32 accumulators one thread keeps in registers across the tile loop: dK + dV (dkdv kernel) or dQ (dq
    kernel). Measured with ptxas (sm_90, every feature on): 32 per thread leaves room for the tile's cell math
    and addressing without spills; 64 spills at D = 128."""
    dp, dvp, nt = pad16(spec.d), pad16(spec.dv), k.threads
    if kernel == "dkdv":
        return k.block_n * (dp + dvp) // nt
    return k.block_m * dp // nt


def prune(spec: Any, k: Knobs, arch: str, strict: bool = False) -> tuple[bool, str]:
    """(feasible, reason) of `k` for `spec` on `arch`, analytically; strict adds the register budget of
    defaults and tuning (MAX_ACC_REGS: a performance rule, not a correctness one)."""
    if arch not in ARCHS:
        return False, f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})"
    if k.dq not in DQ or k.smem_pad not in (0, 1):
        return False, f"dq must be one of {DQ}, smem_pad 0 or 1"
    if k.block_m % 16 or k.block_n % 16 or not 16 <= k.block_m <= 128 or not 16 <= k.block_n <= 128:
        return False, "block_m and block_n must be multiples of 16 in [16, 128]"
    if k.warps not in (1, 2, 4, 8):
        return False, "warps must be 1, 2, 4 or 8"
    nt = k.threads
    if (k.block_m * k.block_n) % nt:
        return False, f"block_m x block_n = {k.block_m * k.block_n} cells not a multiple of {nt} threads"
    limit = ARCHS[arch]["smem_bytes"]
    for kernel in ("dkdv", "dq"):
        b = 4 * smem_floats(spec, k, kernel)
        if b > limit:
            return False, f"{kernel} kernel: {b} B of shared memory > {limit} B on {arch}"
        a = acc_floats(spec, k, kernel)
        regs = MAX_ACC_REGS if strict else HARD_ACC_REGS
        if a > regs:
            return False, f"{kernel} kernel: {a} fp32 accumulators per thread > {regs}"
    return True, ""


def default_knobs(spec: Any, arch: str) -> Knobs:
    """The largest tiles that keep the accumulators in registers (MAX_ACC_REGS) and fit the architecture's
    shared memory, the dQ path by atomics."""
    for bm, bn, w in ((64, 64, 8), (64, 32, 4), (64, 32, 8), (32, 32, 8), (32, 16, 8), (16, 16, 8), (16, 16, 4)):
        k = Knobs(block_m=bm, block_n=bn, warps=w)
        if prune(spec, k, arch, strict=True)[0]:
            return k
    raise ValueError(f"no feasible cuda schedule for d={spec.d}, dv={spec.dv} on {arch}")


def candidate_space(spec: Any, arch: str) -> dict[str, list]:
    """The tuning space (before `prune`)."""
    return {"block_m": [16, 32, 64, 128], "block_n": [16, 32, 64, 128], "warps": [2, 4, 8], "dq": list(DQ),
            "smem_pad": [0, 1]}


def feasible_points(spec: Any, arch: str) -> list[Knobs]:
    space = candidate_space(spec, arch)
    names = list(space)
    pts = (Knobs(**dict(zip(names, v))) for v in itertools.product(*space.values()))
    return [p for p in pts if prune(spec, p, arch, strict=True)[0]]


FEATURE_NAMES = ("block_m", "block_n", "warps", "dq_kernel", "smem_pad", "smem_kib", "acc_regs", "ctas",
                 "waves", "d", "dv", "group", "low_precision")


def features(spec: Any, w: dict, k: Knobs, arch: str) -> list[float]:
    """The knob vector + analytic features of one point for workload `w`: shared memory and registers per CTA,
    CTAs of the dK/dV kernel and the waves they make over the architecture's SMs."""
    b, n2, skv = int(w.get("B", 1)), int(w.get("N2", w.get("N1", 1))), int(w.get("Skv", w.get("Sq", 1)))
    ctas = b * n2 * -(-skv // k.block_n)
    sms = ARCHS.get(arch, ARCHS["sm_90"])["sms"]
    f = [k.block_m, k.block_n, k.warps, int(k.dq == "kernel"), k.smem_pad, 4 * smem_floats(spec, k, "dkdv") / 1024,
         acc_floats(spec, k, "dkdv"), ctas, ctas / sms, spec.d, spec.dv, spec.group,
         0 if spec.dtype == "float32" else 1]
    return [float(x) for x in f]
