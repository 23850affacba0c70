"""`fag-tvm bench`: the backward of a target vs PyTorch's CPU flash backward, measured in one process,
with this machine's roof measured in the same run (DESIGN "Benchmarks").

For each workload (suite ids S1–S9 or any workload JSON): real inputs, stats from our forward, then
ours and the peer (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, GQA expanded;
only for what it can express: BNSD-convertible layouts, no mask / causal, no pse, no dropout) timed
alternately (noise hits both). Reported per side: min / median / max ms (a run whose spread exceeds
NOISY is flagged), GFLOP/s (2.5·4·B·N·Sq·Skv·D, halved for causal), the ratio ours/peer of medians, %
of the roof (a 2048³ sgemm — and a bf16 GEMM for bf16 shapes — in the same process, same threads) and
peak-RSS growth of one call. Prints a table, writes JSON."""
from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np

NOISY = 0.25  # (max - min) / median above this flags a measurement as noisy


def _fixed_mmap_threshold() -> None:
    """Make every large allocation a fresh mmap (glibc otherwise recycles freed heap memory, which hides
    growth from the peak-RSS counter): fixed M_MMAP_THRESHOLD = 128 KiB, immediate trimming."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_growth(fn: Callable[[], Any]) -> int:
    """Peak RSS growth (bytes) of one call over what the process holds before it (inputs, kernels)."""
    fn()  # warm-up (compile / cache load)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
    except OSError:
        pass
    base = _status("VmRSS")
    out = fn()
    peak = max(0, _status("VmHWM") - base)
    del out
    return peak


def spread(ts: list[float]) -> dict:
    a = np.asarray(ts) * 1e3
    med = float(np.median(a))
    return {"min_ms": float(a.min()), "median_ms": med, "max_ms": float(a.max()), "all_ms": a.tolist(),
            "noisy": bool((a.max() - a.min()) / med > NOISY) if med > 0 else False}


def measure_roof(threads: int, dtype: str = "fp32", n: int = 2048, repeat: int = 5) -> dict:
    """GFLOP/s of an n³ GEMM in this process (fp32: NumPy/OpenBLAS; bf16: torch, if installed)."""
    if dtype == "fp32":
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))

        def fn():
            return a @ b
        how = "numpy float32 matmul"
    else:
        import torch

        a, b = (torch.randn(n, n).to(torch.bfloat16) for _ in range(2))

        def fn():
            return a @ b
        how = "torch bfloat16 matmul"
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    t = float(np.median(ts))
    return {"dtype": dtype, "gflops": 2.0 * n ** 3 / t / 1e9, "how": f"{how} {n}^3, {threads} threads", "ms": t * 1e3}


def _bf16_roof(threads: int, fp32: dict) -> dict:
    """The bf16 roof: a bf16 GEMM, or the fp32 roof where that is slower -- a CPU without native bf16 dot
    products (no AVX512-BF16 / AMX) widens bf16 to fp32, so the fp32 FMA rate bounds any bf16 kernel there
    (our kernels widen too); a slow bf16 library GEMM is not this machine's limit."""
    bf = measure_roof(threads, "bf16")
    if bf["gflops"] >= fp32["gflops"]:
        return bf
    return {**fp32, "dtype": "bf16", "bf16_gemm_gflops": bf["gflops"],
            "how": f"fp32 roof: no native bf16 GEMM here (torch bfloat16 matmul: {bf['gflops']:.1f} GFLOP/s); "
                   f"{fp32['how']}"}


def _peer_callable(w: dict, q, k, v, dy, kw: dict):
    """PyTorch's CPU flash backward for what it can express (None otherwise)."""
    import torch

    if w["input_layout"] == "TND" or w.get("pse") or float(w.get("keep_prob", 1.0)) < 1 or \
            int(w["sparse_mode"]) not in (0, 2, 3) or (int(w["sparse_mode"]) == 0 and w.get("mask")) or \
            (int(w["sparse_mode"]) in (2, 3) and w["Sq"] != w["Skv"]) or w["D"] != w["Dv"]:
        return None
    from .config import validate
    from .targets.reference import heads_of

    causal = int(w["sparse_mode"]) in (2, 3)
    cfg = validate("fwd", q, k, v, **{x: y for x, y in kw.items()})
    tdt = torch.float32 if q.dtype == np.float32 else torch.bfloat16 if q.dtype.name == "bfloat16" else torch.float16

    def bnsd(x, kv):
        y = np.stack([heads_of(x, cfg, b, kv) for b in range(cfg.B)])
        if y.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(y).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(y)).to(tdt)

    tq, tk, tv, tdy = bnsd(q, False), bnsd(k, True), bnsd(v, True), bnsd(dy, False)
    if cfg.G > 1:  # GQA expanded for the peer
        tk = tk.repeat_interleave(cfg.G, dim=1).contiguous()
        tv = tv.repeat_interleave(cfg.G, dim=1).contiguous()
    scale = float(kw.get("scale_value", 1.0))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(tq, tk, tv, 0.0, causal, scale=scale)

    def run():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            tdy, tq, tk, tv, out, lse, 0.0, causal, scale=scale)

    return run


