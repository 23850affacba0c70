"""fag_tvm.explore / explore_report pieces that need no build: knob parsing, the grid, the roofline's minimal
traffic (the console-script run of a real grid is in tests/test_cli.py)."""
from __future__ import annotations

import pytest

from fag_tvm.errors import FagError
from fag_tvm.explore import grid, parse_knob
from fag_tvm.explore_report import minimal_bytes
from fag_tvm.schedules.ascend_like import Knobs as AscendKnobs
from fag_tvm.schedules.llvm import Knobs


def test_knob_values_are_typed_like_the_template():
    assert parse_knob(Knobs(), "block_kv", "128") == 128
    a = AscendKnobs()
    assert parse_knob(a, "kv_resident", "false") is False and parse_knob(a, "dkdv", "l1") == "l1"
    with pytest.raises(FagError, match="unknown knob"):
        parse_knob(Knobs(), "warp", "1")
    with pytest.raises(FagError, match="expected a int"):
        parse_knob(Knobs(), "block_q", "big")
    with pytest.raises(FagError, match="expected a bool"):
        parse_knob(a, "kv_resident", "maybe")


def test_grid_is_the_product_over_the_base():
    g = grid(Knobs(mr=2), {"block_q": [16, 32], "block_kv": [16, 32, 64]})
    assert len(g) == 6 and all(k.mr == 2 for k in g)
    assert {(k.block_q, k.block_kv) for k in g} == {(q, kv) for q in (16, 32) for kv in (16, 32, 64)}


def test_minimal_traffic():
    w = {"B": 2, "N1": 4, "N2": 2, "Sq": 10, "Skv": 12, "D": 8, "Dv": 6, "input_layout": "BNSD",
         "dtype": "fp16", "sparse_mode": 0}
    q, kv, o, rows = 2 * 4 * 10 * 8, 2 * 2 * 12 * (8 + 6), 2 * 4 * 10 * 6, 2 * 4 * 10
    assert minimal_bytes(w, "fwd") == (q + kv + o) * 2 + rows * 64
    assert minimal_bytes(w, "bwd") == (q + kv + 2 * o) * 2 + rows * 64 + (q + kv) * 2
    bsh = dict(w, input_layout="BSH", dtype="fp32")  # the layout does not change the traffic, the dtype does
    assert minimal_bytes(bsh, "fwd") == (q + kv + o) * 4 + rows * 64
