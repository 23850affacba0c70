"""The ascend-like target's analytic pipeline model on ASCEND_MODEL.md §4.5's shape and a few what-ifs: per
stage the cycles and the binding pipe, the work items, what caps the main phase, time, TFLOPS, utilisation.

    python examples/ascend_model.py [--machine 910B2] [--json model.json] [--suite] [--report DIR]

--suite adds, per suite shape (S1..S9), CANN's default tiling next to the model-best feasible tiling
(targets/ascend_like/search.py) with each one's binding pipe and work-item count.

A model prediction, not a measurement (no NPU here): machines.json says where every number comes from."""
from __future__ import annotations

import argparse
import json

from fag_tvm.targets.ascend_like import machine as am
from fag_tvm.targets.ascend_like import pipeline_model as pm


def rows(m: am.Machine) -> list[tuple[str, pm.Prediction]]:
    causal = dict(b=1, n1=16, n2=16, s1=4096, s2=4096, dtype="fp16", next_tokens=0)
    d128, d64 = pm.Shape(d=128, dv=128, **causal), pm.Shape(d=64, dv=64, **causal)
    out = [(f"D128 CV {bi}x{bi}", pm.predict(d128, pm.Tiling(bi, bi), m)) for bi in (128, 256, 512)]
    out += [("D128 512x512 fp16 hand-off", pm.predict(d128, pm.Tiling(handoff_bytes=2), m)),
            ("D128 512x512 deterministic", pm.predict(d128, pm.Tiling(deterministic=True), m)),
            ("D128 512x512 no double buffer", pm.predict(d128, pm.Tiling(double_buffer=False), m)),
            ("D64 CV 512x512", pm.predict(d64, pm.Tiling(), m)),
            ("D64 512x512 fp16 hand-off", pm.predict(d64, pm.Tiling(handoff_bytes=2), m))]
    return out


def suite_table(m: am.Machine) -> list[dict]:
    """CANN's default vs the model-best tiling per suite shape, printed and returned."""
    from fag_tvm.targets.ascend_like import search
    from fag_tvm.workloads import SUITE

    print(f"\n{'shape':5s} {'CANN default':38s} {'W':>5s} {'us':>8s} {'c1':>4s} {'util':>6s} | "
          f"{'model-best':44s} {'W':>5s} {'us':>8s} {'c1':>4s} {'util':>6s} {'x':>5s}")
    rows = []
    for sid, w in SUITE.items():
        r = search.search(w, m)
        d, b = r.default_prediction, r.best_prediction
        print(f"{sid:5s} {r.default.tag():38s} {d.items:5d} {d.total_s * 1e6:8.1f} {d.cube1.binding:>4s} "
              f"{d.utilisation:6.1%} | {r.best.tag():44s} {b.items:5d} {b.total_s * 1e6:8.1f} "
              f"{b.cube1.binding:>4s} {b.utilisation:6.1%} {r.speedup:5.2f}")
        rows.append({"id": sid, "default": r.default.tag(), "best": r.best.tag(), "speedup": r.speedup,
                     "default_us": d.total_s * 1e6, "best_us": b.total_s * 1e6, "points": r.points})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", default=am.DEFAULT_MACHINE, choices=am.names())
    p.add_argument("--json", help="also write the predictions here")
    p.add_argument("--suite", action="store_true", help="also search the suite shapes' tilings")
    p.add_argument("--report", metavar="DIR", help="write the suite search as HTML + PNG here")
    args = p.parse_args()
    m = am.load(args.machine)
    print(f"{m.name}: {m.aic_cores} AIC x {m.aiv_per_aic} AIV at {m.freq_hz / 1e9:.2f} GHz, "
          f"fp16 cube peak {m.peak_flops / 1e12:.1f} TFLOPS; B=1 N=16 S=4096 causal fp16")
    print(f"{'case':31s} {'cube1 (pipe)':>13s} {'vector':>12s} {'cube2 (pipe)':>13s} {'P_item':>7s} {'W':>5s} "
          f"{'main cap':>9s} {'total ms':>8s} {'TFLOPS':>7s} {'util':>6s}")
    out = []
    for name, r in rows(m):
        print(f"{name:31s} {r.cube1.cycles:7.0f} {r.cube1.binding:5s} {r.vector.cycles:6.0f} {r.vector.binding:5s} "
              f"{r.cube2.cycles:7.0f} {r.cube2.binding:5s} {r.p_item:7.0f} {r.items:5d} {r.main_binding:>9s} "
              f"{r.total_s * 1e3:8.3f} {r.tflops:7.1f} {r.utilisation:6.1%}")
        out.append({"case": name, **r.as_dict()})
    suite = suite_table(m) if args.suite else []
    if args.report:
        from fag_tvm.targets.ascend_like import model_report
        from fag_tvm.workloads import SUITE

        model_report.write(args.report, SUITE, m)
        print(f"wrote {args.report}/index.html (stages.png, model_report.json)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": m.name, "predictions": out, "suite": suite}, fh, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
