"""Build (generate + compile) and cache the LLVM kernels.

`build_kernel(spec)` returns a callable taking NumPy arrays in ABI order (ABI.md). Kernels are cached
in-process (dict) and on disk under $FAG_TVM_CACHE (default ~/.cache/fag_tvm) as shared libraries
named `<kernel key>-<hash>.so`, where the hash covers the kernel generator sources (fag_tvm/kernels
and schedules/), the TVM and tvm-ffi versions and the target. Writes go to a temp file + os.replace
under an fcntl lock, so concurrent processes compiling the same kernel both succeed. A cached kernel
is loaded with tvm_ffi + libtvm_runtime.so only (the TVM compiler is not imported).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import _tvm
from .kernels.spec import KernelSpec, param_names

_ROOT = Path(__file__).resolve().parent
_SOURCE_DIRS = (_ROOT / "kernels", _ROOT.parent / "schedules")
_LOCK = threading.Lock()
_MEM: dict[tuple, "Kernel"] = {}
STATS = {"compiled": 0, "disk_hits": 0, "mem_hits": 0, "compile_s": 0.0}


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha256 over the kernel generator sources (fag_tvm/kernels/*.py, schedules/*.py)."""
    h = hashlib.sha256()
    for d in _SOURCE_DIRS:
        for p in sorted(d.glob("*.py")):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    d = os.environ.get("FAG_TVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fag_tvm")
    return Path(d)


def default_knobs(spec: KernelSpec, target: dict | None = None):
    from schedules.llvm import default_knobs as dk

    return dk(spec, vec=_tvm.vector_lanes(target))


def knobs_for(spec: KernelSpec, target: dict | None = None, shape: Any = None):
    """(knobs, origin): the tuned knobs of `spec` for this target from
    tuning_logs/llvm/<spec key>/best.json (written by `fag-tvm tune`; root overridable with
    $FAG_TVM_TUNING_LOGS), else the schedule template's defaults. origin is "tuned:<file>#<workload>" or
    "default". Records whose metadata does not match (kernel source hash, TVM version, target, CPU
    model) or whose knobs are infeasible are ignored with a logged reason (fag_tvm.tune.tuned_knobs).
    `shape` (a workload dict or an OpConfig) picks the record of the same/nearest shape; without it the
    record of the family's largest tuned workload is used."""
    from .tune import tuned_knobs

    try:
        r = tuned_knobs(spec, target, shape)
    except Exception as e:  # noqa: BLE001 - a broken log must never break a build
        warnings.warn(f"fag_tvm: tuning logs unusable ({e}); using default knobs")
        r = None
    if r is not None:
        return r
    return default_knobs(spec, target), "default"


def kernel_name(spec: KernelSpec, knobs) -> str:
    return spec.key("llvm", knobs)


def build_hash(spec: KernelSpec, knobs, target: dict) -> str:
    blob = json.dumps({"src": source_hash(), "tvm": _tvm.tvm_version(), "ffi": _tvm.tvm_ffi_version(),
                       "target": target, "spec": asdict(spec), "knobs": asdict(knobs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_func(spec: KernelSpec, knobs, name: str):
    """The PrimFunc of a kernel (exposed for tuners and inspection)."""
    _tvm.import_tvm()
    if spec.direction == "bwd":
        from .kernels.bwd import make_bwd

        return make_bwd(spec, knobs, name=name)
    from .kernels.fwd import make_fwd

    return make_fwd(spec, knobs, name=name)


def compile_func(func, target: dict | None = None):
    """tvm.compile for the CPU target (explicit mcpu)."""
    tvm = _tvm.import_tvm()
    return tvm.compile(func, target=tvm.target.Target(target or _tvm.cpu_target()))


class Kernel:
    """A compiled kernel: call with NumPy arrays in ABI order (64-byte aligned, C-contiguous)."""

    def __init__(self, spec: KernelSpec, knobs, name: str, fn, path: str | None, compile_s: float | None):
        self.spec = spec
        self.knobs = knobs
        self.name = name
        self.key = name
        self.fn = fn
        self.path = path
        self.compile_s = compile_s
        self.param_names = param_names(spec)

    def __call__(self, *arrays: Any) -> None:
        if len(arrays) != len(self.param_names):
            raise TypeError(f"{self.name}: expected {len(self.param_names)} arguments "
                            f"({', '.join(self.param_names)}), got {len(arrays)}")
        args = []
        for i, a in enumerate(arrays):
            _tvm.check_kernel_arg(a, i)
            args.append(_tvm.kernel_view(a))
        self.fn(*args)

    def __repr__(self) -> str:
        return f"Kernel({self.name})"


def _export(ex, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".so.tmp", dir=str(path.parent))
    os.close(fd)
    try:
        ex.export_library(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_kernel(spec: KernelSpec, knobs=None, target: dict | None = None, use_disk: bool = True) -> Kernel:
    """Generate + compile (or load from cache) the kernel for `spec`; returns a `Kernel` callable."""
    target = dict(target or _tvm.cpu_target())
    if knobs is None:
        knobs, _ = knobs_for(spec, target)
    mkey = (spec, knobs, json.dumps(target, sort_keys=True))
    with _LOCK:
        k = _MEM.get(mkey)
        if k is not None:
            STATS["mem_hits"] += 1
            return k
        name = kernel_name(spec, knobs)
        k = _build_locked(spec, knobs, target, name, use_disk)
        _MEM[mkey] = k
        return k


def _compile_to(spec, knobs, target, name, path: Path) -> float:
    t0 = time.perf_counter()
    ex = compile_func(make_func(spec, knobs, name), target)
    dt = time.perf_counter() - t0
    _export(ex, path)
    STATS["compiled"] += 1
    STATS["compile_s"] += dt
    return dt


def _build_locked(spec, knobs, target, name, use_disk) -> Kernel:
    path = cache_dir() / f"{name}-{build_hash(spec, knobs, target)}.so"
    lockf = None
    if use_disk:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lockf = open(str(path) + ".lock", "w")  # noqa: SIM115 - closed below
        except OSError as e:  # unwritable cache: compile in memory
            warnings.warn(f"fag_tvm: kernel cache {path.parent} not usable ({e}); compiling in memory")
    if lockf is None:
        t0 = time.perf_counter()
        ex = compile_func(make_func(spec, knobs, name), target)
        dt = time.perf_counter() - t0
        STATS["compiled"] += 1
        STATS["compile_s"] += dt
        return Kernel(spec, knobs, name, ex[name], None, dt)
    with lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        try:
            dt = None
            if not path.exists():
                dt = _compile_to(spec, knobs, target, name, path)
            else:
                STATS["disk_hits"] += 1
            try:
                mod = _tvm.load_module(str(path))
            except Exception as e:  # noqa: BLE001 - a corrupt/truncated cache entry: rebuild it once
                if dt is not None:
                    raise
                warnings.warn(f"fag_tvm: cached kernel {path} failed to load ({e}); rebuilding")
                dt = _compile_to(spec, knobs, target, name, path)
                mod = _tvm.load_module(str(path))
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)
    return Kernel(spec, knobs, name, mod[name], str(path), dt)


def clear_memory_cache() -> None:
    with _LOCK:
        _MEM.clear()


def time_kernel(kernel: Kernel, args: list[np.ndarray], repeat: int = 5, number: int = 1) -> list[float]:
    """Wall-clock seconds of `repeat` calls (each the mean over `number` back-to-back calls)."""
    out = []
    kernel(*args)  # warm-up
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            kernel(*args)
        out.append((time.perf_counter() - t0) / number)
    return out
