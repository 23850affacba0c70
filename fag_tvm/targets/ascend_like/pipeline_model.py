"""The ascend-like target's analytic pipeline model of CANN's FlashAttentionScoreGrad ("sab" template) on a
910B-class chip: predicted time, utilisation and the binding pipe of every stage for a shape and a tiling.

ASCEND_MODEL.md §4 is the specification; this module follows it term by term (the docstrings cite the
section). One work item is one CV block (BI x BJ score tile of one (b, n) head) taken through

    Cube1  (AIC)   S = Q K^T, dP = dO V^T                    pipes M, MTE2, FIX, MTE1
    Vector (2 AIV) P from the stats, mask/pse/dropout, dS     pipes MTE2, V, MTE3   (each AIV: half the block)
    Cube2  (AIC)   dQ += dS K, dK += dS^T Q, dV += P^T dO     pipes M, MTE2, FIX (fp32 atomics)

A stage costs the max of its pipes when they are double buffered (the sum when not); CANN's preload loop
overlaps the cube pair with the vector stage: P_item = max(c1 + c2, v) + sigma. Work items (blocks with at
least one visible cell) are dealt round-robin to the AICs; the chip's L2 read/write rates and HBM cap the
main phase; pre (zero the fp32 workspaces, rowsum(dO o O)), post (scale + cast) and launch/sync add on.

Cycle counts are per AI core at `Machine.freq_hz`; every rate and size comes from the Machine (machines.json,
with sources). The model is a ranker with written-down assumptions, not a simulator of contention."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ...config import INT32_MAX
from ...core.spec import KernelSpec
from ...errors import invalid
from .machine import Machine

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
PIPES = ("M", "MTE1", "MTE2", "FIX", "V", "MTE3")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A backward call as the model sees it (BNSD sizes; band rule in CANN's tokens, top-left aligned:
    causal is next_tokens = 0)."""

    b: int
    n1: int
    n2: int
    s1: int
    s2: int
    d: int
    dv: int
    dtype: str = "fp16"
    pre_tokens: int = INT32_MAX
    next_tokens: int = INT32_MAX

    def __post_init__(self) -> None:
        for f in ("b", "n1", "n2", "s1", "s2", "d", "dv"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise invalid(f, f"must be a positive integer, got {v!r}")
        if self.n1 % self.n2:
            raise invalid("n2", f"N1 = {self.n1} is not a multiple of N2 = {self.n2}")
        if self.dtype not in DTYPE_BYTES:
            raise invalid("dtype", f"expected one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def eb(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def visible_cells(self) -> int:
        """Score cells of one head the band leaves visible (column j of row i: -pre <= j - i <= next)."""
        i = np.arange(self.s1, dtype=np.int64)
        lo = np.maximum(0, i - min(self.pre_tokens, self.s2 + self.s1))
        hi = np.minimum(self.s2 - 1, i + min(self.next_tokens, self.s2 + self.s1))
        return int(np.maximum(0, hi - lo + 1).sum())

    def useful_flops(self) -> float:
        """The backward's five matmuls over the visible cells: 2 (3 D + 2 Dv) per cell and head."""
        return 2.0 * (3 * self.d + 2 * self.dv) * self.visible_cells() * self.b * self.n1

    def valid_blocks(self, bi: int, bj: int) -> int:
        """CV blocks of one head with at least one visible cell (CANN skips the others unnumbered)."""
        i0 = np.arange(0, self.s1, bi, dtype=np.int64)[:, None]
        j0 = np.arange(0, self.s2, bj, dtype=np.int64)[None, :]
        i1 = np.minimum(i0 + bi, self.s1) - 1
        j1 = np.minimum(j0 + bj, self.s2) - 1
        pre = min(self.pre_tokens, self.s1 + self.s2)
        nxt = min(self.next_tokens, self.s1 + self.s2)
        return int(((j0 - i1 <= nxt) & (j1 - i0 >= -pre)).sum())


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The schedule choices the model prices (ASCEND_MODEL.md §4): the CV block, the hand-off width, where K/V
    and dK/dV live, double buffering, deterministic accumulation, and whether operands hit in L2."""

    cv_s1: int = 512  # BI: score rows per work item (CANN sab default 512)
    cv_s2: int = 512  # BJ: score columns per work item (CANN sab default 512)
    handoff_bytes: int = 4  # S/dP cube -> vector in fp32 (CANN) or 2 (fp16)
    kv_resident: bool = True  # K/V slices stay in L1 over a column's S1 blocks (not re-read per item)
    dkdv_resident: bool = False  # KV-outer: dK/dV accumulate in L0C/L1, written once per column
    double_buffer: bool = True  # ping-pong in every scope: pipes overlap (max rule) instead of the sum rule
    deterministic: bool = False  # per-core fp32 slots + ordered sums instead of atomics
    l2_hit: bool = True  # operand reads at the L2 rate (else at the HBM per-core rate)

    def __post_init__(self) -> None:
        for f in ("cv_s1", "cv_s2"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 16 or v % 16:
                raise invalid(f, f"must be a positive multiple of 16, got {v!r}")
        if self.handoff_bytes not in (2, 4):
            raise invalid("handoff_bytes", f"must be 2 (fp16) or 4 (fp32), got {self.handoff_bytes!r}")


CANN_DEFAULT = Tiling()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage's pipe times (cycles) and the result: their max (double buffered) or sum."""

    pipes: dict[str, float]
    cycles: float

    @property
    def binding(self) -> str:
        return max(self.pipes, key=self.pipes.get)


@dataclasses.dataclass(frozen=True)
class Prediction:
    shape: Shape
    tiling: Tiling
    machine: str
    cube1: Stage
    vector: Stage  # per AIV, on half the block
    cube2: Stage
    p_item: float  # cycles per work item in steady state
    items: int  # W: valid work items over the whole call
    rounds: int  # work items of the busiest core
    main_caps: dict[str, float]  # seconds: items (per-core pipeline), l2_write, l2_read, hbm
    main_s: float
    deterministic_s: float
    pre_s: float
    post_s: float
    launch_s: float
    total_s: float
    flops: float
    tflops: float
    utilisation: float  # against the chip's fp16 cube peak

    @property
    def main_binding(self) -> str:
        return max(self.main_caps, key=self.main_caps.get)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for st in ("cube1", "vector", "cube2"):
            d[st]["binding"] = getattr(self, st).binding
        d["main_binding"] = self.main_binding
        return d


def _a(x: int, m: int = 16) -> int:
    """x padded to the fractal (16; K of fp32 operands to 8)."""
    return -(-x // m) * m


def _stage(pipes: dict[str, float], overlap: bool) -> Stage:
    return Stage(pipes, max(pipes.values()) if overlap else sum(pipes.values()))


def stages(shape: Shape, t: Tiling, m: Machine) -> tuple[Stage, Stage, Stage]:
    """Cube1, Vector (per AIV), Cube2 cycles of one work item (ASCEND_MODEL.md §4.1)."""
    bi, bj, d, dv, eb, hb = t.cv_s1, t.cv_s2, shape.d, shape.dv, shape.eb, t.handoff_bytes
    e = bi * bj
    fp32 = shape.dtype == "fp32"
    ak = (lambda x: _a(x, m.fractal_k_f32)) if fp32 else _a
    macs = (m.cube_macs_f32 if fp32 else m.cube_macs_f16) * m.mmad_efficiency
    r_rd = m.l2_read_rate if t.l2_hit else m.gm_rate
    s2o_blocks = max(1, -(-shape.s1 // bi))  # S1 blocks sharing one K/V column (dK/dV written once per column)

    in1 = (bi * (d + dv) + (0 if t.kv_resident else bj * (d + dv))) * eb
    cube1 = _stage({
        "M": _a(bi) * _a(bj) * (ak(d) + ak(dv)) / macs,
        "MTE2": in1 / r_rd,
        "FIX": 2 * e * hb / m.fixpipe_rate,
        "MTE1": _a(bi) * (ak(d) + ak(dv)) * eb / m.l1_to_l0a_rate + _a(bj) * (ak(d) + ak(dv)) * eb / m.l1_to_l0b_rate,
    }, t.double_buffer)
    half = e / m.aiv_per_aic
    vector = _stage({
        "MTE2": half * 2 * hb / r_rd,
        "V": half * m.vector_ops_per_element / m.vector_lanes_f32,
        "MTE3": half * 2 * eb / m.l2_write_rate,
    }, t.double_buffer)
    dkdv = bj * (d + dv) * 4 / (s2o_blocks if t.dkdv_resident else 1)
    cube2 = _stage({
        "M": _a(bi) * _a(bj) * (2 * ak(d) + ak(dv)) / macs,
        "MTE2": 2 * e * eb / r_rd,
        "FIX": (bi * d * 4 + dkdv) / m.fixpipe_rate,
    }, t.double_buffer)
    return cube1, vector, cube2


_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def model_inputs(w: dict[str, Any]) -> tuple[Shape, KernelSpec, bool]:
    """(model shape, kernel spec, sparse) of a workload dict (fag_tvm.workloads: BNSD sizes, sparse_mode 2/3
    causal, 0 dense)."""
    dtype = _DTYPES[w["dtype"]]
    causal = int(w.get("sparse_mode", 0)) in (2, 3)
    shape = Shape(int(w["B"]), int(w["N1"]), int(w["N2"]), int(w["Sq"]), int(w["Skv"]), int(w["D"]), int(w["Dv"]),
                  dtype, next_tokens=0 if causal else INT32_MAX)
    spec = KernelSpec("bwd", {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype], int(w["D"]),
                      int(w["Dv"]), group=int(w["N1"]) // int(w["N2"]), band=causal)
    return shape, spec, causal


def predict(shape: Shape, tiling: Tiling = CANN_DEFAULT, machine: Machine | None = None) -> Prediction:
    """The model's prediction for one backward call (ASCEND_MODEL.md §4.2-4.3)."""
    from .machine import load  # noqa: PLC0415 - the default machine only when none is given

    m = machine or load()
    # a CV block longer than the sequence runs at the sequence's aligned extent (rows: both AIV halves)
    t = dataclasses.replace(tiling, cv_s1=min(tiling.cv_s1, _a(shape.s1, 32)), cv_s2=min(tiling.cv_s2, _a(shape.s2)))
    c1, v, c2 = stages(shape, t, m)
    sigma = m.flag_latency_cycles
    p_item = (max(c1.cycles + c2.cycles, v.cycles) if t.double_buffer else c1.cycles + v.cycles + c2.cycles) + sigma
    items = shape.b * shape.n1 * shape.valid_blocks(t.cv_s1, t.cv_s2)
    cores = m.aic_cores
    rounds = math.ceil(items / cores)
    bi, bj, d, dv, eb, hb = t.cv_s1, t.cv_s2, shape.d, shape.dv, shape.eb, t.handoff_bytes
    e = bi * bj
    # bytes one item moves through L2 (every pipe above that reads or writes GM/L2)
    s2o_blocks = max(1, -(-shape.s1 // bi))
    dkdv = bj * (d + dv) * 4 / (s2o_blocks if t.dkdv_resident else 1)
    write_b = 2 * e * hb + (bi * d * 4 + dkdv) + 2 * e * eb
    read_b = (bi * (d + dv) + (0 if t.kv_resident else bj * (d + dv))) * eb + 2 * e * hb + 2 * e * eb
    f = m.freq_hz
    r_rd = m.l2_read_rate if t.l2_hit else m.gm_rate
    q_rows, kv_rows = shape.b * shape.n1 * shape.s1, shape.b * shape.n2 * shape.s2
    unique = (q_rows * (shape.d + 2 * shape.dv) + kv_rows * (shape.d + shape.dv)) * eb  # q, dO, O; k, v
    caps = {"items": rounds * p_item / f,
            "l2_write": items * write_b / (cores * m.l2_write_rate) / f,
            "l2_read": items * read_b / (cores * r_rd) / f,
            "hbm": unique / m.hbm_bytes_per_s}
    main_s = max(caps.values())
    det_s = 0.0
    if t.deterministic:
        # two chip-wide barriers per round and an ordered fp32 sum of every core's slots, split over the
        # AIVs: each reads its share of cores x (BI D + BJ (D + Dv)) values and adds them (§1.8) [I]
        values = cores * (bi * d + bj * (d + dv)) / (cores * m.aiv_per_aic)
        vec_add = max(values * 4 / r_rd, values / m.vector_lanes_f32)
        det_s = rounds * (2 * m.syncall_s + vec_add / f)
    ws = (q_rows * shape.d + kv_rows * (shape.d + shape.dv)) * 4  # fp32 dQ, dK, dV workspaces
    pre_s = (ws + 2 * q_rows * shape.dv * eb + q_rows * 8 * 4) / m.hbm_bytes_per_s  # zero; rowsum(dO o O)
    post_s = (ws + (q_rows * shape.d + kv_rows * (shape.d + shape.dv)) * eb) / m.hbm_bytes_per_s
    launch_s = m.launch_s + 2 * m.syncall_s  # pre | main | post in one launch, a SyncAll between each
    total = main_s + det_s + pre_s + post_s + launch_s
    flops = shape.useful_flops()
    return Prediction(shape, t, m.name, c1, v, c2, p_item, items, rounds, caps, main_s, det_s, pre_s, post_s,
                      launch_s, total, flops, flops / total / 1e12, flops / total / m.peak_flops)
