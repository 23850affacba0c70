"""`fag-tvm compile`: an AOT package for a list of workloads (DESIGN workload JSON, or suite ids S1..S9)."""
from __future__ import annotations

import argparse
import time


def run(args: argparse.Namespace) -> int:
    from ..package import build_package
    from ..workloads import load_workloads

    workloads = load_workloads(args.workloads)
    names = tuple(x.strip() for x in args.target.split(",") if x.strip())
    t0 = time.perf_counter()
    m = build_package(workloads, args.out, names, force=args.force)
    n = sum(len(a["kernels"]) for a in m["artifacts"])
    print(f"{args.out}: {n} kernels for {len(workloads)} workloads ({', '.join(names)}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def add(sub) -> None:
    s = sub.add_parser("compile", help="build an AOT package (manifest + libraries + runtime) for workloads")
    s.add_argument("--target", default="llvm", help="target(s) to build, comma separated (default llvm)")
    s.add_argument("--workloads", required=True,
                   help="JSON file with a list of workloads, a JSON string, or suite ids like S1,S3")
    s.add_argument("--out", required=True, help="package folder (an earlier package there is replaced atomically)")
    s.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier package")
    s.set_defaults(fn=run)
