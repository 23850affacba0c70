"""Load an AOT package and call it — without the TVM compiler (tvm-ffi + the packaged runtime files).

    pkg = fag_tvm.runtime.load("pkg_dir")
    g = pkg.flash_attention_score_grad(q, k, v, dy, head_num=..., input_layout=..., ...)

Before anything is loaded the package is verified (fag_tvm.core.manifest: versions, per-target source
hash, hardware vs this machine, size + sha256 of every file, entry names vs the manifest); any problem is
a FagError (161002) saying what differs. Deploy mode never compiles: a call no packaged kernel serves
raises FagError naming the missing kernel. Calls are thread-safe (kernels are re-entrant; the loader
state is read-only). This module imports neither the JIT builder nor the tuner."""
from __future__ import annotations

import os
import threading
from typing import Any

from . import targets
from .api import flash_attention_score, flash_attention_score_grad
from .core.manifest import refuse, verify
from .core.spec import KernelSpec
from .errors import invalid
from .targets.base import Kernel
from .version import __version__

_LOAD_LOCK = threading.Lock()


class Package:
    """A loaded AOT package; same call signatures as fag_tvm.flash_attention_score{,_grad}. `target=`
    picks one of the package's targets (default: the first one built)."""

    def __init__(self, path: str, manifest: dict, kernels: dict[str, dict[KernelSpec, Kernel]]):
        self.path = path
        self.manifest = manifest
        self._kernels = kernels
        self.targets = tuple(kernels)

    @property
    def kernel_names(self) -> list[str]:
        return [k.name for ks in self._kernels.values() for k in ks.values()]

    def _provider(self, target: str):
        ks = self._kernels[target]

        def provide(spec: KernelSpec) -> Kernel:
            k = ks.get(spec)
            if k is None:
                raise invalid("package", f"unsupported: no kernel in {self.path} serves this call; missing "
                              f"{spec.key(target)} (add the workload to the package; deploy mode never compiles)")
            return k

        return provide

    def _target(self, kwargs: dict) -> str:
        t = kwargs.pop("target", None) or self.targets[0]
        if t not in self._kernels:
            raise invalid("target", f"package {self.path} holds kernels for {list(self.targets)}, not {t!r}")
        return t

    def flash_attention_score_grad(self, query: Any, key: Any, value: Any, dy: Any, **kwargs: Any):
        """As fag_tvm.flash_attention_score_grad, served by this package's kernels only."""
        t = self._target(kwargs)
        return flash_attention_score_grad(query, key, value, dy, target=t, _provider=self._provider(t), **kwargs)

    def flash_attention_score(self, query: Any, key: Any, value: Any, **kwargs: Any):
        """As fag_tvm.flash_attention_score, served by this package's kernels only."""
        t = self._target(kwargs)
        return flash_attention_score(query, key, value, target=t, _provider=self._provider(t), **kwargs)

    def __repr__(self) -> str:
        return f"Package({self.path!r}, {len(self.kernel_names)} kernels, targets {list(self.targets)})"


def load(path: str) -> Package:
    """Verify and load an AOT package; the TVM compiler is never imported."""
    path = os.path.abspath(str(path))
    if not os.path.isdir(path):
        raise refuse(f"{path} is not a folder")
    v = verify(path, __version__, targets.get)
    kernels: dict[str, dict[KernelSpec, Kernel]] = {}
    with _LOAD_LOCK:
        for a in v["artifacts"]:
            t = a["target"]
            try:
                t.load_runtime(a["runtime_files"])
                mod = t.load(a["library"])
            except Exception as e:  # noqa: BLE001 - an unloadable library is a refused package, not a crash
                raise refuse(f"cannot load {os.path.basename(a['library'])}: {e}") from None
            ks = kernels.setdefault(t.name, {})
            for e in a["kernels"]:
                try:
                    ks[e["spec"]] = t.kernel(mod, e["spec"], e["knobs"], a["hw"], a["library"])
                except KeyError as exc:
                    raise refuse(f"kernel {e['entry']} is not in {os.path.basename(a['library'])} ({exc})") from None
    return Package(path, v["manifest"], kernels)
