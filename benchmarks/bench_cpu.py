"""CPU benchmark suite S1–S9 (DESIGN): fag_tvm backward vs PyTorch's CPU flash backward, same process,
alternating, with the machine's GEMM roof measured in the same run. Same as `fag-tvm bench`.

    python benchmarks/bench_cpu.py [--shapes S1,S2] [--workloads wl.json] [--repeat 7] [--json out.json]
"""
from __future__ import annotations

import sys

from fag_tvm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
