"""`fag-tvm report`: tuning curves, default-vs-tuned table and XGBoost model quality (PNG + HTML + JSON).

Reads records only (fag_tvm.tune.records / database: no tuner, no TVM compiler except for the optional
model-quality evaluation). Inputs: the tuning databases under `<log-dir>/<target>/*/` (curves: records in
measurement order; "best so far" and the template default both use each point's median over all its
measurements, so the plot never claims a gain the record does not have) and, when available, the side-by-side
measurement of `benchmarks/tuned_vs_default.py` (the table; otherwise the table falls back to the
tuning-time measurements in best.json, which were taken at different moments).

Model quality: meta-schedule's XGBModel (same training routine and config as during tuning, fed with
`tune.knob_features`) evaluated on held-out records:
  * leave-one-workload-out: train on every other workload's records (throughput normalised per
    workload, as XGBModel does), rank the held-out workload's measured candidates;
  * 5-fold within workload: the held-out fold's workload is also represented in training.
Reported per held-out set: Spearman rank correlation of predicted score vs measured throughput,
top-5 recall (measured top-5 found in the predicted top-5) and the regret of the predicted best
(measured time of the model's first pick / the best measured time).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import _tvm, targets
from .core.spec import KernelSpec
from .targets.base import Target
from .tune.database import read_family
from .tune.records import BEST, aggregate, check_logs, default_log_dir, read_best
from .workloads import flops


def _median(x: list[float]) -> float:
    return float(np.median(x)) if x else float("inf")


def collect(t: Target, log_dir) -> list[dict]:
    """One row per best.json entry: entry + the records of its database workload in trial order."""
    base = Path(log_dir) / t.name
    rows = []
    for bp in sorted(base.glob(f"*/{BEST}")):
        doc = read_best(bp)
        if not doc:
            continue
        fam = {e["shash"]: e for e in read_family(bp.parent, t)}
        for e in doc.get("entries", []):
            ent = fam.get(e.get("meta", {}).get("workload_hash"))
            if ent is None:
                continue
            fl = flops(e["workload"], e["direction"])
            recs = [{"knobs": r["knobs"], "ok": r["ok"],
                     "ms": _median(r["run_secs"]) * 1e3 if r["ok"] else None,
                     "gflops": fl / _median(r["run_secs"]) / 1e9 if r["ok"] else 0.0} for r in ent["records"]]
            rows.append({"family": bp.parent.name, "entry": e, "task": ent["task"], "records": recs,
                         "raw": ent["records"], "target": t})
    order = {f"S{i}": i for i in range(1, 10)}
    rows.sort(key=lambda r: (order.get(r["entry"]["id"], 99), r["entry"]["id"], r["entry"]["direction"]))
    return rows


# ------------------------------------------------------------------------------------------------
# model quality


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _points(r: dict) -> dict:
    """knobs -> median ms over all measurements of the point (confirmation re-measurements included)."""
    return {k: a["t"] * 1e3 for k, a in aggregate(r["raw"]).items()}


def _dataset(rows: list[dict]):
    """One sample per distinct measured point (no point is both in a training and a held-out set)."""
    X, y, g, ms = [], [], [], []
    for gi, r in enumerate(rows):
        pts = _points(r)
        if len(pts) < 4:
            continue
        best = min(pts.values())
        for k, t in pts.items():
            t_, task = r["target"], r["task"]
            X.append(t_.features(KernelSpec(**task["spec"]), task["workload"], k, task["hw"]))
            y.append(best / t)
            g.append(gi)
            ms.append(t)
    return np.array(X, dtype="float32"), np.array(y), np.array(g), np.array(ms)


def _fit_predict(t: Target, Xtr, ytr, Xte) -> np.ndarray:
    from .tune.cost_model import xgb_model

    m = xgb_model(t, num_warmup_samples=0)
    m._train(xs=[x[None, :] for x in Xtr], ys=ytr.astype("float32"))  # the routine XGBModel.update uses
    return np.asarray(m._predict(xs=[x[None, :] for x in Xte]))


def _scores(pred: np.ndarray, ms: np.ndarray) -> dict:
    thr = 1.0 / ms
    k = min(5, len(ms))
    top_true = set(np.argsort(ms)[:k])
    top_pred = set(np.argsort(-pred)[:k])
    return {"n": int(len(ms)), "spearman": _spearman(pred, thr), "top5_recall": len(top_true & top_pred) / k,
            "regret": float(ms[int(np.argmax(pred))] / ms.min())}


def model_quality(t: Target, rows: list[dict], seed: int = 0) -> dict:
    X, y, g, ms = _dataset(rows)
    out: dict[str, Any] = {"points": int(len(y)), "workloads": int(len(set(g.tolist()))),
                           "features": len(t.feature_names), "lowo": [], "kfold": []}
    if len(set(g.tolist())) < 2:
        return out
    for gi in sorted(set(g.tolist())):
        te = g == gi
        pred = _fit_predict(t, X[~te], y[~te], X[te])
        out["lowo"].append({"id": rows[gi]["entry"]["id"], **_scores(pred, ms[te])})
    rng = np.random.default_rng(seed)
    for gi in sorted(set(g.tolist())):
        idx = np.flatnonzero(g == gi)
        rng.shuffle(idx)
        folds = np.array_split(idx, 5)
        preds = np.zeros(len(idx))
        pos = {v: i for i, v in enumerate(idx)}
        for f in folds:
            if len(f) == 0:
                continue
            mask = np.ones(len(y), bool)
            mask[f] = False
            p = _fit_predict(t, X[mask], y[mask], X[f])
            for v, pv in zip(f, p):
                preds[pos[v]] = pv
        out["kfold"].append({"id": rows[gi]["entry"]["id"], **_scores(preds, ms[idx])})
    for key in ("lowo", "kfold"):
        vals = out[key]
        out[key + "_mean"] = {m: float(np.nanmean([v[m] for v in vals])) for m in ("spearman", "top5_recall", "regret")}
    return out


# ------------------------------------------------------------------------------------------------
# shape of the space (is the default already at the top?)


def space_summary(rows: list[dict]) -> list[dict]:
    """Per workload: rank of the template default among the measured points (median over repeated
    measurements), its distance to the fastest point, and how flat the measured space is near the top."""
    out = []
    for r in rows:
        e = r["entry"]
        t = _points(r)
        if not t:
            continue
        best = min(t.values())
        dt = t.get(r["target"].knobs_from_dict(e["default_knobs"]))
        vals = np.array(sorted(t.values()))
        out.append({"id": e["id"], "points": len(t), "default_rank": 1 + int(np.sum(vals < dt)) if dt else None,
                    "default_over_fastest": dt / best if dt else None,
                    "within_5pct": float(np.mean(vals <= best * 1.05)), "within_10pct": float(np.mean(vals <= best * 1.10)),
                    "median_over_fastest": float(np.median(vals) / best), "worst_over_fastest": float(vals[-1] / best)})
    return out


# ------------------------------------------------------------------------------------------------
# table


def table_rows(rows: list[dict], bench: dict | None) -> tuple[list[dict], str]:
    if bench and bench.get("rows"):
        return bench["rows"], f"side by side in one run ({bench.get('meta', {}).get('date', '?')}, " \
                              f"benchmarks/tuned_vs_default.py)"
    out = []
    for r in rows:
        e = r["entry"]
        if "default_ms" not in e:
            continue
        out.append({"id": e["id"], "direction": e["direction"], "default_knobs": e["default_knobs"],
                    "tuned_knobs": e["knobs"], "default_ms": e["default_ms"], "tuned_ms": e["run_ms"],
                    "speedup": e["default_ms"] / e["run_ms"], "trials": e["trials"]})
    return out, "from the tuning records (default and best measured at different moments)"


def _ktag(k: dict) -> str:
    return " ".join(f"{n}={v}" for n, v in k.items())


# ------------------------------------------------------------------------------------------------
# plots + HTML


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(rows))
    cols = 3 if n > 4 else n
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        e = r["entry"]
        fl = flops(e["workload"], e["direction"])
        pts = _points(r)  # knobs -> median ms over every measurement of the point
        g = [x["gflops"] for x in r["records"]]
        # best so far over each point's median (the same statistic as the table and the default line)
        med = [fl / pts[x["knobs"]] / 1e6 if x["ok"] and x["knobs"] in pts else 0.0 for x in r["records"]]
        best = np.maximum.accumulate(med) if med else []
        t = np.arange(1, len(g) + 1)
        ax.scatter(t, g, s=10, color="0.6", label="measurement")
        ax.plot(t, best, color="C0", lw=2, label="best so far (point medians)")
        dflt = pts.get(r["target"].knobs_from_dict(e["default_knobs"]))
        if dflt:
            ax.axhline(fl / dflt / 1e6, color="C3", ls="--", lw=1, label="template default (median)")
        ax.set_title(f"{e['id']} {e['direction']}: {_ktag(e['knobs'])}", fontsize=9)
        ax.set_xlabel("trial")
        ax.set_ylabel("GFLOP/s")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    if rows:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_table(trows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(trows) + 2), 3.2))
    ids = [r["id"] for r in trows]
    sp = [r["speedup"] for r in trows]
    ax.bar(ids, sp, color=["C2" if s >= 1.15 else "C0" if s >= 1.0 else "C3" for s in sp])
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(1.15, color="C2", ls="--", lw=1, label="1.15x")
    ax.set_ylabel("default time / tuned time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_html(out: Path, rows, trows, source, mq, checks, space=()) -> None:
    h = ["<!doctype html><meta charset='utf-8'><title>fag_tvm tuning report</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}</style>",
         f"<h1>fag_tvm tuning report</h1><p>{html.escape(time.strftime('%Y-%m-%d %H:%M'))} &middot; "
         f"target {html.escape(rows[0]['target'].name if rows else '-')} &middot; "
         f"{html.escape(rows[0]['target'].machine() if rows else '')} &middot; TVM {html.escape(_tvm.tvm_version())}</p>",
         f"<h2>Default vs tuned</h2><p>{html.escape(source)}</p><table><tr><th>id</th><th>default knobs</th>"
         "<th>tuned knobs</th><th>default ms</th><th>tuned ms</th><th>speedup</th></tr>"]
    for r in trows:
        h.append(f"<tr><td>{r['id']}</td><td>{_ktag(r['default_knobs'])}</td><td>{_ktag(r['tuned_knobs'])}</td>"
                 f"<td>{r['default_ms']:.2f}</td><td>{r['tuned_ms']:.2f}</td><td>{r['speedup']:.2f}x</td></tr>")
    n115 = sum(r["speedup"] >= 1.15 for r in trows)
    h.append(f"</table><p>{n115} of {len(trows)} workloads at least 1.15x faster than the template default.</p>"
             "<img src='default_vs_tuned.png'><h2>Tuning curves</h2><img src='tuning_curves.png'>")
    if space:
        h.append("<h2>Where the template default sits in the measured space</h2><table><tr><th>id</th><th>points</th>"
                 "<th>default rank</th><th>default / fastest</th><th>points within 5%</th><th>within 10%</th>"
                 "<th>median / fastest</th><th>worst / fastest</th></tr>")
        for x in space:
            dr = "-" if x["default_rank"] is None else x["default_rank"]
            dof = "-" if x["default_over_fastest"] is None else f"{x['default_over_fastest']:.3f}"
            h.append(f"<tr><td>{x['id']}</td><td>{x['points']}</td><td>{dr}</td><td>{dof}</td>"
                     f"<td>{x['within_5pct']:.0%}</td><td>{x['within_10pct']:.0%}</td>"
                     f"<td>{x['median_over_fastest']:.2f}</td><td>{x['worst_over_fastest']:.2f}</td></tr>")
        h.append("</table>")
    if mq and mq.get("lowo"):
        h.append(f"<h2>XGBoost cost model on held-out records</h2><p>{mq['points']} measured points of "
                 f"{mq['workloads']} workloads, {mq['features']} features.</p><table><tr><th>held out</th>"
                 "<th>n</th><th>Spearman (LOWO)</th><th>top-5 recall (LOWO)</th><th>regret (LOWO)</th>"
                 "<th>Spearman (5-fold)</th><th>top-5 recall (5-fold)</th></tr>")
        for a, b in zip(mq["lowo"], mq["kfold"]):
            h.append(f"<tr><td>{a['id']}</td><td>{a['n']}</td><td>{a['spearman']:.2f}</td>"
                     f"<td>{a['top5_recall']:.2f}</td><td>{a['regret']:.2f}</td><td>{b['spearman']:.2f}</td>"
                     f"<td>{b['top5_recall']:.2f}</td></tr>")
        lm, km = mq["lowo_mean"], mq["kfold_mean"]
        h.append(f"<tr><th>mean</th><td></td><th>{lm['spearman']:.2f}</th><th>{lm['top5_recall']:.2f}</th>"
                 f"<th>{lm['regret']:.2f}</th><th>{km['spearman']:.2f}</th><th>{km['top5_recall']:.2f}</th></tr></table>")
    h.append("<h2>Log status</h2><ul>")
    for c in checks:
        st = "STALE" if c["stale"] else ("not applicable here" if c["reasons"] else "ok")
        h.append(f"<li>{html.escape(Path(c['path']).parent.name)} {html.escape(str(c['id']))}: {st}"
                 + "".join(f"<br>&nbsp;&nbsp;{html.escape(x)}" for x in c["reasons"]) + "</li>")
    h.append("</ul>")
    (out / "index.html").write_text("\n".join(h))


def build_report(log_dir, out_dir, bench_path: str | None = None, model: bool = True, target: str = "llvm") -> dict:
    t = targets.get(target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(t, log_dir)
    bench = None
    bp = bench_path or ("bench_results/tuned_vs_default.json" if os.path.exists("bench_results/tuned_vs_default.json")
                        else None)
    if bp:
        with open(bp) as f:
            bench = json.load(f)
    trows, source = table_rows(rows, bench)
    mq = model_quality(t, rows) if model else None
    checks = check_logs(t, log_dir)
    plot_curves(rows, out / "tuning_curves.png")
    plot_table(trows, out / "default_vs_tuned.png")
    space = space_summary(rows)
    write_html(out, rows, trows, source, mq, checks, space)
    section = t.report_section([dict(r["entry"], points=len(r["records"])) for r in rows], str(out / t.name))
    if section:
        with open(out / "index.html", "a") as f:
            f.write(f"<h2>{html.escape(t.name)}</h2><p><a href='{html.escape(t.name)}/{section['index']}'>"
                    f"per-stage breakdown: tuned vs default ({html.escape(t.name)})</a></p>")
    summary = {"target_section": section, "table": trows, "table_source": source, "model_quality": mq, "checks": checks, "space": space,
               "curves": [{"id": r["entry"]["id"], "direction": r["entry"]["direction"],
                           "gflops": [x["gflops"] for x in r["records"]]} for r in rows]}
    with open(out / "report.json", "w") as f:
        json.dump(summary, f, indent=1, default=float)
    return summary


def main(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir()
    s = build_report(log_dir, args.out, args.bench, model=not args.no_model, target=getattr(args, "target", "llvm"))
    for r in s["table"]:
        print(f"{r['id']:4s} default [{_ktag(r['default_knobs'])}] {r['default_ms']:.2f} ms -> tuned "
              f"[{_ktag(r['tuned_knobs'])}] {r['tuned_ms']:.2f} ms: {r['speedup']:.2f}x")
    print(f"({s['table_source']})")
    for x in s["space"]:
        dof = "-" if x["default_over_fastest"] is None else f"{x['default_over_fastest']:.3f}"
        print(f"  {x['id']}: default rank {x['default_rank']}/{x['points']}, default/fastest {dof}, "
              f"{x['within_5pct']:.0%} of points within 5% of the fastest, worst/fastest {x['worst_over_fastest']:.2f}")
    mq = s["model_quality"]
    if mq and mq.get("lowo"):
        lm, km = mq["lowo_mean"], mq["kfold_mean"]
        print(f"XGBoost on held-out records ({mq['points']} measured points, {mq['workloads']} workloads): "
              f"leave-one-workload-out Spearman {lm['spearman']:.2f}, top-5 recall {lm['top5_recall']:.2f}, "
              f"regret {lm['regret']:.2f}; 5-fold Spearman {km['spearman']:.2f}, top-5 recall {km['top5_recall']:.2f}")
    stale = [c for c in s["checks"] if c["stale"]]
    if stale:
        print(f"{len(stale)} STALE entries (fag-tvm tune --check)", file=sys.stderr)
    print(f"wrote {args.out}/index.html, tuning_curves.png, default_vs_tuned.png, report.json")
    return 0
