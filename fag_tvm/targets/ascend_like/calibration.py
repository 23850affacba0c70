"""Calibration of the pipeline model's most uncertain numbers (ASCEND_MODEL.md §4.6) against published
flash-attention *forward* figures on the 910B2 (§3) -- no backward figure exists -- through a forward-FA
version of the same model, as §4.6's calibration advice says. What is fitted, from what:

1. the FixPipe rate R_fix: pto-isa's simulator stage fit (§3 item 5) puts the qk stage (S = Q K^T for a
   128 x 256 tile at D = 128, S written out in fp32) at 2,487 cycles against an ideal 1,205 MAC cycles; the
   fp32 write-out is the stage's binding pipe at that cost: R_fix = 128 * 256 * 4 / 2487;
2. the forward vector cost: the same fit's p stage is about 0.15 cycles per fp32 element per AIV including
   its GM traffic, i.e. 0.15 * 64 = 9.6 fp32 op-equivalents per element at 64 lanes per cycle;
3. the exposed per-item latency sigma and the fixed per-call cost T0: torch_npu's fused forward at
   S = 8k, 16k, 32k (B = N = 1, D = 128; §3 item 1): a least-squares fit of T = T0 + rounds x items x
   (max(c1 + c2, v1 + v2) + sigma) / f with CANN's row split (S1 blocks of 128 dealt to the 24 cores, each
   running S2 / 512 items: the tiling is our assumption [I]); S = 1k-4k are reported, not fitted (the call
   floor of 58-73 us dominates there).

The backward's vector op count (12) is not observable from forward figures and stays an assumption. The
fitted values are stored in machines.json as the variant "910B2-fitted" (label F); a test re-derives them."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .machine import Machine, load
from .pipeline_model import Shape, Stage, _a, _stage

PTO_QK_STAGE_CYCLES = 2487  # §3 item 5: pto-isa fa_cost_model stage fit, D = 128, Cube_S0 = 128, Tile_S1 = 256
PTO_QK_TILE = (128, 256)
PTO_P_CYCLES_PER_ELEMENT = 0.15  # §3 item 5: p stage, per fp32 element per AIV, GM included
TORCH_NPU_FORWARD_US = {1024: 58.5, 2048: 70.8, 4096: 118.3, 8192: 353.1, 16384: 1118.0, 32768: 3646.0}  # §3 item 1
FITTED_SIZES = (8192, 16384, 32768)
FWD_TILE = (128, 512)  # torch_npu's forward CV tile as this fit assumes it [I]


def forward_stages(shape: Shape, bi: int, bj: int, m: Machine, vector_ops: float,
                   handoff_bytes: int = 4) -> tuple[Stage, Stage, Stage, Stage]:
    """Cube1 (S = Q K^T), Vector1 (online softmax, per AIV), Cube2 (O_tmp = P V), Vector2 (O rescale + add,
    per AIV) cycles of one forward work item; Q stays in L1 over the row's items, K/V slices stream."""
    d, dv, eb, hb = shape.d, shape.dv, shape.eb, handoff_bytes
    e = bi * bj
    macs = m.cube_macs_f16 * m.mmad_efficiency
    r_rd = m.l2_read_rate
    half = e / m.aiv_per_aic
    c1 = _stage({"M": _a(bi) * _a(bj) * _a(d) / macs, "MTE2": bj * d * eb / r_rd,
                 "FIX": e * hb / m.fixpipe_rate}, True)
    v1 = _stage({"MTE2": half * hb / r_rd, "V": half * vector_ops / m.vector_lanes_f32,
                 "MTE3": half * eb / m.l2_write_rate}, True)
    c2 = _stage({"M": _a(bi) * _a(bj) * _a(dv) / macs, "MTE2": (e + bj * dv) * eb / r_rd,
                 "FIX": bi * dv * 4 / m.fixpipe_rate}, True)
    rows = bi / m.aiv_per_aic
    v2 = _stage({"MTE2": rows * dv * 4 / r_rd, "V": rows * dv * 3 / m.vector_lanes_f32}, True)
    return c1, v1, c2, v2


def forward_time_s(shape: Shape, m: Machine, vector_ops: float, sigma: float, t0_s: float,
                   tile: tuple[int, int] = FWD_TILE) -> float:
    """Predicted forward time: T0 + rounds x items per row block x P_item / f (non-causal)."""
    bi, bj = tile
    c1, v1, c2, v2 = forward_stages(shape, bi, bj, m, vector_ops)
    p_item = max(c1.cycles + c2.cycles, v1.cycles + v2.cycles) + sigma
    blocks = shape.b * shape.n1 * math.ceil(shape.s1 / bi)
    rounds = math.ceil(blocks / m.aic_cores)
    return t0_s + rounds * math.ceil(shape.s2 / bj) * p_item / m.freq_hz


def _torch_npu_shape(s: int) -> Shape:
    return Shape(1, 1, 1, s, s, 128, 128, "fp16")


@dataclasses.dataclass(frozen=True)
class Calibration:
    fixpipe_rate: float  # B/cycle
    forward_vector_ops: float  # fp32 op-equivalents per element (forward softmax)
    sigma: float  # exposed cycles per work item
    t0_s: float  # fixed per-call cost of torch_npu's forward
    rows: tuple[tuple[int, float, float], ...]  # (S, measured us, predicted us) for every anchor

    def machine(self, base: Machine | None = None) -> Machine:
        """The base machine with the fitted FixPipe rate and sigma (labelled F)."""
        return (base or load()).with_params(fixpipe_rate=self.fixpipe_rate, flag_latency_cycles=self.sigma)


def fit(base: Machine | None = None) -> Calibration:
    """Fit R_fix, the forward vector cost, sigma and T0 as the module docstring says."""
    m = base or load()
    r_fix = PTO_QK_TILE[0] * PTO_QK_TILE[1] * 4 / PTO_QK_STAGE_CYCLES
    ops = PTO_P_CYCLES_PER_ELEMENT * m.vector_lanes_f32
    mf = m.with_params(fixpipe_rate=r_fix)
    # T(S) = T0 + n(S) * (A + sigma) / f with n the per-core item count and A the stage part: linear in
    # (T0, sigma): least squares over the fitted sizes
    rows_a, rhs = [], []
    for s in FITTED_SIZES:
        sh = _torch_npu_shape(s)
        n = forward_time_s(sh, mf, ops, 1.0, 0.0) - forward_time_s(sh, mf, ops, 0.0, 0.0)  # items / f
        a = forward_time_s(sh, mf, ops, 0.0, 0.0)
        rows_a.append([1.0, n])
        rhs.append(TORCH_NPU_FORWARD_US[s] * 1e-6 - a)
    (t0, sigma), *_ = np.linalg.lstsq(np.array(rows_a), np.array(rhs), rcond=None)
    sigma = float(max(0.0, sigma))
    t0 = float(max(0.0, t0))
    pred = tuple((s, us, forward_time_s(_torch_npu_shape(s), mf, ops, sigma, t0) * 1e6)
                 for s, us in TORCH_NPU_FORWARD_US.items())
    return Calibration(r_fix, ops, sigma, t0, pred)
