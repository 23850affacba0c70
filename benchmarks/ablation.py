"""Ablations of the backward on one suite shape: what each design choice is worth, in one process.

    python benchmarks/ablation.py [--shape S2] [--repeat 5]
Variants: default knobs; tile skipping off (TILE_SKIP=0, causal shapes); other tile sizes. Thread
scaling is in thread_scaling.py (the pool size is fixed per process)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np



def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="S2")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default="bench_results/ablation.json")
    args = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 2))
    import fag_tvm
    from fag_tvm import jit, targets
    from fag_tvm.config import validate
    from fag_tvm.targets.llvm import launch

    llvm = targets.get("llvm")
    hw = llvm.hw()

    from fag_tvm.workloads import SUITE, call_args, flops

    w = SUITE[args.shape]
    causal = w["sparse_mode"] in (2, 3)
    q, k, v, dy, kw = call_args(w)
    kw["scale_value"] = w["D"] ** -0.5
    f = fag_tvm.flash_attention_score(q, k, v, **kw)
    arrays = dict(query=q, key=k, value=v, dy=dy, atten_mask=kw.get("atten_mask"), softmax_max=f.softmax_max,
                  softmax_sum=f.softmax_sum, attention_in=f.attention_out)
    cfg = validate("bwd", q, k, v, dy, **{x: arrays[x] for x in ("atten_mask", "softmax_max", "softmax_sum",
                                                                  "attention_in")},
                   **{x: kw[x] for x in kw if x != "atten_mask"})

    def timed(provider=jit.provider(llvm), tile_skip=None):
        run = launch.Launch(cfg, "bwd", arrays, provider, tile_skip=tile_skip)  # tile_skip: forced, or chosen
        launch.run_arrays(run, arrays)
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            launch.run_arrays(run, arrays)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    fl = flops(w)
    rows = [("default knobs", timed())]
    if causal:
        rows.append(("tile skipping off (TILE_SKIP=0)", timed(tile_skip=False)))
    for bq, bkv in ((32, 32), (64, 128), (128, 64), (128, 128)):
        rows.append((f"tiles {bq}x{bkv}", timed(
            lambda spec, bq=bq, bkv=bkv: jit.kernel(llvm, spec, llvm.schedule.with_knobs(
                llvm.default_knobs(spec, hw), block_q=bq, block_kv=bkv)))))
    base = rows[0][1]
    print(f"{args.shape} backward ({'causal' if causal else 'full'}), threads {os.environ['TVM_NUM_THREADS']}")
    for name, t in rows:
        print(f"  {name:34s} {t * 1e3:8.2f} ms  {fl / t / 1e9:7.1f} GFLOP/s  x{t / base:5.2f} vs default")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    json.dump({"shape": args.shape, "rows": [{"variant": n, "ms": t * 1e3} for n, t in rows]},
              open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
