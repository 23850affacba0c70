"""`fag-tvm` command line: info, quickstart (the main job), bench."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from . import __version__

    info = {"fag_tvm": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "targets": ["reference", "llvm"], "cache_dir": os.environ.get("FAG_TVM_CACHE") or
            os.path.join(os.path.expanduser("~"), ".cache", "fag_tvm")}
    try:
        from . import _tvm

        info["tvm"] = _tvm.tvm_version()
        info["llvm_target"] = _tvm.cpu_target()
        info["threads"] = _tvm.num_threads()
    except Exception as exc:  # noqa: BLE001 - info must work even when TVM is broken
        info["tvm"] = f"unavailable: {exc}"
    try:
        from .build import source_hash

        info["source_hash"] = source_hash()
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(info, indent=2, default=str) if args.json else
          "\n".join(f"{k:12s} {v}" for k, v in info.items()))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    """Compile the default workload for this CPU, run fwd+bwd, verify against the float64 reference, time."""
    import numpy as np

    import fag_tvm
    from .testing import rel_err, tolerance

    B, N, S, D = args.batch, args.heads, args.seq, args.dim
    dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": fag_tvm.arrays.BF16}[args.dtype]
    rng = np.random.default_rng(0)
    q, k, v, dy = (rng.standard_normal((B, N, S, D)).astype(dtype) for _ in range(4))
    kw = dict(head_num=N, input_layout="BNSD", scale_value=D ** -0.5)
    if args.causal:
        kw.update(atten_mask=fag_tvm.masks.compressed_causal_mask(), sparse_mode=2)
    print(f"workload: B={B} N={N} S={S} D={D} {args.dtype} {'causal' if args.causal else 'no mask'}")
    t0 = time.perf_counter()
    f = fag_tvm.flash_attention_score(q, k, v, **kw)
    g = fag_tvm.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                           attention_in=f.attention_out, **kw)
    print(f"first call (compile or cache load + run): {time.perf_counter() - t0:.2f} s")
    from .build import knobs_for
    from .config import validate
    from .kernels.abi import kernel_spec

    cfg = validate("fwd", q, k, v, **{x: kw[x] for x in kw})
    for direction in ("fwd", "bwd"):
        spec = kernel_spec(cfg, direction)
        knobs, origin = knobs_for(spec)
        print(f"  {direction}: {spec.key('llvm', knobs)}  (knobs: {origin})")
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max,
                                                      softmax_sum=f.softmax_sum, attention_in=f.attention_out, **kw)
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
    t = float(np.median(times))
    flops = 2.5 * 4 * B * N * S * S * D * (0.5 if args.causal else 1.0)
    print(f"backward: {t * 1e3:.2f} ms median of {args.repeat}, {flops / t / 1e9:.1f} GFLOP/s")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _cmd_compile(args: argparse.Namespace) -> int:
    """AOT package for a list of workloads (DESIGN workload JSON, or suite ids S1..S9)."""
    from .package import build_package
    from .workloads import load_workloads

    if args.target != "llvm":
        print(f"target {args.target!r}: only llvm packages can be built", file=sys.stderr)
        return 2
    workloads = load_workloads(args.workloads)
    t0 = time.perf_counter()
    m = build_package(workloads, args.out)
    print(f"{args.out}: {len(m['kernels'])} kernels for {len(workloads)} workloads in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import bench_cpu  # type: ignore
    except ImportError:
        print("benchmarks/bench_cpu.py not found (run from a source checkout)", file=sys.stderr)
        return 2
    return bench_cpu.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fag-tvm", description="CANN-exact flash-attention backward compiled with TVM")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="versions, targets, CPU target, caches")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)
    s = sub.add_parser("quickstart", help="main job: compile, run, verify and time a default workload on the CPU")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--heads", type=int, default=8)
    s.add_argument("--seq", type=int, default=1024)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    s.add_argument("--causal", action="store_true", help="sparse_mode 2 (left-up causal)")
    s.add_argument("--repeat", type=int, default=5)
    s.set_defaults(fn=_cmd_quickstart)
    s = sub.add_parser("compile", help="build an AOT package (manifest + kernels.so + runtime) for workloads")
    s.add_argument("--target", default="llvm", choices=("llvm",))
    s.add_argument("--workloads", required=True,
                   help="JSON file with a list of workloads, a JSON string, or suite ids like S1,S3")
    s.add_argument("--out", required=True, help="package folder (replaced atomically)")
    s.set_defaults(fn=_cmd_compile)
    s = sub.add_parser("bench", help="CPU benchmark suite S1-S9 vs PyTorch (benchmarks/bench_cpu.py)")
    s.add_argument("rest", nargs=argparse.REMAINDER,
                   help="arguments for benchmarks/bench_cpu.py: --shapes S1,S2 --repeat N --json PATH --no-peer")
    s.set_defaults(fn=_cmd_bench)
    from .tune import add_tuning_commands

    add_tuning_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        # everything after `bench` belongs to benchmarks/bench_cpu.py (argparse REMAINDER drops leading options)
        return _cmd_bench(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
