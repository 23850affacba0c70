"""The JIT cache: build a target's kernel on first use, keep it in memory and on disk.

    $FAG_TVM_CACHE/<target>/<hw tag>/<entry>-<build hash>.so     the compiled library
    $FAG_TVM_CACHE/<target>/<hw tag>/<entry>-<build hash>.json   size + sha256 recorded at write time

The build hash covers the target's source hash (its kernels + schedule + the shared ABI and math), the
TVM / tvm-ffi versions, the hardware description, the spec and the knobs. Writes are atomic (temp file +
rename) under an inter-process lock, so concurrent processes compiling the same kernel both succeed.
Before a cached library is loaded its size and sha256 are checked against the sidecar: a truncated,
replaced or foreign entry is rebuilt (with a warning), never dlopened. An unusable cache folder (not
writable, a file where a folder should be, ...) falls back to an in-memory build with a warning.
Default cache folder: ~/.cache/fag_tvm (override with FAG_TVM_CACHE)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import _tvm, targets
from .core.files import atomic_output, atomic_write_json, file_lock, read_json, sha256_file
from .core.memo import BoundedMemo
from .core.spec import KernelSpec
from .targets.base import Kernel, KernelProvider, Target

_LOCK = threading.Lock()
_MEM: dict[tuple, Kernel] = {}
_PROVIDERS: dict[str, KernelProvider] = {}
STATS = {"compiled": 0, "disk_hits": 0, "mem_hits": 0, "rebuilt": 0, "compile_s": 0.0}
SLOW_COMPILE_NOTICE_S = 1.0


def cache_dir() -> Path:
    d = os.environ.get("FAG_TVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fag_tvm")
    return Path(d)


def _target(target: str | Target) -> Target:
    return target if isinstance(target, Target) else targets.get(target)


def knobs_for(target: str | Target, spec: KernelSpec, hw: dict | None = None, shape: Any = None):
    """(knobs, origin): the tuned knobs of `spec` from tuning_logs/<target>/<family>/best.json when a
    record applies here (see fag_tvm.tune.records.tuned_knobs), else the template's defaults.
    origin is "tuned:<file>#<workload id>" or "default"."""
    from .tune.records import tuned_knobs

    t = _target(target)
    hw = dict(hw or t.hw())
    try:
        r = tuned_knobs(t, spec, hw, shape)
    except Exception as e:  # noqa: BLE001 - a broken log must never break a build
        warnings.warn(f"fag_tvm: tuning logs unusable ({e}); using default knobs", stacklevel=2)
        r = None
    return r if r is not None else (t.default_knobs(spec, hw), "default")


def build_hash(t: Target, spec: KernelSpec, knobs: Any, hw: dict) -> str:
    blob = json.dumps({"src": t.source_hash(), "tvm": _tvm.tvm_version(), "ffi": _tvm.tvm_ffi_version(),
                       "hw": hw, "spec": asdict(spec), "knobs": asdict(knobs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def kernel(target: str | Target, spec: KernelSpec, knobs: Any = None, hw: dict | None = None,
           use_disk: bool = True) -> Kernel:
    """The compiled kernel of `spec` (memory cache, else disk cache, else build)."""
    t = _target(target)
    hw = dict(hw or t.hw())
    if knobs is None:
        knobs, _ = knobs_for(t, spec, hw)
    mkey = (t.name, spec, knobs, json.dumps(hw, sort_keys=True))
    with _LOCK:
        k = _MEM.get(mkey)
        if k is not None:
            STATS["mem_hits"] += 1
            return k
        k = _build(t, spec, knobs, hw, use_disk)
        _MEM[mkey] = k
        return k


def provider(target: str | Target) -> KernelProvider:
    """A kernel provider (spec -> Kernel) backed by this cache, for `target`: the first call of a spec on
    this machine resolves its knobs (tuning records) and kernel; later calls are one dict lookup."""
    t = _target(target)
    p = _PROVIDERS.get(t.name)
    if p is None or getattr(p, "target", None) is not t:
        resolved: dict[KernelSpec, Kernel] = {}

        def p(spec: KernelSpec) -> Kernel:
            k = resolved.get(spec)
            if k is None:
                k = resolved[spec] = kernel(t, spec)
            return k

        p.target = t  # type: ignore[attr-defined]
        p.provider_for = provider  # type: ignore[attr-defined]  # a sibling target's provider (ascend-like's forward)
        p.resolved = resolved  # type: ignore[attr-defined]
        p.by_config = BoundedMemo(4096)  # type: ignore[attr-defined]  # launchers' per-config memo (llvm/launch)
        _PROVIDERS[t.name] = p
    return p


def clear_memory_cache() -> None:
    """Forget every loaded kernel (and the providers' resolutions): the next call resolves knobs again."""
    with _LOCK:
        _MEM.clear()
        for p in _PROVIDERS.values():
            p.resolved.clear()
            p.by_config.clear()


class _SlowNotice:
    """Says on stderr that a compile is running once it has taken longer than a second."""

    def __init__(self, what: str):
        self.what = what
        self.shown = False
        self.t0 = time.perf_counter()
        self.timer = threading.Timer(SLOW_COMPILE_NOTICE_S, self._show)
        self.timer.daemon = True

    def _show(self) -> None:
        self.shown = True
        print(f"fag_tvm: compiling {self.what} (first use; cached afterwards) ...", file=sys.stderr, flush=True)

    def __enter__(self) -> "_SlowNotice":
        if os.environ.get("FAG_TVM_QUIET") != "1":
            self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()
        self.elapsed = time.perf_counter() - self.t0
        if self.shown and exc[0] is None:
            print(f"fag_tvm: compiled {self.what} in {self.elapsed:.1f} s", file=sys.stderr, flush=True)


def _compile(t: Target, spec: KernelSpec, knobs: Any, hw: dict) -> tuple[Any, float]:
    name = t.entry_name(spec, knobs, hw)
    with _SlowNotice(name) as n:
        ex = t.compile(t.make_funcs(spec, knobs, hw), hw)
    STATS["compiled"] += 1
    STATS["compile_s"] += n.elapsed
    return ex, n.elapsed


def _in_memory(t: Target, spec: KernelSpec, knobs: Any, hw: dict) -> Kernel:
    ex, dt = _compile(t, spec, knobs, hw)
    return t.kernel(ex, spec, knobs, hw, None, dt)


def entry_problem(lib: Path, side: Path, name: str, bhash: str) -> str | None:
    """None if the cache entry can be loaded safely, else what is wrong with it."""
    meta = read_json(side)
    if not isinstance(meta, dict):
        return "no readable metadata"
    if meta.get("entry") != name or meta.get("build_hash") != bhash:
        return "metadata of another kernel"
    try:
        st = lib.stat()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if not lib.is_file():
        return "not a regular file"
    if st.st_size != meta.get("size"):
        return f"size {st.st_size} != recorded {meta.get('size')} (truncated or replaced)"
    if sha256_file(lib) != meta.get("sha256"):
        return "sha256 differs from the recorded one (modified)"
    return None


def _write_entry(t: Target, spec: KernelSpec, knobs: Any, hw: dict, lib: Path, side: Path, name: str,
                 bhash: str) -> float:
    ex, dt = _compile(t, spec, knobs, hw)
    with atomic_output(lib, suffix=t.library_suffix) as tmp:
        t.export(ex, tmp)
        meta = {"entry": name, "build_hash": bhash, "size": os.path.getsize(tmp), "sha256": sha256_file(tmp),
                "target": t.name, "hw": hw, "spec": asdict(spec), "knobs": asdict(knobs),
                "source_hash": t.source_hash(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(side, meta)
    return dt


def _build(t: Target, spec: KernelSpec, knobs: Any, hw: dict, use_disk: bool) -> Kernel:
    if not use_disk:
        return _in_memory(t, spec, knobs, hw)
    name = t.entry_name(spec, knobs, hw)
    bhash = build_hash(t, spec, knobs, hw)
    folder = cache_dir() / t.name / t.hw_tag(hw)
    lib = folder / f"{name}-{bhash}{t.library_suffix}"
    side = folder / f"{name}-{bhash}.json"
    stack = contextlib.ExitStack()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if lib.exists() and not lib.is_file():
            raise OSError(f"{lib.name} exists and is not a regular file")
        stack.enter_context(file_lock(str(lib) + ".lock"))
    except (OSError, TimeoutError) as e:  # unusable cache: compile in memory
        stack.close()
        warnings.warn(f"fag_tvm: kernel cache {folder} not usable ({e}); compiling in memory", stacklevel=3)
        return _in_memory(t, spec, knobs, hw)
    with stack:
        dt = None
        problem = entry_problem(lib, side, name, bhash) if (lib.exists() or side.exists()) else "missing"
        if problem is not None:
            if problem != "missing":
                warnings.warn(f"fag_tvm: cached kernel {lib.name}: {problem}; rebuilding", stacklevel=3)
                STATS["rebuilt"] += 1
            try:
                dt = _write_entry(t, spec, knobs, hw, lib, side, name, bhash)
            except OSError as e:
                warnings.warn(f"fag_tvm: cannot write {lib} ({e}); compiling in memory", stacklevel=3)
                return _in_memory(t, spec, knobs, hw)
        else:
            STATS["disk_hits"] += 1
        try:
            return t.kernel(t.load(str(lib)), spec, knobs, hw, str(lib), dt)
        except Exception as e:  # noqa: BLE001 - verified yet unloadable (should not happen): rebuild in memory
            warnings.warn(f"fag_tvm: cached kernel {lib.name} failed to load ({e}); compiling in memory",
                          stacklevel=3)
            return _in_memory(t, spec, knobs, hw)


def cache_entries() -> list[dict]:
    """Every kernel in the disk cache with its metadata and whether it verifies (for `fag-tvm cache`)."""
    out = []
    base = cache_dir()
    for side in sorted(base.glob("*/*/*.json")):
        meta = read_json(side)
        suffix = targets.get(meta["target"]).library_suffix if isinstance(meta, dict) and \
            meta.get("target") in targets.names() else ".so"
        lib = side.parent / (side.stem + suffix)
        ok = isinstance(meta, dict) and entry_problem(lib, side, meta.get("entry"), meta.get("build_hash")) is None
        out.append({"path": str(lib), "meta": meta if isinstance(meta, dict) else None, "ok": ok,
                    "bytes": lib.stat().st_size if lib.is_file() else 0})
    return out
