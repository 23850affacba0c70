"""`fag-tvm inspect`: what a kernel compiles to — its TIR, LLVM IR or assembly — for a kernel key (from
`fag-tvm cache list` or an error message) or a workload, with the knobs the build would use or
overridden with --set knob=value; --diff knob=value shows a unified diff against a second setting."""
from __future__ import annotations

import argparse
import sys


def _knob_overrides(t, spec, knobs, sets: list[str]):
    from dataclasses import fields, replace

    from ..errors import invalid

    names = {f.name for f in fields(knobs)}
    kv = {}
    for s in sets or []:
        k, _, v = s.partition("=")
        if k not in names or not v.lstrip("-").isdigit():
            raise invalid("--set", f"{s!r}: expected knob=integer with knob in {sorted(names)}")
        kv[k] = int(v)
    return replace(knobs, **kv)


def resolve(args: argparse.Namespace):
    """(target, spec, knobs, hw, origin) of what to inspect."""
    from .. import jit, targets
    from ..core.abi import kernel_spec
    from ..core.spec import KernelSpec
    from ..errors import invalid
    from ..workloads import configs, load_workloads

    t = targets.get(args.target)
    if not t.compiled:
        raise invalid("target", f"{t.name} has no kernels to inspect")
    hw = t.hw()
    if args.key:
        for e in jit.cache_entries():
            m = e["meta"] or {}
            if m.get("entry") == args.key or str(m.get("entry", "")).startswith(args.key + "_"):
                t = targets.get(m["target"])
                return t, KernelSpec.from_dict(m["spec"]), t.knobs_from_dict(m["knobs"]), m["hw"], "cache entry"
        raise invalid("key", f"no kernel {args.key!r} in the JIT cache (see `fag-tvm cache list`); or use --workload")
    if not args.workload:
        raise invalid("--workload", "give a kernel key or --workload")
    (w,) = load_workloads(args.workload)[:1]
    fcfg, bcfg = configs(w)
    spec = kernel_spec(bcfg if args.direction == "bwd" else fcfg, args.direction)
    knobs, origin = jit.knobs_for(t, spec, hw, shape=w)
    knobs = _knob_overrides(t, spec, knobs, args.set)
    ok, why = t.prune(spec, knobs, hw)
    if not ok:
        raise invalid("--set", f"infeasible knobs {knobs}: {why}")
    return t, spec, knobs, hw, origin if not args.set else "--set"


def render(t, spec, knobs, hw, show: str) -> str:
    funcs = t.make_funcs(spec, knobs, hw)
    if show == "tir":
        return "\n\n".join(f.script() for f in funcs.values())
    ex = t.compile(funcs, hw)
    return ex.mod.inspect_source({"llvm": "ll", "asm": "asm"}[show])


def _diff(t, spec, knobs, hw, args) -> tuple[str, str]:
    """(header, unified diff) of what the kernel compiles to with `knobs` and with --diff's overrides."""
    import difflib

    from ..errors import invalid

    other = _knob_overrides(t, spec, knobs, args.diff)
    ok, why = t.prune(spec, other, hw)
    if not ok:
        raise invalid("--diff", f"infeasible knobs {other}: {why}")
    a, b = t.entry_name(spec, knobs, hw), t.entry_name(spec, other, hw)
    # the entry names differ by the knobs: strip them so that only the code's differences show
    ta = render(t, spec, knobs, hw, args.show).replace(a, "KERNEL")
    tb = render(t, spec, other, hw, args.show).replace(b, "KERNEL")
    diff = "".join(difflib.unified_diff(ta.splitlines(keepends=True), tb.splitlines(keepends=True), a, b, n=3))
    return f"# --- {a}\n# +++ {b}\n", diff or "(no difference)\n"


def run(args: argparse.Namespace) -> int:
    t, spec, knobs, hw, origin = resolve(args)
    if args.diff:
        header, text = _diff(t, spec, knobs, hw, args)
    else:
        text = render(t, spec, knobs, hw, args.show)
        header = f"# {t.entry_name(spec, knobs, hw)}  (knobs: {origin})\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + text)
        print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    else:
        sys.stdout.write(header + text + ("\n" if not text.endswith("\n") else ""))
    return 0


def add(sub) -> None:
    s = sub.add_parser("inspect", help="show a kernel's TIR, LLVM IR or assembly", description=__doc__)
    s.add_argument("key", nargs="?", help="kernel key (entry name) of a cached kernel")
    s.add_argument("--workload", help="a workload (suite id, JSON) instead of a key")
    s.add_argument("--direction", choices=("bwd", "fwd"), default="bwd")
    s.add_argument("--target", default="llvm")
    s.add_argument("--set", action="append", metavar="KNOB=VALUE", help="override a knob (repeatable)")
    s.add_argument("--show", choices=("tir", "llvm", "asm"), default="tir")
    s.add_argument("--diff", action="append", metavar="KNOB=VALUE",
                   help="show a unified diff against the same kernel with this knob changed (repeatable)")
    s.add_argument("--out", help="write to a file instead of stdout")
    s.set_defaults(fn=run)
