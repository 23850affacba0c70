"""HTML + PNG report of the ascend-like pipeline model over the suite: per shape, CANN's default tiling next
to the model-best one (search.py) -- the per-stage cycles with each stage's binding pipe, predicted time,
utilisation against the cube peak -- and the machine's assumptions with their labels and sources.

A model prediction, not a measurement: the report says so at the top."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

from .machine import Machine
from .search import SearchResult, search


def _plot_stages(results: dict[str, SearchResult], path: Path, best_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ids = list(results)
    x = np.arange(len(ids))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for off, which, hatch in ((-0.2, "default_prediction", ""), (0.2, "best_prediction", "//")):
        c1 = [getattr(results[i], which).cube1.cycles for i in ids]
        c2 = [getattr(results[i], which).cube2.cycles for i in ids]
        v = [getattr(results[i], which).vector.cycles for i in ids]
        ax.bar(x + off, c1, 0.38, color="C0", hatch=hatch, label=f"Cube1 ({'default' if off < 0 else best_label})")
        ax.bar(x + off, c2, 0.38, bottom=c1, color="C1", hatch=hatch, label=f"Cube2 ({'default' if off < 0 else best_label})")
        ax.scatter(x + off, v, color="k", marker="_", s=200, zorder=3,
                   label="Vector (per AIV)" if off < 0 else None)
        for xi, i in zip(x, ids):
            p = getattr(results[i], which)
            ax.text(xi + off, p.cube1.cycles + p.cube2.cycles, f"{p.cube1.binding}/{p.cube2.binding}",
                    ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, ids)
    ax.set_ylabel("cycles per work item (log)")
    ax.set_yscale("log")
    ax.set_title(f"per-stage cycles: CANN default (plain) vs {best_label} (hatched); label = binding pipe", fontsize=8)
    ax.legend(fontsize=6)
    ax2.bar(x - 0.2, [results[i].default_prediction.utilisation * 100 for i in ids], 0.38, label="CANN default")
    ax2.bar(x + 0.2, [results[i].best_prediction.utilisation * 100 for i in ids], 0.38, label=best_label)
    ax2.set_xticks(x, ids)
    ax2.set_ylabel("% of the fp16 cube peak")
    ax2.set_title("predicted utilisation (fp32 shapes: the cube's fp32 rate is 1/4 of it)", fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(out_dir: str, workloads: dict[str, dict], m: Machine) -> dict:
    """index.html + stages.png + model_report.json for `workloads` ({id: workload}) on machine `m`: CANN's
    default next to the model-best point of an exhaustive search."""
    return write_results(out_dir, {i: search(w, m) for i, w in workloads.items()}, m, "model-best")


def tuned_results(entries: list[dict], m: Machine) -> dict[str, SearchResult]:
    """{id: default vs tuned} of tuning-log entries (best.json: workload, default_knobs, knobs), both priced by
    the model on the entry's shape."""
    from ...schedules import ascend_like as sched
    from .pipeline_model import predict
    from .pipeline_model import model_inputs

    out = {}
    for e in entries:
        shape, _, _ = model_inputs(e["workload"])
        d, b = sched.from_dict(e["default_knobs"]), sched.from_dict(e["knobs"])
        out[e["id"]] = SearchResult(d, predict(shape, sched.to_tiling(d), m), b, predict(shape, sched.to_tiling(b), m),
                                    int(e.get("points", 0) or 0))
    return out


def write_results(out_dir: str, results: dict[str, SearchResult], m: Machine, best_label: str) -> dict:
    """The report of `results` (CANN's default vs `best_label`: model-best or tuned) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot_stages(results, out / "stages.png", best_label)
    rows = []
    h = ["<!doctype html><meta charset='utf-8'><title>ascend-like model report</title>",
         "<style>body{font-family:sans-serif;max-width:1300px;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}</style>",
         f"<h1>ascend-like pipeline model: {html.escape(m.name)}</h1><p><b>Predictions of the analytic model "
         f"(no NPU ran)</b> &middot; {html.escape(time.strftime('%Y-%m-%d %H:%M'))} &middot; {m.aic_cores} AIC x "
         f"{m.aiv_per_aic} AIV at {m.freq_hz / 1e9:.2f} GHz, cube peak {m.peak_flops / 1e12:.1f} TFLOPS</p>",
         "<table><tr><th>shape</th><th>CANN default</th><th>items</th><th>c1 / v / c2 cycles (binding)</th>"
         f"<th>us</th><th>util</th><th>{html.escape(best_label)}</th><th>items</th><th>c1 / v / c2 cycles (binding)</th><th>us</th>"
         "<th>util</th><th>speedup</th></tr>"]
    for i, r in results.items():
        d, b = r.default_prediction, r.best_prediction

        def stages(p):
            return (f"{p.cube1.cycles:.0f} ({p.cube1.binding}) / {p.vector.cycles:.0f} ({p.vector.binding}) / "
                    f"{p.cube2.cycles:.0f} ({p.cube2.binding})")
        h.append(f"<tr><td>{html.escape(i)}</td><td>{r.default.tag()}</td><td>{d.items}</td><td>{stages(d)}</td>"
                 f"<td>{d.total_s * 1e6:.1f}</td><td>{d.utilisation:.1%}</td><td>{r.best.tag()}</td><td>{b.items}</td>"
                 f"<td>{stages(b)}</td><td>{b.total_s * 1e6:.1f}</td><td>{b.utilisation:.1%}</td>"
                 f"<td>{r.speedup:.2f}x</td></tr>")
        rows.append({"id": i, "default": r.default.tag(), "best": r.best.tag(), "speedup": r.speedup,
                     "points": r.points, "default_prediction": d.as_dict(), "best_prediction": b.as_dict()})
    h.append("</table><img src='stages.png'><h2>Machine parameters</h2><table><tr><th>parameter</th><th>unit</th>"
             "<th>label</th><th>source</th></tr>")
    for p, unit, label, source in m.sources:
        h.append(f"<tr><td>{p}</td><td>{html.escape(unit)}</td><td>{label}</td>"
                 f"<td style='text-align:left'>{html.escape(source)}</td></tr>")
    h.append("</table><p>Labels: V read in the cited source, I inferred or assumed, F fitted "
             "(fag_tvm/targets/ascend_like/calibration.py).</p>")
    (out / "index.html").write_text("\n".join(h))
    summary = {"machine": m.name, "best": best_label, "shapes": rows}
    with open(out / "model_report.json", "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary
