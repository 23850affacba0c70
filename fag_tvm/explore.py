"""Schedule exploration: every point of a knob grid for one workload, built and measured side by side in one
run, next to the template's default and the tuned record, against the machine's roof measured in the same
run -- "what does block_kv=128 do on S3, next to the default?" (the tuner answers "what is best"; this
answers "why").

Infeasible points are kept with the template's reason. Every feasible point's result is checked against
the default knobs' result (SPEC A10 tolerances: a fast variant that computes something else is reported as
wrong, not ranked). Measurements alternate between points (round r times every point once, in an order
rotated each round) so a noisy moment hits all points alike; each point reports min/median/max.
Compiled targets only (each point is a real kernel). Where a target's time is a model's (Target.timing ==
"model": ascend-like), every point is still built and run once for the result check, and its time,
TFLOP/s, % of the peak and binding pipe per stage are the model's prediction -- never the CPU run's clock.
Where a target has no time at all (Target.timing == "none": cuda-sim, a CPU simulation of GPU kernels), every
point is built and checked and the table says so instead of printing numbers that mean nothing."""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import numpy as np

from . import jit, targets
from .core.abi import kernel_spec
from .errors import invalid
from .workloads import configs, flops, random_call, workload_id


def parse_knob(knobs: Any, name: str, text: str) -> Any:
    """`text` as a value of knob `name` (typed like the knob's default); FagError naming --set/--vary."""
    names = {f.name: f for f in dataclasses.fields(knobs)}
    if name not in names:
        raise invalid("--vary", f"unknown knob {name!r}; the template's knobs are {sorted(names)}")
    default = getattr(knobs, name)
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return type(default)(text)
    except ValueError:
        raise invalid("--vary", f"{name}={text!r}: expected a {type(default).__name__}") from None


def grid(base: Any, vary: dict[str, list[Any]]) -> list[Any]:
    """The knobs of every grid point (the cartesian product of `vary` over `base`)."""
    names = list(vary)
    return [dataclasses.replace(base, **dict(zip(names, vals))) for vals in itertools.product(*vary.values())]


def _outputs(result: dict[str, Any]) -> dict[str, np.ndarray]:
    return {n: np.asarray(v) for n, v in result.items() if v is not None}


def explore(target: str, w: dict[str, Any], direction: str = "bwd", base_set: dict[str, str] | None = None,
            vary: dict[str, list[str]] | None = None, repeat: int = 5, roof: dict | None = None) -> dict[str, Any]:
    """The exploration of workload `w` on `target` (see the module docstring), as a JSON-able dict."""
    from .testing import a10_problems  # noqa: PLC0415

    t = targets.get(target)
    if not t.compiled:
        raise invalid("target", f"{t.name} has no kernels to explore")
    hw = t.hw()
    fcfg, bcfg = configs(w)
    cfg = bcfg if direction == "bwd" else fcfg
    spec = kernel_spec(cfg, direction)
    default = t.default_knobs(spec, hw)
    tuned, origin = jit.knobs_for(t, spec, hw, shape=w)
    base = dataclasses.replace(default, **{k: parse_knob(default, k, v) for k, v in (base_set or {}).items()})
    typed = {k: [parse_knob(default, k, v) for v in vals] for k, vals in (vary or {}).items()}
    points: list[tuple[str, Any]] = [("grid", k) for k in grid(base, typed)]
    for role, k in (("default", default), ("tuned", tuned if origin != "default" else None)):
        if k is not None and all(k != p for _, p in points):
            points.append((role, k))
    a = random_call(w, seed=0)
    if direction == "bwd":
        f = t.forward_arrays(fcfg, a, jit.provider(t))
        a = dict(a, softmax_max=f["softmax_max"], softmax_sum=f["softmax_sum"], attention_in=f["attention_out"])
    run_arrays = t.backward_arrays if direction == "bwd" else t.forward_arrays
    model = t.timing == "model"
    functional = t.timing == "none"
    rows, calls, point_knobs = [], [], {}
    for role, k in points:
        ok, why = t.prune(spec, k, hw)
        row = {"role": role, "knobs": dataclasses.asdict(k), "tag": k.tag(), "feasible": ok, "reason": "" if ok else why,
               "is_default": k == default, "is_tuned": origin != "default" and k == tuned}
        rows.append(row)
        if ok:
            kern = jit.kernel(t, spec, k)
            calls.append((row, lambda kern=kern: run_arrays(cfg, a, lambda s, kern=kern: kern)))
            point_knobs[id(row)] = k
    if not calls:
        raise invalid("--vary", "no feasible point in the grid: " + "; ".join(r["reason"] for r in rows))
    ref = _outputs(next((fn for r, fn in calls if r["is_default"]), calls[0][1])())  # the default, if feasible
    dtype = str(spec.dtype)
    for row, fn in calls:
        got = _outputs(fn())
        row["problems"] = [p for n in ref for p in a10_problems(n, got[n], ref[n], dtype)]
        row["times_ms"] = []
    fl = flops(w, direction)
    timed = [row for row, _ in calls]
    if functional:
        roof = None
        for row in timed:
            row.update(median_ms=None, min_ms=None, max_ms=None, gflops=None)
    elif model:
        roof = None
        for row in timed:
            pred = t.predict(spec, w, point_knobs[id(row)], hw)
            if pred is None:
                raise invalid("--direction", f"{t.name} models the backward only; its {direction} has no time")
            ms = pred["time_s"] * 1e3
            row.update(model=pred, median_ms=ms, min_ms=ms, max_ms=ms, gflops=fl / ms / 1e6,
                       roof_pct=100.0 * pred["utilisation"])
            roof = {"gflops": pred["peak_tflops"] * 1e3, "how": f"fp16 cube peak of {t.machine()}"}
    else:
        for r in range(repeat):
            order = calls[r % len(calls):] + calls[:r % len(calls)]
            for row, fn in order:
                t0 = time.perf_counter()
                fn()
                row["times_ms"].append((time.perf_counter() - t0) * 1e3)
        for row in timed:
            ts = np.asarray(row["times_ms"])
            row.update(median_ms=float(np.median(ts)), min_ms=float(ts.min()), max_ms=float(ts.max()))
            row["gflops"] = fl / row["median_ms"] / 1e6
            if roof:
                row["roof_pct"] = 100.0 * row["gflops"] / roof["gflops"]
    ranked = [] if functional else sorted((r for r in timed if not r["problems"]), key=lambda r: r["median_ms"])
    for i, row in enumerate(ranked):
        row["rank"] = i + 1
    for role in ("default", "tuned"):
        ref_row = next((r for r in timed if r[f"is_{role}"]), None)
        for row in timed:
            row[f"vs_{role}"] = row["median_ms"] / ref_row["median_ms"] if ref_row and not functional else None
    return {"target": t.name, "workload": workload_id(w), "direction": direction, "spec": dataclasses.asdict(spec),
            "hw_tag": t.hw_tag(hw), "tuned_origin": origin, "repeat": 0 if model or functional else repeat, "roof": roof,
            "timing": t.timing,
            "gflop": fl / 1e9, "points": rows}


