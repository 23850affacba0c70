"""Thread scaling of the backward: the same shape with TVM_NUM_THREADS=1 and with the default (all cores).

    python benchmarks/thread_scaling.py [--shape S2] [--repeat 5]
Each setting runs in its own process (TVM's pool size is fixed when it starts)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, os, sys, time, numpy as np
from fag_tvm.bench import backward_callable
from fag_tvm.workloads import SUITE
fn = backward_callable(SUITE[{sid!r}])[0]
fn()
ts = []
for _ in range({repeat}):
    t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
print(json.dumps({{"threads": os.environ.get("TVM_NUM_THREADS"), "ms": 1e3 * float(np.median(ts)),
                  "os_threads": len(os.listdir("/proc/self/task"))}}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="S2")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rows = []
    for threads in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
        if threads:
            env["TVM_NUM_THREADS"] = threads
        out = subprocess.run([sys.executable, "-c", _CHILD.format(sid=args.shape, repeat=args.repeat)],
                             env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"{args.shape}: 1 thread {rows[0]['ms']:.1f} ms | default ({rows[1]['threads']} threads) "
          f"{rows[1]['ms']:.1f} ms | speedup {rows[0]['ms'] / rows[1]['ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
