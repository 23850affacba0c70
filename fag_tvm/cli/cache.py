"""`fag-tvm cache list | clear`: the JIT kernel cache ($FAG_TVM_CACHE, default ~/.cache/fag_tvm)."""
from __future__ import annotations

import argparse
import json
import shutil


def run(args: argparse.Namespace) -> int:
    from .. import jit

    base = jit.cache_dir()
    entries = jit.cache_entries()
    if args.target:
        entries = [e for e in entries if (e["meta"] or {}).get("target") == args.target]
    if args.action == "list":
        if args.json:
            print(json.dumps(entries, indent=1, default=str))
            return 0
        for e in entries:
            m = e["meta"] or {}
            state = "ok" if e["ok"] else "BAD (rebuilt on next use)"
            print(f"{m.get('target', '?'):10s} {e['bytes'] / 1024:8.0f} KiB  {state:8s}  {m.get('entry', e['path'])}")
        print(f"{len(entries)} kernels, {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB in {base}")
        return 0
    removed = 0
    folders = [base / args.target] if args.target else [p for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
    for f in folders:
        if f.is_dir():
            removed += sum(1 for p in f.rglob("*") if p.is_file())
            shutil.rmtree(f)
    jit.clear_memory_cache()
    print(f"removed {removed} files under {base}")
    return 0


def add(sub) -> None:
    s = sub.add_parser("cache", help="list or clear the JIT kernel cache")
    s.add_argument("action", choices=("list", "clear"))
    s.add_argument("--target", help="only this target's kernels")
    s.add_argument("--json", action="store_true", help="list as JSON")
    s.set_defaults(fn=run)
