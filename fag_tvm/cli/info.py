"""`fag-tvm info`: versions, every registered target with whether it is usable here and why, caches."""
from __future__ import annotations

import argparse
import json
import os
import platform


def collect() -> dict:
    """Everything `info` reports (never raises: a broken component is reported, not fatal)."""
    import numpy as np

    from .. import _tvm, targets
    from ..jit import cache_dir
    from ..tune.records import default_log_dir
    from ..version import __version__

    info: dict = {"fag_tvm": __version__, "python": platform.python_version(), "numpy": np.__version__,
                  "targets": targets.availability(), "cache_dir": str(cache_dir()),
                  "tuning_logs": str(default_log_dir())}
    try:
        info["tvm"] = _tvm.tvm_version()
        info["tvm_ffi"] = _tvm.tvm_ffi_version()
        info["threads"] = _tvm.num_threads()
    except Exception as exc:  # noqa: BLE001 - info must work even when TVM is broken
        info["tvm"] = f"unavailable: {exc}"
    hw, hashes = {}, {}
    for name in targets.names():
        try:
            t = targets.get(name)
            if t.compiled:
                hw[name] = t.hw()
                hashes[name] = t.source_hash()
        except Exception as exc:  # noqa: BLE001
            hw[name] = f"unavailable: {exc}"
    info["hardware"] = hw
    info["source_hash"] = hashes
    info["torch_op"] = _torch_op()
    info["environment"] = {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("FAG_TVM_", "TVM_NUM"))}
    return info


def _torch_op() -> dict:
    """torch's version and the torch op's native path state (probed: nothing is built here)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return {"torch": "not installed"}
    try:
        import torch

        from .. import torch_native

        return {"torch": torch.__version__, "native_path": torch_native.probe()}
    except Exception as exc:  # noqa: BLE001 - info reports
        return {"torch": f"unusable: {exc}"}


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for k, v in info.items():
        if k == "targets":
            print("targets")
            for name, st in v.items():
                print(f"  {name:12s} {'available' if st['available'] else 'NOT available'}: {st['reason']}")
        elif isinstance(v, dict):
            print(k)
            for kk, vv in v.items():
                print(f"  {kk:12s} {vv}")
        else:
            print(f"{k:12s} {v}")
    return 0


def add(sub) -> None:
    s = sub.add_parser("info", help="versions, targets (usable here or why not), hardware, caches")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=run)
