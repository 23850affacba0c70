"""The HTML + PNG report of an exploration (fag_tvm.explore): the grid as a heatmap (two varied knobs), lines
(one) or bars (more), and a roofline -- every measured point at the call's arithmetic intensity against
the compute roof (a GEMM) and the memory roof (a streaming copy) measured in the same run.

The intensity is the call's FLOPs over its minimal memory traffic (every input read once, every output
written once): the same for every knob setting of one workload, so the roofline shows how far each point
sits below the roof that binds at that intensity, not how a knob changes the traffic."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .workloads import configs


def measure_bandwidth(mbytes: int = 256, repeat: int = 5) -> dict:
    """GB/s of a streaming copy (read + write) of `mbytes` MiB in this process: the memory roof."""
    n = mbytes * 2 ** 20 // 8
    src, dst = np.ones(n), np.empty(n)
    np.copyto(dst, src)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    t = float(np.median(ts))
    return {"gbytes_per_s": 2 * n * 8 / t / 1e9, "how": f"numpy copy of {mbytes} MiB (read + write)"}


def minimal_bytes(w: dict[str, Any], direction: str) -> float:
    """Bytes a call must move at least: inputs read once, outputs written once (fp32 stats, 8 lanes a row)."""
    fcfg, bcfg = configs(w)
    cfg = bcfg if direction == "bwd" else fcfg
    eb = 2 if cfg.dtype in ("float16", "bfloat16") else 4
    rows = sum(b.sq for b in cfg.batches) * cfg.N1  # query rows (every layout, TND included)
    q = rows * cfg.D
    kv = sum(b.skv for b in cfg.batches) * cfg.N2 * (cfg.D + cfg.Dv)
    o = rows * cfg.Dv
    stats = rows * 8 * 4 * 2
    if direction == "bwd":  # q, k, v, dy, o, stats in; dq, dk, dv out
        return float((q + kv + 2 * o) * eb + stats + (q + kv) * eb)
    return float((q + kv) * eb + o * eb + stats)


def _plot_grid(result: dict, vary: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in result["points"] if p["role"] == "grid"]
    val = {tuple(p["knobs"][k] for k in vary): (p.get("gflops") if p["feasible"] and not p.get("problems") else None)
           for p in pts}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if len(vary) == 2:
        xs = sorted({k[0] for k in val})
        ys = sorted({k[1] for k in val})
        z = np.array([[np.nan if val.get((x, y)) is None else val[(x, y)] for x in xs] for y in ys], float)
        im = ax.imshow(z, origin="lower", cmap="viridis")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(vary[0])
        ax.set_ylabel(vary[1])
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                v = val.get((x, y))
                ax.text(j, i, "pruned" if v is None else f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="w" if v is None or v < np.nanmean(z) else "k")
        fig.colorbar(im, ax=ax, label="GFLOP/s")
    elif len(vary) == 1:
        xs = sorted(k[0] for k in val if val[k] is not None)
        ax.plot([str(x) for x in xs], [val[(x,)] for x in xs], marker="o")
        ax.set_xlabel(vary[0])
        ax.set_ylabel("GFLOP/s")
        ax.grid(alpha=0.3)
    else:
        tags = [p["tag"] for p in pts if p.get("gflops")]
        ax.barh(tags, [p["gflops"] for p in pts if p.get("gflops")])
        ax.set_xlabel("GFLOP/s")
    for role, color in (("default", "C3"), ("tuned", "C1")):
        ref = next((p for p in result["points"] if p.get(f"is_{role}") and p.get("gflops")), None)
        if ref is not None and len(vary) == 1:
            ax.axhline(ref["gflops"], color=color, ls="--", lw=1, label=role)
    if len(vary) == 1:
        ax.legend(fontsize=8)
    ax.set_title(f"{result['target']} {result['workload']} {result['direction']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_roofline(result: dict, intensity: float, bw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = result["roof"]["gflops"]
    gbs = bw["gbytes_per_s"]
    x = np.logspace(-1, 4, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.loglog(x, np.minimum(peak, gbs * x), color="k", lw=1.5, label=f"roof: {peak:.0f} GFLOP/s, {gbs:.1f} GB/s")
    for p in result["points"]:
        if p.get("gflops") and not p.get("problems"):
            mark = "*" if p["is_default"] else "D" if p["is_tuned"] else "o"
            ax.scatter([intensity], [p["gflops"]], marker=mark, s=60 if mark != "o" else 25,
                       label=p["tag"] if mark != "o" else None)
    ax.axvline(peak / gbs, color="0.6", ls=":", lw=1)
    ax.set_xlabel("arithmetic intensity (FLOP per byte of minimal traffic)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"roofline: {result['workload']} {result['direction']} at {intensity:.1f} FLOP/B", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_stages(result: dict, path: Path) -> None:
    """A model target's points: cycles per work item of each stage, labelled with the pipe that binds it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in result["points"] if p.get("model")]
    stages = list(pts[0]["model"]["stages"])
    x = np.arange(len(pts))
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(pts)), 4.2))
    for si, st in enumerate(stages):
        cyc = [p["model"]["stages"][st]["cycles"] for p in pts]
        ax.bar(x + (si - (len(stages) - 1) / 2) * width, cyc, width, label=st)
        for xi, p in zip(x, pts):
            ax.text(xi + (si - (len(stages) - 1) / 2) * width, p["model"]["stages"][st]["cycles"],
                    p["model"]["stages"][st]["binding"], ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, [p["tag"] if len(pts) < 5 else f"{p['role']} {i}" for i, p in enumerate(pts)], fontsize=6,
                  rotation=20)
    ax.set_ylabel("cycles per work item (model)")
    ax.set_title("per-stage cycles of each point; label = the binding pipe", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(result: dict, vary: list[str], w: dict[str, Any], out_dir: str, table: str,
                 bandwidth: dict | None = None) -> dict:
    """index.html + grid.png + roofline.png (+ stages.png for a model target) + exploration.json in `out_dir`;
    returns what the roofline used. A model target's roofline is its machine's (cube peak, HBM rate)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = result.get("timing") == "model"
    if result.get("timing") == "none":  # nothing was timed: the table (results checked) is the report
        h = ["<!doctype html><meta charset='utf-8'><title>fag_tvm exploration</title>",
             f"<h1>Exploration: {html.escape(result['target'])} {html.escape(result['workload'])} "
             f"{html.escape(result['direction'])}</h1><pre>{html.escape(table)}</pre>"]
        (out / "index.html").write_text("\n".join(h))
        with open(out / "exploration.json", "w") as f:
            json.dump(dict(result, roofline=None), f, indent=1, default=float)
        return {"roofline": None}
    if model:
        m = next(p["model"] for p in result["points"] if p.get("model"))
        bw = {"gbytes_per_s": m["memory_gbytes_per_s"], "how": "the modelled machine's HBM rate"}
    else:
        bw = bandwidth or measure_bandwidth()
    intensity = result["gflop"] * 1e9 / minimal_bytes(w, result["direction"])
    _plot_grid(result, vary, out / "grid.png")
    roof = None
    if result.get("roof"):
        _plot_roofline(result, intensity, bw, out / "roofline.png")
        roof = {"intensity_flop_per_byte": intensity, "bandwidth": bw,
                "bound": "compute" if intensity > result["roof"]["gflops"] / bw["gbytes_per_s"] else "memory"}
    h = ["<!doctype html><meta charset='utf-8'><title>fag_tvm exploration</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}pre{font-size:12px}</style>",
         f"<h1>Exploration: {html.escape(result['target'])} {html.escape(result['workload'])} "
         f"{html.escape(result['direction'])}</h1><p>{html.escape(time.strftime('%Y-%m-%d %H:%M'))} &middot; "
         f"hardware {html.escape(result['hw_tag'])} &middot; tuned knobs from {html.escape(result['tuned_origin'])}"
         + (" &middot; times from the target's pipeline model (each point built and run once to check its result)"
            if model else f" &middot; {result['repeat']} alternating timed calls per point") + "</p>",
         f"<pre>{html.escape(table)}</pre><h2>Grid</h2><img src='grid.png'>"]
    if roof:
        h.append(f"<h2>Roofline</h2><p>{intensity:.1f} FLOP per byte of minimal traffic: "
                 f"{roof['bound']}-bound at this machine's balance point "
                 f"({result['roof']['gflops'] / bw['gbytes_per_s']:.1f} FLOP/B; {html.escape(bw['how'])}; "
                 f"{html.escape(result['roof']['how'])}).</p><img src='roofline.png'>")
    if model:
        _plot_stages(result, out / "stages.png")
        h.append("<h2>Pipeline stages (model)</h2><img src='stages.png'>")
    (out / "index.html").write_text("\n".join(h))
    with open(out / "exploration.json", "w") as f:
        json.dump(dict(result, roofline=roof), f, indent=1, default=float)
    return {"roofline": roof}
