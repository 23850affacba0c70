"""The LLVM backward's fp32 workspace `ws` (ABI.md "ws"): Di of every stats row, then the fp32 dq
accumulator. Both parts are O(rows·D): no Sq×Skv buffer exists anywhere."""
from __future__ import annotations

from ...core.abi import pad16
from ...core.spec import KernelSpec


def dq_acc_offset(total_rows):
    """Offset of the dq accumulator in ws: the Di part, rows rounded up to 16 (int or TIR expression)."""
    return pad16(total_rows)


def workspace_floats(spec: KernelSpec, total_rows: int) -> int:
    """fp32 elements of ws for `total_rows` stats rows: Di + dq_acc[rows, D padded to 16]."""
    return dq_acc_offset(total_rows) + total_rows * pad16(spec.d)
