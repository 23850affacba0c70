"""The ascend-like backward's fp32 GM workspace (one flat buffer, the ABI's `ws`), as CANN lays its own out:

  DI      rowsum(dY o O) of every stats row (the SFMG pre-pass writes it, Vector1 reads it)
  FLAGS   one poison flag per (b, n2) task (kernels/common/finite: non-finite inputs poison their task)
  SLOTS   the fp32 dQ / dK / dV accumulators: one slot with atomic accumulation, one per cube core with
          deterministic accumulation (each core adds into its own slot; the post pass sums slots in core order)
  CV      per cube core, the CV block's hand-off: S then dP (Cube1 -> Vector1), overwritten in place by P and dS
          (Vector1 -> Cube2)

Every part is O(rows * D) or O(cores * CV block): no Sq x Skv buffer exists. Offsets are plain ints or TIR
expressions (the same formulas serve the launcher and the kernel)."""
from __future__ import annotations

from ...core import abi
from ...core.abi import pad16

I_DETERMINISTIC = abi._I12  # a reserved iparams slot: this target's runtime accumulation mode (1: per-core slots)


def slot_floats(total_rows, kv_rows, dp: int, dvp: int):
    """One accumulator slot: dq[rows, DP] + dk[kv_rows, DP] + dv[kv_rows, DVP], rounded to 16 floats."""
    return pad16(total_rows * dp + kv_rows * (dp + dvp)) if isinstance(total_rows, int) else \
        (total_rows * dp + kv_rows * (dp + dvp) + 15) // 16 * 16


def layout(total_rows, tasks, kv_rows, dp: int, dvp: int, slots, cores: int, cv_floats: int):
    """Offsets (floats) of every part: a dict with di, flags, slots, slot, dk, dv, cv, total."""
    di = 0
    flags = _p16(total_rows)
    acc = flags + _p16(tasks)
    slot = slot_floats(total_rows, kv_rows, dp, dvp)
    cv = acc + slots * slot
    return {"di": di, "flags": flags, "slots": acc, "slot": slot, "dk": total_rows * dp,
            "dv": total_rows * dp + kv_rows * dp, "cv": cv, "total": cv + cores * 2 * cv_floats}


def _p16(x):
    return pad16(x) if isinstance(x, int) else (x + 15) // 16 * 16
