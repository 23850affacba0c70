"""Host overhead per call for a tiny shape (B=1, N=1, S=16, D=16, fp32, BNSD, llvm): the plain API and the
torch op (its native path, the default; its Python autograd.Function path; its custom-op path), next to the
kernels alone (pre-packed arguments), to a no-op Python autograd.Function (what any Python-level autograd
op pays torch) and to torch's SDPA on the same shape.

A repeated call of the same shape reuses its validated call plan (fag_tvm.api.prepared), the bound launch
(kernel, packed metadata, output layout); what remains is argument handling, the output allocations and the
FFI call -- in C++ for the torch op's native path (fag_tvm.torch_native). "host overhead" = call time - the
kernels alone (same run); a training step is two calls (forward + backward).

Timing: `--batches` rounds; each round times one batch of `--calls` calls of every row in turn (so a noisy
moment hits all rows alike); the table gives the fastest batch (what the code costs) and the median batch
(what this machine's noise adds: a shared 2-core VM varies by +-30%). Inputs are torch-allocated tensors.

    python benchmarks/overhead.py [--calls 300] [--batches 25] [--json bench_results/overhead.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np

from fag_tvm.targets.base import time_calls


def interleaved_us(fns: dict, calls: int, batches: int, warm: int = 200) -> dict[str, tuple[float, float]]:
    """{name: (fastest, median)} per-call microseconds, every row timed once per round."""
    for fn in fns.values():
        for _ in range(warm):
            fn()
    per: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(batches):
        for n, fn in fns.items():
            per[n] += [t * 1e6 for t in time_calls(fn, repeat=1, number=calls)]
    return {n: (min(v), statistics.median(v)) for n, v in per.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--batches", type=int, default=25)
    p.add_argument("--json", default="bench_results/overhead.json")
    args = p.parse_args()
    import torch
    import torch.nn.functional as F

    import fag_tvm
    import fag_tvm.torch as ft
    from fag_tvm import jit, targets
    from fag_tvm.config import validate
    from fag_tvm.core.abi import kernel_spec
    from fag_tvm.core.buffers import ensure_aligned
    from fag_tvm.targets.llvm import launch
    from fag_tvm.targets.llvm.measure import _Capture

    torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "2")))
    rng = np.random.default_rng(0)
    q, k, v, dy = (ensure_aligned(rng.standard_normal((1, 1, 16, 16)).astype(np.float32)) for _ in range(4))
    kw = dict(head_num=1, input_layout="BNSD", scale_value=0.25)
    f = fag_tvm.flash_attention_score(q, k, v, **kw)
    st = dict(softmax_max=f.softmax_max, softmax_sum=f.softmax_sum, attention_in=ensure_aligned(f.attention_out))
    rows = {}

    def row(name, fn):
        rows[name] = fn

    # the kernels alone, called with the arguments the launcher packs (what the host work adds to)
    llvm = targets.get("llvm")
    for direction, cfg, a in (
            ("fwd", validate("fwd", q, k, v, **kw), dict(query=q, key=k, value=v)),
            ("bwd", validate("bwd", q, k, v, dy, **st, **kw), dict(query=q, key=k, value=v, dy=dy, **st))):
        cap = _Capture(kernel_spec(cfg, direction))
        (launch.forward_arrays if direction == "fwd" else launch.backward_arrays)(cfg, a, lambda s, c=cap: c)
        fn = jit.kernel(llvm, kernel_spec(cfg, direction)).functions["main"]
        row(f"{direction} kernel alone (pre-packed)", lambda fn=fn, c=cap: fn(*c.args))
    row("api forward (NumPy)", lambda: fag_tvm.flash_attention_score(q, k, v, **kw))
    row("api backward (NumPy)", lambda: fag_tvm.flash_attention_score_grad(q, k, v, dy, **st, **kw))
    tq, tk, tv, tdy = (torch.tensor(x) for x in (q, k, v, dy))  # torch-allocated (64-byte aligned)
    tst = {x: torch.tensor(y) for x, y in st.items()}
    row("api backward (torch tensors)", lambda: fag_tvm.flash_attention_score_grad(tq, tk, tv, tdy, **tst, **kw))
    xq, xk, xv = (torch.tensor(x).requires_grad_() for x in (q, k, v))
    native_ok, native_why = ft.torch_native.status()
    if not native_ok:
        print(f"note: the torch op's native path is unavailable ({native_why}); its rows use the Python path")

    def op_forward():
        with torch.no_grad():
            ft.npu_fusion_attention(xq, xk, xv, 1, "BNSD", scale=0.25)

    def op_step():
        ft.npu_fusion_attention(xq, xk, xv, 1, "BNSD", scale=0.25)[0].backward(tdy)

    def op_step_python():
        ft.npu_fusion_attention(xq, xk, xv, 1, "BNSD", scale=0.25, use_custom_op=False)[0].backward(tdy)

    def op_step_custom_op():
        ft.npu_fusion_attention(xq, xk, xv, 1, "BNSD", scale=0.25, use_custom_op=True)[0].backward(tdy)

    class NoOp(torch.autograd.Function):
        """The op's autograd shape (3 inputs, 3 outputs, 6 saved tensors) with no work: torch's own cost."""

        @staticmethod
        def forward(ctx, q, k, v):
            out, smax, ssum = torch.empty_like(q), q.new_empty((1, 1, 16, 8)), q.new_empty((1, 1, 16, 8))
            ctx.save_for_backward(q, k, v, out, smax, ssum)
            ctx.mark_non_differentiable(smax, ssum)
            return out, smax, ssum

        @staticmethod
        def backward(ctx, go, gm, gs):
            q, k, v, *_ = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def noop_step():
        NoOp.apply(xq, xk, xv)[0].backward(tdy)

    def sdpa_forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(xq, xk, xv, scale=0.25)

    def sdpa_step():
        F.scaled_dot_product_attention(xq, xk, xv, scale=0.25).backward(tdy)

    row("torch op forward (no grad)", op_forward)
    row("torch op forward + backward (default: native)", op_step)
    row("torch op forward + backward (Python Function)", op_step_python)
    row("torch op forward + backward (custom op path)", op_step_custom_op)
    row("no-op Python autograd.Function fwd + bwd (peer)", noop_step)
    row("SDPA forward (no grad, peer)", sdpa_forward)
    row("SDPA forward + backward (peer)", sdpa_step)
    timed = interleaved_us(rows, args.calls, args.batches)

    kernel = {"fwd": timed["fwd kernel alone (pre-packed)"][0], "bwd": timed["bwd kernel alone (pre-packed)"][0]}
    overhead = {
        "api forward (NumPy)": kernel["fwd"], "api backward (NumPy)": kernel["bwd"],
        "api backward (torch tensors)": kernel["bwd"], "torch op forward (no grad)": kernel["fwd"],
        **{name: kernel["fwd"] + kernel["bwd"] for name in timed if name.startswith("torch op forward + backward")}}
    print(f"{'B=1 N=1 S=16 D=16 fp32 (us per call)':50s} {'fastest':>9s} {'median':>9s} {'host overhead':>14s}")
    result = {}
    for name, (fast, med) in timed.items():
        host = fast - overhead[name] if name in overhead else None
        result[name] = {"fastest_us": round(fast, 2), "median_us": round(med, 2),
                        "host_overhead_us": None if host is None else round(host, 2)}
        print(f"{name:50s} {fast:9.1f} {med:9.1f} {'' if host is None else f'{host:14.1f}'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"shape": "B1 N1 S16 D16 fp32 BNSD", "calls_per_batch": args.calls, "batches": args.batches,
                   "torch": torch.__version__, "native_path": native_ok, "rows": result}, fh, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
