"""The CUDA backward's fp32 workspace (the ABI's `ws`, one flat buffer):

  DI      rowsum(dY o O) of every stats row (the preprocess kernel writes it; the tile math reads it)
  FLAGS   one poison flag per (b, n2) task (kernels/common/finite: non-finite inputs poison their task)
  DQ_ACC  the fp32 dQ accumulator [rows, DP] the dK/dV kernel adds into with atomics (atomic mode)

O(rows * D): no Sq x Skv buffer exists. Offsets are plain ints or TIR expressions (the same formulas serve
the launcher and the kernels)."""
from __future__ import annotations

from ...core import abi
from ...core.abi import pad16

I_DETERMINISTIC = abi._I12  # a reserved iparams slot: 1 = the deterministic dQ kernel, no float atomics


def _p16(x):
    return pad16(x) if isinstance(x, int) else (x + 15) // 16 * 16


def layout(total_rows, tasks, dp: int) -> dict:
    """Offsets (floats) of every part: di, flags, dq_acc, total."""
    flags = _p16(total_rows)
    dq = flags + _p16(tasks)
    return {"di": 0, "flags": flags, "dq_acc": dq, "total": dq + total_rows * dp}
