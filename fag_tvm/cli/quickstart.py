"""`fag-tvm quickstart`: the main job — compile (or load from the cache), run forward + backward, verify
against the float64 reference and time a default workload on this machine."""
from __future__ import annotations

import argparse
import time

from .argtypes import int_at_least


def run(args: argparse.Namespace) -> int:
    import numpy as np

    import fag_tvm

    from .. import targets
    from ..config import validate
    from ..core.abi import kernel_spec
    from ..jit import knobs_for
    from ..testing import rel_err, tolerance
    from ..workloads import flops

    t = targets.get(args.target)
    B, N, S, D = args.batch, args.heads, args.seq, args.dim
    dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": fag_tvm.arrays.BF16}[args.dtype]
    rng = np.random.default_rng(0)
    q, k, v, dy = (rng.standard_normal((B, N, S, D)).astype(dtype) for _ in range(4))
    kw = dict(head_num=N, input_layout="BNSD", scale_value=D ** -0.5, target=t.name)
    if args.causal:
        kw.update(atten_mask=fag_tvm.masks.compressed_causal_mask(), sparse_mode=2)
    print(f"workload: B={B} N={N} S={S} D={D} {args.dtype} {'causal' if args.causal else 'no mask'} "
          f"on target {t.name}")
    t0 = time.perf_counter()
    f = fag_tvm.flash_attention_score(q, k, v, **kw)
    g = fag_tvm.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                           attention_in=f.attention_out, **kw)
    print(f"first call (compile or cache load + run): {time.perf_counter() - t0:.2f} s")
    if t.compiled:
        cfg = validate("fwd", q, k, v, **kw)
        for direction in ("fwd", "bwd"):
            spec = kernel_spec(cfg, direction)
            knobs, origin = knobs_for(t, spec)
            print(f"  {direction}: {t.entry_name(spec, knobs, t.hw())}  (knobs: {origin})")
    ref_kw = {x: y for x, y in kw.items() if x != "target"}
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **ref_kw)
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max,
                                                      softmax_sum=f.softmax_sum, attention_in=f.attention_out,
                                                      **ref_kw)
    tol = tolerance(args.dtype)
    ok = True
    for name, a, b in (("attention_out", f.attention_out, fr.attention_out), ("dq", g.dq, gr.dq),
                       ("dk", g.dk, gr.dk), ("dv", g.dv, gr.dv)):
        e = rel_err(a, b)
        ok &= e <= tol
        print(f"  {name:14s} rel err {e:.2e}  (tol {tol:.0e})  {'ok' if e <= tol else 'FAIL'}")
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fag_tvm.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                           attention_in=f.attention_out, **kw)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    fl = flops({"B": B, "N1": N, "Sq": S, "Skv": S, "D": D, "sparse_mode": 2 if args.causal else 0})
    print(f"backward: {med * 1e3:.2f} ms median of {args.repeat} (min {min(times) * 1e3:.2f}, "
          f"max {max(times) * 1e3:.2f}), {fl / med / 1e9:.1f} GFLOP/s")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def add(sub) -> None:
    s = sub.add_parser("quickstart", help="main job: compile, run, verify and time a default workload on the CPU")
    s.add_argument("--target", default="llvm", help="target to run (default llvm)")
    s.add_argument("--batch", type=int_at_least(1), default=1)
    s.add_argument("--heads", type=int_at_least(1), default=8)
    s.add_argument("--seq", type=int_at_least(1), default=1024)
    s.add_argument("--dim", type=int_at_least(1), default=64)
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    s.add_argument("--causal", action="store_true", help="sparse_mode 2 (left-up causal)")
    s.add_argument("--repeat", type=int_at_least(1), default=5)
    s.set_defaults(fn=run)
