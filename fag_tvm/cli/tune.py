"""`fag-tvm tune` (meta-schedule over a target's knobs; records -> tuning_logs) and `fag-tvm report`."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .argtypes import int_at_least


def run_tune(args: argparse.Namespace) -> int:
    from .. import targets
    from ..errors import invalid
    from ..tune.records import check_logs, default_log_dir
    from ..workloads import load_workloads

    t = targets.get(args.target)
    if not t.compiled:
        raise invalid("target", f"{t.name} has no knobs to tune")
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir()
    if args.check:
        rows = check_logs(t, log_dir)
        bad = [r for r in rows if r["reasons"]]
        for r in rows:
            state = "STALE" if r["stale"] else ("ignored" if r["reasons"] else "ok")
            print(f"{state:8s} {Path(r['path']).parent.name} {r['id']} {r.get('direction', '')} {r.get('hw_tag', '')}"
                  + "".join(f"\n         - {x}" for x in r["reasons"]))
        print(f"{len(rows)} entries, {sum(r['stale'] for r in rows)} stale, {len(bad)} not applicable here")
        return 1 if any(r["stale"] for r in rows) else 0
    if not args.workload:
        raise invalid("--workload", "required (S1..S9, a JSON object/list or a JSON file)")
    if args.trials is None or args.trials < 1:
        raise invalid("--trials", "required, >= 1")
    from ..tune.driver import tune_workload

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workloads = load_workloads(args.workload)
    dirs = ["bwd", "fwd"] if args.direction == "both" else [args.direction]
    for w in workloads:
        for d in dirs:
            t0 = time.perf_counter()
            e = tune_workload(w, args.trials, log_dir, direction=d, target=t.name, rpc_tracker=args.rpc_tracker,
                              rpc_key=args.rpc_key, seed=args.seed, per_iter=args.per_iter, confirm=args.confirm,
                              work_dir=args.work_dir, progress=not args.no_progress)
            sp = f"  {e['speedup_vs_default']:.2f}x vs default ({e['default_ms']:.2f} ms)" if "default_ms" in e else ""
            print(f"{e['id']} {d}: chosen {e['kernel']} {e['run_ms']:.3f} ms = {e['gflops']:.1f} GFLOP/s "
                  f"({e['trials']} points, {e['records']} records){sp}  [{time.perf_counter() - t0:.0f} s]")
    print(f"records and best.json under {log_dir / t.name}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from .. import targets
    from ..errors import invalid
    from ..report import main as report_main
    from ..tune.records import default_log_dir

    t = targets.get(args.target)
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir()
    if not any((log_dir / t.name).glob("*/best.json")):  # a report of nothing would look like a finding
        raise invalid("--log-dir", f"no tuning records for target {t.name} under {log_dir} "
                      f"(expected {log_dir / t.name}/<kernel family>/best.json; run `fag-tvm tune` first)")
    return report_main(args)


def add(sub) -> None:
    s = sub.add_parser("tune", help="meta-schedule tuning of a target's kernel knobs for workloads "
                                    "(records -> tuning_logs/<target>/)")
    s.add_argument("--target", default="llvm", help="target to tune (default llvm)")
    s.add_argument("--workload", help="S1..S9, a comma list of them, a JSON object/list or a JSON file")
    s.add_argument("--trials", type=int_at_least(1),
                   help="distinct knob points to measure per workload, counting those already in the database (a "
                        "resumed run only measures the missing ones; the template default is one of them)")
    s.add_argument("--log-dir", help="tuning log root (default: tuning_logs of the checkout, or "
                                     "$FAG_TVM_TUNING_LOGS); records go to <log-dir>/<target>/<kernel family>/")
    s.add_argument("--direction", choices=("bwd", "fwd", "both"), default="bwd")
    s.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: measure on its servers")
    s.add_argument("--rpc-key", help="device key of the RPC servers")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--per-iter", type=int_at_least(1), default=8, help="candidates per search iteration (default 8)")
    s.add_argument("--confirm", type=int_at_least(0), default=3,
                   help="re-measure the N fastest points and the default side by side after the search (default 3; "
                        "0: off). best.json keeps the default unless a point is confirmed >2%% faster")
    s.add_argument("--work-dir", help="meta-schedule work dir for its logs (default: under the kernel cache)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--check", action="store_true",
                   help="list best.json entries that do not apply here (stale source hash, other TVM/CPU); "
                        "exit 1 if any is stale")
    s.set_defaults(fn=run_tune)
    s = sub.add_parser("report", help="tuning curves, default-vs-tuned table and XGBoost model quality (PNG + HTML)")
    s.add_argument("--target", default="llvm", help="target whose logs to report (default llvm)")
    s.add_argument("--log-dir", help="tuning log root (default: tuning_logs)")
    s.add_argument("--bench", help="JSON of benchmarks/tuned_vs_default.py (default: "
                                   "bench_results/tuned_vs_default.json if present)")
    s.add_argument("--out", default="tuning_report", help="output folder (PNG, HTML, JSON)")
    s.add_argument("--no-model", action="store_true", help="skip the XGBoost held-out evaluation")
    s.set_defaults(fn=run_report)