def backward_callable(w: dict, target: str = "llvm", seed: int = 0, aligned: bool = False):
    """(a no-argument call of our backward on random inputs of `w` with stats from our forward, the
    inputs (q, k, v, dy, kw)). aligned=True passes 64-byte aligned arrays (as torch tensors are:
    zero-copy); plain NumPy arrays from `astype` are 16-byte aligned and get copied first."""
    import fag_tvm

    from .core.buffers import ensure_aligned
    from .workloads import call_args

    q, k, v, dy, kw = call_args(w, seed=seed)
    if aligned:
        q, k, v, dy = (ensure_aligned(x) for x in (q, k, v, dy))
    kw = dict(kw, scale_value=w["D"] ** -0.5)
    f = fag_tvm.flash_attention_score(q, k, v, target=target, **kw)
    out = f.attention_out if not aligned else ensure_aligned(f.attention_out)
    bkw = dict(kw, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=out)

    def ours():
        return fag_tvm.flash_attention_score_grad(q, k, v, dy, target=target, **bkw)

    return ours, (q, k, v, dy, kw)


def bench_workload(w: dict, target: str, repeat: int, peer: bool) -> dict:
    from .workloads import flops, workload_id

    ours, (q, k, v, dy, kw) = backward_callable(w, target)
    pfn = _peer_callable(w, q, k, v, dy, kw) if peer else None
    mem_ours = peak_growth(ours)
    mem_peer = peak_growth(pfn) if pfn else 0
    t_ours, t_peer = [], []
    for r in range(repeat):
        order = [(ours, t_ours), (pfn, t_peer)] if r % 2 == 0 else [(pfn, t_peer), (ours, t_ours)]
        for fn, acc in order:
            if fn is None:
                continue
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    fl = flops(w)
    so = spread(t_ours)
    sp = spread(t_peer) if pfn else None
    return {"id": workload_id(w), "workload": {x: w[x] for x in w if x != "id"}, "gflop": fl / 1e9,
            "ours": so, "peer": sp, "ours_gflops": fl / so["median_ms"] / 1e6,
            "peer_gflops": fl / sp["median_ms"] / 1e6 if sp else None,
            "ratio": so["median_ms"] / sp["median_ms"] if sp else None,
            "ours_peak_mb": mem_ours / 2 ** 20, "peer_peak_mb": mem_peer / 2 ** 20 if pfn else None}


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def print_table(rows: list[dict], roofs: dict, file=sys.stdout) -> None:
    hdr = (f"{'id':24s} {'dt':5s} {'ours ms (min/med/max)':>24s} {'peer ms (min/med/max)':>24s} "
           f"{'ours GF/s':>9s} {'peer GF/s':>9s} {'ratio':>6s} {'%roof':>6s} {'ours MB':>8s} {'peer MB':>8s}")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in rows:
        o, p = r["ours"], r["peer"]
        dt = r["workload"]["dtype"]
        roof = roofs.get("bf16" if dt in ("bf16", "bfloat16") else "fp32")
        flag = lambda s: "*" if s and s["noisy"] else " "  # noqa: E731
        ostr = f"{o['min_ms']:.2f}/{o['median_ms']:.2f}/{o['max_ms']:.2f}{flag(o)}"
        pstr = f"{p['min_ms']:.2f}/{p['median_ms']:.2f}/{p['max_ms']:.2f}{flag(p)}" if p else "–"
        pct = 100 * r["ours_gflops"] / roof["gflops"] if roof else None
        print(f"{r['id'][:24]:24s} {dt[:5]:5s} {ostr:>24s} {pstr:>24s} {r['ours_gflops']:9.1f} "
              f"{_fmt(r['peer_gflops'], '9.1f'):>9s} {_fmt(r['ratio'], '6.2f'):>6s} {_fmt(pct, '6.1f'):>6s} "
              f"{r['ours_peak_mb']:8.1f} {_fmt(r['peer_peak_mb'], '8.1f'):>8s}", file=file)
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    for k, v in roofs.items():
        print(f"roof {k}: {v['gflops']:.1f} GFLOP/s ({v['how']})", file=file)
    if ratios:
        print(f"geomean ours/peer: {float(np.exp(np.mean(np.log(ratios)))):.3f} over {len(ratios)} workloads", file=file)
    if any((r["ours"]["noisy"] or (r["peer"] or {}).get("noisy")) for r in rows):
        print(f"* noisy: (max - min) / median > {NOISY:.0%}; re-run on a quiet machine or with more --repeat",
              file=file)


def run(workloads: list[dict], target: str = "llvm", repeat: int = 7, threads: int | None = None,
        json_path: str | None = "bench_results/bench.json", peer: bool = True, roof: bool = True,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    from . import _tvm, targets

    threads = threads or _tvm.cpu_count()
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _fixed_mmap_threshold()
    t = targets.get(target)
    if t.timing == "none":
        from .errors import unsupported

        raise unsupported("--target", f"timing {t.name}: a CPU simulation of other hardware has no meaningful time "
                                      f"(`fag-tvm explore --target {t.name}` checks schedules functionally)")
    if peer:
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            log("torch not installed: no peer column (pip install fag_tvm[bench])")
            peer = False
    roofs = {}
    if roof:
        roofs["fp32"] = measure_roof(threads, "fp32")
        if any(str(w["dtype"]) in ("bf16", "bfloat16") for w in workloads) and peer:
            roofs["bf16"] = _bf16_roof(threads, roofs["fp32"])
    rows = []
    for w in workloads:
        r = bench_workload(w, t.name, repeat, peer)
        rows.append(r)
        log(f"{r['id']}: ours {r['ours']['median_ms']:.2f} ms" + (f", peer {r['peer']['median_ms']:.2f} ms"
                                                                   if r["peer"] else ""))
    print_table(rows, roofs)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "target": t.name, "hw": t.hw(), "machine": t.machine(),
            "arch": platform.machine(), "threads": threads, "tvm": _tvm.tvm_version(), "repeat": repeat}
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:
        pass
    doc = {"meta": meta, "roofs": roofs, "rows": rows}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {json_path}")
    return doc
