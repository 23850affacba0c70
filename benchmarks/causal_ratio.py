"""Causal vs full backward on the same shape (S2 vs S1), calls interleaved so machine noise hits both.

Two input kinds: 64-byte aligned arrays (as torch CPU tensors are: passed zero-copy) and plain NumPy
arrays from `astype` (16-byte aligned: the API first copies q/k/v/dy/o into aligned buffers).

    python benchmarks/causal_ratio.py [--repeat 15]"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    from fag_tvm.bench import backward_callable
    from fag_tvm.workloads import SUITE

    fns = {}
    for kind in ("aligned", "numpy"):
        for sid in ("S1", "S2"):
            fns[(kind, sid)] = backward_callable(SUITE[sid], aligned=kind == "aligned")[0]
            fns[(kind, sid)]()
    ts = {key: [] for key in fns}
    for _ in range(args.repeat):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[key].append(time.perf_counter() - t0)
    m = {key: float(np.median(v)) * 1e3 for key, v in ts.items()}
    for kind in ("aligned", "numpy"):
        s1, s2 = m[(kind, "S1")], m[(kind, "S2")]
        print(f"{kind:8s} inputs: S1 (full) {s1:.2f} ms | S2 (causal) {s2:.2f} ms | causal/full {s2 / s1:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
