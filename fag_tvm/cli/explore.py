"""`fag-tvm explore`: a knob grid for one workload, built and measured side by side (fag_tvm.explore)."""
from __future__ import annotations

import argparse
import os

from .argtypes import int_at_least


def _pairs(items: list[str] | None, flag: str, many: bool) -> dict[str, list[str] | str]:
    from ..errors import invalid

    out: dict = {}
    for s in items or []:
        k, sep, v = s.partition("=")
        if not sep or not k or not v:
            raise invalid(flag, f"{s!r}: expected knob=value{',value...' if many else ''}")
        out[k] = [x for x in v.split(",") if x] if many else v
    return out


def run(args: argparse.Namespace) -> int:
    from .. import bench
    from ..core.files import atomic_write_json
    from ..explore import explore, format_table
    from ..workloads import load_workloads

    (w,) = load_workloads(args.workload)[:1]
    vary = _pairs(args.vary, "--vary", True)
    threads = int(os.environ.get("TVM_NUM_THREADS", "0")) or None
    from .. import targets

    timing = targets.get(args.target).timing
    model = timing == "model"  # its roof is the modelled machine's peak
    roof = None if args.no_roof or timing != "measured" else bench.measure_roof(threads or os.cpu_count() or 1, "fp32")
    result = explore(args.target, w, args.direction, _pairs(args.set, "--set", False), vary, args.repeat, roof)
    table = format_table(result, list(vary))
    print(table)
    if args.report:
        from ..explore_report import write_report

        write_report(result, list(vary), w, args.report, table)
        extra = (", roofline.png" if result["roof"] else "") + (", stages.png" if model else "")
        print(f"wrote {args.report}/index.html" + ("" if timing == "none" else f" (grid.png{extra})"))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def add(sub) -> None:
    s = sub.add_parser("explore", help="build and measure a knob grid for one workload, side by side",
                       description="Every point of --vary's grid (over the template's default with --set applied) "
                                   "is built, checked against the default's result and timed, alternating between "
                                   "points; the default and the tuned record are added for comparison. Infeasible "
                                   "points are listed with the template's reason.")
    s.add_argument("--target", default="llvm")
    s.add_argument("--workload", required=True, help="a suite id (S1..S9), JSON or a JSON file (the first workload)")
    s.add_argument("--direction", choices=("fwd", "bwd"), default="bwd")
    s.add_argument("--set", action="append", metavar="KNOB=VALUE", help="fix a knob for every point")
    s.add_argument("--vary", action="append", metavar="KNOB=V1,V2,...", help="a grid axis (repeatable)")
    s.add_argument("--repeat", type=int_at_least(1), default=5, help="timed calls per point (alternating)")
    s.add_argument("--no-roof", action="store_true", help="skip measuring the machine's GEMM roof")
    s.add_argument("--json", help="write the exploration as JSON")
    s.add_argument("--report", metavar="DIR", help="also write an HTML + PNG report (grid, roofline) here")
    s.set_defaults(fn=run)
