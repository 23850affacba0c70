"""The target registry: every `target=` of the public API, `fag-tvm compile/tune/bench/report/info`
and the package loader go through `get(name)`.

Built-in targets are registered by import path and imported on first use (so listing them imports no
TVM); a plug-in registers an instance with `register(target)`, e.g. from a test, without editing any
other target's files."""
from __future__ import annotations

import importlib
import threading

from ..errors import invalid
from .base import Kernel, KernelProvider, Target

__all__ = ["Kernel", "KernelProvider", "Target", "register", "unregister", "get", "names", "availability"]

_BUILTIN = {
    "reference": "fag_tvm.targets.reference:TARGET",
    "reference-f64": "fag_tvm.targets.reference:TARGET_F64",
    "llvm": "fag_tvm.targets.llvm:TARGET",
    "ascend-like": "fag_tvm.targets.ascend_like:TARGET",
    "cuda-sim": "fag_tvm.targets.cuda:SIM_TARGET",
}
_LOADED: dict[str, Target] = {}
_LOCK = threading.Lock()


def register(target: Target, replace: bool = False) -> Target:
    """Add a target instance under `target.name` (refuses to shadow another target unless replace)."""
    if not isinstance(target, Target) or not target.name:
        raise TypeError("register() takes a fag_tvm.targets.Target instance with a name")
    with _LOCK:
        if not replace and (target.name in _LOADED or target.name in _BUILTIN):
            raise ValueError(f"target {target.name!r} is already registered")
        _LOADED[target.name] = target
    return target


def unregister(name: str) -> None:
    """Remove a plug-in target (built-in targets cannot be removed)."""
    with _LOCK:
        if name in _BUILTIN:
            raise ValueError(f"{name!r} is a built-in target")
        _LOADED.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered target name (built-ins first)."""
    return tuple(_BUILTIN) + tuple(n for n in _LOADED if n not in _BUILTIN)


def get(name: str) -> Target:
    """The target registered as `name`; FagError 161002 naming `target` if there is none."""
    t = _LOADED.get(name) if isinstance(name, str) else None
    if t is not None:
        return t
    if not isinstance(name, str) or name not in _BUILTIN:
        raise invalid("target", f"unknown target {name!r}; expected one of {', '.join(names())}")
    module, attr = _BUILTIN[name].split(":")
    t = getattr(importlib.import_module(module), attr)
    with _LOCK:
        _LOADED.setdefault(name, t)
    return _LOADED[name]


def availability() -> dict[str, dict]:
    """{name: {"available": bool, "reason": str}} for every registered target (never raises)."""
    out = {}
    for n in names():
        try:
            ok, why = get(n).availability()
        except Exception as e:  # noqa: BLE001 - `fag-tvm info` must report, not crash
            ok, why = False, f"{type(e).__name__}: {e}"
        out[n] = {"available": bool(ok), "reason": str(why)}
    return out
