"""CPU benchmark suite S1–S9 (DESIGN): fag_tvm backward vs PyTorch's CPU flash backward, same process.

Timings alternate ours/peer per repetition (noise hits both); reported: median ms, GFLOP/s
(2.5·4·B·N·Sq·Skv·D, halved for causal), ratio ours/peer, % of the CPU roof, peak RSS growth over the
inputs (VmHWM reset through /proc/self/clear_refs). Prints a table and writes JSON.

    python benchmarks/bench_cpu.py [--shapes S1,S2] [--repeat 5] [--json out.json] [--no-peer]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOF_GFLOPS = {"fp32": 460.0, "bf16": 900.0}  # DESIGN: ~460 fp32 / ~900 bf16 on 2 cores here


def _suite() -> dict[str, tuple]:
    """S1–S9 of DESIGN (defined once, in fag_tvm.workloads) as (B, Nq, Nkv, Sq, Skv, D, causal, dtype)."""
    from fag_tvm.workloads import SUITE as W

    return {sid: (w["B"], w["N1"], w["N2"], w["Sq"], w["Skv"], w["D"], w["sparse_mode"] in (2, 3),
                  "fp32" if w["dtype"] == "float32" else "bf16") for sid, w in W.items()}


SUITE = _suite()


def flops(B, Nq, Sq, Skv, D, causal) -> float:
    return 2.5 * 4 * B * Nq * Sq * Skv * D * (0.5 if causal else 1.0)


def _fixed_mmap_threshold() -> None:
    """Make every large allocation a fresh mmap (glibc otherwise recycles freed heap memory, which hides
    growth from the peak-RSS counter): fixed M_MMAP_THRESHOLD = 128 KiB, immediate trimming."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _rss_peak_reset() -> int:
    """Reset the peak-RSS counter; return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def make_inputs(shape, seed: int = 0):
    import ml_dtypes

    B, Nq, Nkv, Sq, Skv, D, causal, dt = shape
    dtype = np.float32 if dt == "fp32" else ml_dtypes.bfloat16
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Nq, Sq, D), dtype=np.float32).astype(dtype)
    k = rng.standard_normal((B, Nkv, Skv, D), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((B, Nkv, Skv, D), dtype=np.float32).astype(dtype)
    dy = rng.standard_normal((B, Nq, Sq, D), dtype=np.float32).astype(dtype)
    return q, k, v, dy


def ours_callable(shape, q, k, v, dy):
    import fag_tvm

    B, Nq, Nkv, Sq, Skv, D, causal, dt = shape
    kw = dict(head_num=Nq, input_layout="BNSD", scale_value=D ** -0.5)
    if causal:
        kw.update(atten_mask=fag_tvm.masks.compressed_causal_mask(), sparse_mode=3)
    f = fag_tvm.flash_attention_score(q, k, v, **kw)
    kw.update(softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=f.attention_out)
    return lambda: fag_tvm.flash_attention_score_grad(q, k, v, dy, **kw)


def peer_callable(shape, q, k, v, dy):
    import torch

    B, Nq, Nkv, Sq, Skv, D, causal, dt = shape
    tdt = torch.float32 if dt == "fp32" else torch.bfloat16

    def t(x):
        x = torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16) if dt == "bf16" \
            else torch.from_numpy(x)
        return x.to(tdt)

    tq, tk, tv, tdy = t(q), t(k), t(v), t(dy)
    if Nkv != Nq:  # GQA expanded for the peer
        tk = tk.repeat_interleave(Nq // Nkv, dim=1).contiguous()
        tv = tv.repeat_interleave(Nq // Nkv, dim=1).contiguous()
    scale = D ** -0.5
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(tq, tk, tv, 0.0, causal, scale=scale)

    def run():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            tdy, tq, tk, tv, out, lse, 0.0, causal, scale=scale)

    return run


def peak_growth(fn) -> int:
    """Peak RSS growth (bytes) of one call over what the process holds before it (inputs, kernels)."""
    fn()  # warm-up (compile / cache load)
    base = _rss_peak_reset()
    out = fn()
    peak = max(0, _status("VmHWM") - base)
    del out
    return peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SUITE), help="comma-separated ids (default: all)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--json", default="bench_results/bench_cpu.json")
    p.add_argument("--no-peer", action="store_true", help="skip PyTorch")
    args = p.parse_args(argv)

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    _fixed_mmap_threshold()
    import torch

    torch.set_num_threads(args.threads)
    from fag_tvm import _tvm

    _tvm.set_num_threads(args.threads)

    rows = []
    for sid in args.shapes.split(","):
        shape = SUITE[sid]
        B, Nq, Nkv, Sq, Skv, D, causal, dt = shape
        q, k, v, dy = make_inputs(shape)
        ours = ours_callable(shape, q, k, v, dy)
        peer = None if args.no_peer else peer_callable(shape, q, k, v, dy)
        mem_ours = peak_growth(ours)
        mem_peer = peak_growth(peer) if peer else 0
        t_ours, t_peer = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter(); ours(); t_ours.append(time.perf_counter() - t0)
            if peer:
                t0 = time.perf_counter(); peer(); t_peer.append(time.perf_counter() - t0)
        fl = flops(B, Nq, Sq, Skv, D, causal)
        mo = float(np.median(t_ours))
        mp = float(np.median(t_peer)) if peer else float("nan")
        row = {"id": sid, "B": B, "Nq": Nq, "Nkv": Nkv, "Sq": Sq, "Skv": Skv, "D": D, "causal": causal,
               "dtype": dt, "ours_ms": mo * 1e3, "peer_ms": mp * 1e3, "ours_gflops": fl / mo / 1e9,
               "peer_gflops": fl / mp / 1e9 if peer else None, "ratio": mo / mp if peer else None,
               "roof_pct": 100 * fl / mo / 1e9 / ROOF_GFLOPS[dt], "ours_peak_mb": mem_ours / 2**20,
               "peer_peak_mb": mem_peer / 2**20, "ours_all_ms": [x * 1e3 for x in t_ours],
               "peer_all_ms": [x * 1e3 for x in t_peer]}
        rows.append(row)
        print(f"{sid}: ours {row['ours_ms']:.1f} ms  peer {row['peer_ms']:.1f} ms", file=sys.stderr, flush=True)
        del q, k, v, dy, ours, peer

    hdr = f"{'id':3s} {'shape':28s} {'dt':4s} {'ours ms':>9s} {'peer ms':>9s} {'ours GF/s':>9s} " \
          f"{'peer GF/s':>9s} {'ratio':>6s} {'%roof':>6s} {'ours MB':>8s} {'peer MB':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        shp = f"{r['B']}x{r['Nq']}/{r['Nkv']}x{r['Sq']}x{r['Skv']}x{r['D']}{' c' if r['causal'] else ''}"
        print(f"{r['id']:3s} {shp:28s} {r['dtype']:4s} {r['ours_ms']:9.2f} {r['peer_ms']:9.2f} "
              f"{r['ours_gflops']:9.1f} {(r['peer_gflops'] or float('nan')):9.1f} "
              f"{(r['ratio'] or float('nan')):6.2f} {r['roof_pct']:6.1f} {r['ours_peak_mb']:8.1f} "
              f"{r['peer_peak_mb']:8.1f}")
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    if ratios:
        print(f"geomean ours/peer: {float(np.exp(np.mean(np.log(ratios)))):.3f}   threads: {args.threads}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(), "threads": args.threads,
            "cpu_target": _tvm.cpu_target(), "tvm": _tvm.tvm_version(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
