"""Load an AOT package and call it — without the TVM compiler (tvm-ffi + the packaged runtime library).

    pkg = fag_tvm.runtime.load("pkg_dir")
    g = pkg.flash_attention_score_grad(q, k, v, dy, head_num=..., input_layout=..., ...)

Before anything is loaded, the manifest's format, fag_tvm / TVM versions, kernel source hash, CPU
features and the sha256 of every file are verified; any mismatch is a FagError (161002) saying what
differs. Deploy mode never compiles: a call no packaged kernel serves raises FagError naming the
missing kernel. Calls are thread-safe (the kernels are re-entrant; the loader state is read-only)."""
from __future__ import annotations

import json
import os
import threading
from typing import Any

from . import __version__, _tvm
from .api import flash_attention_score, flash_attention_score_grad
from .errors import FagError, invalid
from .kernels.spec import KernelSpec

PINNED_TVM = "0.27.0.post1"
_FORMAT = "fag_tvm-package/1"


class _PackagedKernel:
    """One entry of kernels.so with the ABI argument checks of build.Kernel."""

    def __init__(self, spec: KernelSpec, name: str, fn: Any, params: list[str]):
        self.spec, self.name, self.fn, self.param_names = spec, name, fn, params

    def __call__(self, *arrays: Any) -> None:
        if len(arrays) != len(self.param_names):
            raise TypeError(f"{self.name}: expected {len(self.param_names)} arguments, got {len(arrays)}")
        args = []
        for i, a in enumerate(arrays):
            _tvm.check_kernel_arg(a, i)
            args.append(_tvm.kernel_view(a))
        self.fn(*args)


class Package:
    """A loaded AOT package; same call signatures as fag_tvm.flash_attention_score{,_grad}."""

    def __init__(self, path: str, manifest: dict, module: Any):
        self.path = path
        self.manifest = manifest
        self._kernels: dict[KernelSpec, _PackagedKernel] = {}
        for e in manifest["kernels"]:
            spec = KernelSpec(**e["spec"])
            self._kernels[spec] = _PackagedKernel(spec, e["entry"], module[e["entry"]], list(e["params"]))

    @property
    def kernel_names(self) -> list[str]:
        return [k.name for k in self._kernels.values()]

    def _provider(self, spec: KernelSpec) -> _PackagedKernel:
        k = self._kernels.get(spec)
        if k is None:
            raise invalid("package", f"unsupported: no kernel in {self.path} serves this call; missing "
                          f"{spec.key('llvm')} (add the workload to the package; deploy mode never compiles)")
        return k

    def flash_attention_score_grad(self, query: Any, key: Any, value: Any, dy: Any, **kwargs: Any):
        """As fag_tvm.flash_attention_score_grad, served by this package's kernels only."""
        kwargs.pop("target", None)
        return flash_attention_score_grad(query, key, value, dy, target="llvm", _provider=self._provider, **kwargs)

    def flash_attention_score(self, query: Any, key: Any, value: Any, **kwargs: Any):
        """As fag_tvm.flash_attention_score, served by this package's kernels only."""
        kwargs.pop("target", None)
        return flash_attention_score(query, key, value, target="llvm", _provider=self._provider, **kwargs)

    def __repr__(self) -> str:
        return f"Package({self.path!r}, {len(self._kernels)} kernels)"


_LOAD_LOCK = threading.Lock()


def _refuse(rule: str) -> FagError:
    return invalid("package", rule)


def verify(path: str) -> dict:
    """Check a package folder without loading code; returns its manifest or raises FagError."""
    from .build import source_hash
    from .package import MANIFEST, sha256_file

    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise _refuse(f"{mpath} not found (not a fag_tvm package)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise _refuse(f"{mpath} unreadable: {e}") from None
    if not isinstance(m, dict) or m.get("format") != _FORMAT:
        raise _refuse(f"format {m.get('format') if isinstance(m, dict) else None!r} is not {_FORMAT!r}")
    if m.get("fag_tvm_version") != __version__:
        raise _refuse(f"built by fag_tvm {m.get('fag_tvm_version')}, this is fag_tvm {__version__}")
    if m.get("tvm_version") != PINNED_TVM:
        raise _refuse(f"built with TVM {m.get('tvm_version')}, this fag_tvm needs TVM {PINNED_TVM}")
    if m.get("source_hash") != source_hash():
        raise _refuse("kernel source hash differs from this fag_tvm's kernels (rebuild the package)")
    missing = [f for f in m.get("cpu_flags_required", []) if f not in _tvm.cpu_flags()]
    if missing:
        raise _refuse(f"built for {m.get('target')}; this CPU lacks {missing}")
    files = m.get("files", {})
    for name in (m.get("library"), m.get("runtime_library")):
        if name not in files:
            raise _refuse(f"manifest lists no hash for {name!r}")
    for name, digest in files.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise _refuse(f"file {name} is missing")
        if sha256_file(p) != digest:
            raise _refuse(f"file {name} does not match its sha256 in the manifest (modified or truncated)")
    return m


def load(path: str) -> Package:
    """Verify and load an AOT package; the TVM compiler is never imported."""
    path = os.path.abspath(path)
    m = verify(path)
    with _LOAD_LOCK:
        _tvm.load_runtime(os.path.join(path, m["runtime_library"]))
        try:
            mod = _tvm.import_tvm_ffi().load_module(os.path.join(path, m["library"]))
        except Exception as e:  # noqa: BLE001 - a corrupt library is a refused package, not a crash
            raise _refuse(f"cannot load {m['library']}: {e}") from None
    try:
        return Package(path, m, mod)
    except Exception as e:  # noqa: BLE001
        raise _refuse(f"manifest entries do not match {m['library']}: {e}") from None
