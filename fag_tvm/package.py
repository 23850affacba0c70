"""AOT packages: compile every kernel a list of workloads needs into one verifiable folder.

    DIR/manifest.json       kernel entries (spec, knobs, argument names), target, versions, source hash,
                            sha256 of every file
    DIR/kernels.so          all kernels, one exported TVM library
    DIR/libtvm_runtime.so   the runtime the kernels need (loaded by fag_tvm.runtime with tvm-ffi only)

Building needs the TVM compiler; loading (fag_tvm.runtime) does not."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable

from . import __version__, _tvm
from .kernels.abi import kernel_spec
from .kernels.spec import KernelSpec, param_names
from .workloads import configs

FORMAT = "fag_tvm-package/1"
MANIFEST = "manifest.json"
LIBRARY = "kernels.so"
RUNTIME = "libtvm_runtime.so"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def specs_for(workloads: list[dict[str, Any]]) -> list[KernelSpec]:
    """The distinct kernel specialisations (forward and backward) a list of workloads needs."""
    out: list[KernelSpec] = []
    for w in workloads:
        fcfg, bcfg = configs(w)
        for spec in (kernel_spec(fcfg, "fwd"), kernel_spec(bcfg, "bwd")):
            if spec not in out:
                out.append(spec)
    return out


def build_package(workloads: list[dict[str, Any]], out_dir: str, target: dict | None = None,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Compile the kernels of `workloads` into the package folder `out_dir` (replaced atomically)."""
    from .build import knobs_for, make_func, source_hash

    tvm = _tvm.import_tvm()
    target = dict(target or _tvm.cpu_target())
    specs = specs_for(workloads)
    entries, funcs = [], {}
    for i, spec in enumerate(specs):
        knobs, origin = knobs_for(spec, target)
        name = spec.key("llvm", knobs)
        log(f"[{i + 1}/{len(specs)}] {name} (knobs: {origin})")
        funcs[name] = make_func(spec, knobs, name)
        entries.append({"entry": name, "spec": asdict(spec), "knobs": asdict(knobs), "knobs_origin": origin,
                        "params": param_names(spec)})
    t0 = time.perf_counter()
    ex = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target(target))
    log(f"compiled {len(funcs)} kernels in {time.perf_counter() - t0:.1f} s")
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fagpkg-", dir=parent)
    try:
        ex.export_library(os.path.join(tmp, LIBRARY))
        shutil.copy2(_tvm.runtime_library_path(), os.path.join(tmp, RUNTIME))
        manifest = {
            "format": FORMAT, "fag_tvm_version": __version__, "tvm_version": _tvm.tvm_version(),
            "tvm_ffi_version": _tvm.tvm_ffi_version(), "source_hash": source_hash(), "target": target,
            "cpu_flags_required": required_flags(target), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "library": LIBRARY, "runtime_library": RUNTIME, "kernels": entries, "workloads": workloads,
            "files": {f: sha256_file(os.path.join(tmp, f)) for f in (LIBRARY, RUNTIME)},
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(out_dir):
            old = out_dir.rstrip("/") + f".old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    log(f"package {out_dir}: {len(entries)} kernels, {size / 2**20:.1f} MiB")
    return manifest


def required_flags(target: dict) -> list[str]:
    """CPU flags a machine needs to run code built for `target` (checked when a package is loaded)."""
    lanes = _tvm.vector_lanes(target)
    return ["avx512f"] if lanes == 16 else ["avx2", "fma"] if lanes == 8 else []
