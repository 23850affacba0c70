"""`fag-tvm bench`: a target's backward vs PyTorch's CPU flash backward, with the machine's roof measured
in the same run (fag_tvm.bench); table + JSON."""
from __future__ import annotations

import argparse

from .argtypes import int_at_least


def run(args: argparse.Namespace) -> int:
    from ..bench import run as bench_run
    from ..workloads import SUITE, load_workloads

    workloads = load_workloads(args.workloads or args.shapes or ",".join(SUITE))
    bench_run(workloads, target=args.target, repeat=args.repeat, threads=args.threads, json_path=args.json,
              peer=not args.no_peer, roof=not args.no_roof)
    return 0


def add(sub) -> None:
    s = sub.add_parser("bench", help="backward vs PyTorch's CPU flash backward, roof measured in the same run",
                       description=__doc__)
    s.add_argument("--target", default="llvm", help="target to benchmark (default llvm)")
    s.add_argument("--shapes", help="suite ids, comma separated (default: S1..S9)")
    s.add_argument("--workloads", help="workload JSON (object or list), a JSON file, or suite ids")
    s.add_argument("--repeat", type=int_at_least(1), default=7, help="timed calls per side (alternating; default 7)")
    s.add_argument("--threads", type=int_at_least(1),
                   help="threads for ours, the peer and the roof (default: all cores)")
    s.add_argument("--json", default="bench_results/bench_cpu.json", help="JSON output path")
    s.add_argument("--no-peer", action="store_true", help="skip PyTorch")
    s.add_argument("--no-roof", action="store_true", help="skip the GEMM roof measurement")
    s.set_defaults(fn=run)
