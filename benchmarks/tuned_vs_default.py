"""Template-default vs tuned knobs, measured side by side in one process (suite S1–S9, backward).

For each workload: the default knobs of schedules/llvm.py and the knobs the build path picks from
tuning_logs (`jit.knobs_for(target, spec, shape=workload)`, i.e. the record of that shape) are compiled to
two kernels, run once on the same inputs (outputs must agree), then timed alternately (ABAB…, the
order flipping every repetition, so drift and noise hit both). Reported: median ms, GFLOP/s, the
speedup default/tuned (ratio of medians) and the median of the per-repetition paired ratios.

    python benchmarks/tuned_vs_default.py [--shapes S1,S2] [--repeat 9] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16).astype(np.float32)
    return a.astype(np.float32)


def _time(kernel, args, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        kernel(*args)
    return (time.perf_counter() - t0) / number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="S1,S2,S3,S4,S5,S6,S7,S8,S9")
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--min-ms", type=float, default=60.0, help="minimum duration of one timed repetition")
    p.add_argument("--json", default="bench_results/tuned_vs_default.json")
    args = p.parse_args(argv)

    from fag_tvm import _tvm

    _tvm.set_num_threads()
    from dataclasses import asdict

    from fag_tvm import jit, targets
    from fag_tvm.tune.task import make_task, spec_of
    from fag_tvm.workloads import SUITE, flops

    llvm = targets.get("llvm")
    hw = llvm.hw()
    rows = []
    for sid in args.shapes.split(","):
        w = dict(SUITE[sid], id=sid)
        task = make_task(llvm, w, hw=hw)
        spec = spec_of(task)
        dk = llvm.default_knobs(spec, hw)
        tk, origin = jit.knobs_for(llvm, spec, hw, shape=w)
        kd = jit.kernel(llvm, spec, dk)
        kt = jit.kernel(llvm, spec, tk)
        host = llvm.measurement_args(task)
        names = kd.param_names
        outs = [names.index(n) for n in ("dq", "dk", "dv")]
        kd(*host)
        ref = [_f32(host[i].copy(), spec.dtype) for i in outs]
        kt(*host)
        got = [_f32(host[i], spec.dtype) for i in outs]
        err = max(float(np.max(np.abs(a - b)) / max(1e-30, float(np.max(np.abs(b))))) for a, b in zip(got, ref))
        tol = 1e-3 if spec.dtype == "float32" else 3e-2
        if not err <= tol:
            print(f"{sid}: tuned kernel disagrees with the default (rel err {err:.2e})", file=sys.stderr)
            return 1
        t1 = _time(kd, host, 1)
        number = max(1, int(np.ceil(args.min_ms / 1e3 / max(t1, 1e-6))))
        td, tt = [], []
        for r in range(args.repeat):
            pair = [(kd, td), (kt, tt)] if r % 2 == 0 else [(kt, tt), (kd, td)]
            for k, acc in pair:
                acc.append(_time(k, host, number))
        fl = flops(w)
        md, mt = float(np.median(td)), float(np.median(tt))
        row = {"id": sid, "shape": {k: w[k] for k in ("B", "N1", "N2", "Sq", "Skv", "D", "dtype", "sparse_mode")},
               "default_knobs": asdict(dk), "tuned_knobs": asdict(tk), "tuned_origin": origin,
               "default_kernel": kd.name, "tuned_kernel": kt.name, "default_ms": md * 1e3, "tuned_ms": mt * 1e3,
               "default_gflops": fl / md / 1e9, "tuned_gflops": fl / mt / 1e9, "speedup": md / mt,
               "paired_speedup": float(np.median(np.array(td) / np.array(tt))), "rel_err_vs_default": err,
               "number": number, "default_all_ms": [x * 1e3 for x in td], "tuned_all_ms": [x * 1e3 for x in tt]}
        rows.append(row)
        print(f"{sid}: default {row['default_ms']:.2f} ms  tuned {row['tuned_ms']:.2f} ms  "
              f"{row['speedup']:.2f}x  ({origin.split('#')[-1] if origin != 'default' else 'NO RECORD'})",
              file=sys.stderr, flush=True)
        del host

    def kt_(k):
        return f"{k['block_q']}x{k['block_kv']} mr{k['mr']} nr{k['nr']}"

    hdr = (f"{'id':3s} {'default knobs':17s} {'tuned knobs':17s} {'default ms':>10s} {'tuned ms':>9s} "
           f"{'def GF/s':>8s} {'tun GF/s':>8s} {'speedup':>7s} {'paired':>6s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['id']:3s} {kt_(r['default_knobs']):17s} {kt_(r['tuned_knobs']):17s} {r['default_ms']:10.2f} "
              f"{r['tuned_ms']:9.2f} {r['default_gflops']:8.1f} {r['tuned_gflops']:8.1f} {r['speedup']:6.2f}x "
              f"{r['paired_speedup']:5.2f}x")
    n = sum(r["speedup"] >= 1.15 for r in rows)
    print(f"{n} of {len(rows)} shapes >= 1.15x faster with the tuned knobs; threads {_tvm.num_threads()}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": llvm.machine(), "threads": _tvm.num_threads(),
            "hw": hw, "tvm": _tvm.tvm_version(), "source_hash": llvm.source_hash(),
            "repeat": args.repeat, "min_ms": args.min_ms}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