def format_table(result: dict[str, Any], vary: list[str]) -> str:
    """The exploration as a text table: one line per point (the varied knobs first)."""
    cols = vary or ["tag"]
    head = "".join(f"{c:>10s} " for c in cols)
    lines = [f"{result['target']} {result['workload']} {result['direction']}: {result['gflop']:.2f} GFLOP per call"
             + (f"; roof {result['roof']['gflops']:.1f} GFLOP/s ({result['roof']['how']})" if result["roof"] else ""),
             *(["times: the target's pipeline model (predicted); each point's CPU run only checks its result"]
               if result.get("timing") == "model" else []),
             *([f"functional check only, no timing: {result['target']} runs the kernels in a CPU simulation whose "
                f"clock says nothing about the hardware; each point is built, run and checked against the default"]
               if result.get("timing") == "none" else []),
             f"{'point':8s} {head}{'median ms':>10s} {'min-max ms':>15s} {'GFLOP/s':>8s} {'% roof':>7s} "
             f"{'rank':>4s} {'vs dflt':>7s} {'vs tuned':>8s}  note"]
    for r in result["points"]:
        vals = "".join(f"{str(r['knobs'].get(c, r['tag'])) if c != 'tag' else r['tag']:>10s} " for c in cols)
        role = r["role"] + ("*" if r["is_default"] and r["role"] != "default" else "")
        if not r["feasible"]:
            lines.append(f"{role:8s} {vals}{'':>10s} {'':>15s} {'':>8s} {'':>7s} {'':>4s} {'':>7s} {'':>8s}  "
                         f"pruned: {r['reason']}")
            continue
        note = ("WRONG: " + "; ".join(r["problems"])) if r["problems"] else \
            ("default" if r["is_default"] else "") + (" tuned" if r["is_tuned"] else "")
        if "model" in r:
            st = r["model"]["stages"]
            note += (f" binds {r['model']['binding']} (cube1 {st['cube1']['binding']}, vector {st['vector']['binding']},"
                     f" cube2 {st['cube2']['binding']})")
        fmt = lambda x, s: "-" if x is None else format(x, s)  # noqa: E731
        if r["median_ms"] is None:
            lines.append(f"{role:8s} {vals}{'-':>10s} {'-':>15s} {'-':>8s} {'-':>7s} {'-':>4s} {'-':>7s} {'-':>8s}  "
                         f"{(note.strip() + ' ' if note.strip() else '') + ('' if r['problems'] else 'result ok')}")
            continue
        lines.append(f"{role:8s} {vals}{r['median_ms']:10.3f} {r['min_ms']:7.3f}-{r['max_ms']:<7.3f} "
                     f"{r['gflops']:8.1f} {fmt(r.get('roof_pct'), '6.1f'):>7s} {fmt(r.get('rank'), 'd'):>4s} "
                     f"{fmt(r['vs_default'], '.2f'):>7s} {fmt(r['vs_tuned'], '.2f'):>8s}  {note.strip()}")
    return "\n".join(lines)
