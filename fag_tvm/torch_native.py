"""The torch op's native eager path: csrc/torch_native.cpp, a C++ autograd op (`fag_tvm_native::attention`)
whose forward and backward call the compiled kernels with no Python in between -- the per-call cost of the
Python autograd path (~150 us a training step on a small call) is argument handling, not kernels.

The extension is compiled on first use with the C++ compiler torch was built for, against this torch's and
tvm-ffi's headers, into the JIT cache ($FAG_TVM_CACHE/torch-native/...; atomic write under a lock, size + sha256
recorded and verified before loading, a damaged entry rebuilt -- the kernel cache's rules). Where it cannot
be built (no compiler, FAG_TVM_NATIVE=0) the op uses its Python path, which computes the same thing: the
reason is in `status()`.

A call signature (every scalar, the tensors' shapes and dtypes, the compressed mask's buffer) is bound once
to a pair of launches (targets/llvm/launch.Launch, forward and backward) registered with the extension;
targets without bound launches (the reference target) keep the Python path."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from . import api
from .core.files import atomic_output, atomic_write_json, file_lock, sha256_file
from .core.memo import BoundedMemo

SOURCE = Path(__file__).with_name("csrc") / "torch_native.cpp"
_STATE: dict[str, Any] = {"loaded": None, "reason": ""}
_LOAD_LOCK = threading.Lock()
_BOUND = BoundedMemo(1024)  # call signature -> (forward launch id, backward launch id, dpse) or None
_REGISTERED: dict[int, tuple[Any, int]] = {}  # id(Launch) -> (the Launch, kept alive; its extension id)
_FLAGS = ("backward", "pse", "mask", "drop", "band", "row_check", "dpse")


def _compile_command(out: str) -> list[str]:
    from . import _tvm  # noqa: PLC0415 - only when building

    torch_dir = Path(torch.__file__).parent
    ffi_includes, ffi_lib = _tvm.ffi_build_paths()
    cxx = os.environ.get("CXX", "g++")
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            *[f"-I{i}" for i in ffi_includes], str(SOURCE), "-o", out,
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch", f"-L{ffi_lib}", "-ltvm_ffi",
            f"-Wl,-rpath,{torch_dir / 'lib'}", f"-Wl,-rpath,{ffi_lib}"]


def _build_hash(cmd: list[str]) -> str:
    from . import _tvm  # noqa: PLC0415

    compiler = subprocess.run([cmd[0], "--version"], capture_output=True, text=True, timeout=60).stdout
    blob = json.dumps({"src": hashlib.sha256(SOURCE.read_bytes()).hexdigest(), "torch": torch.__version__,
                       "ffi": _tvm.tvm_ffi_version(), "cxx": compiler, "flags": cmd[1:7]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_NAME = "torch_native"


def _entry() -> tuple[Path, Path, str]:
    """(library, sidecar, build hash) of this configuration's cache entry; RuntimeError without a compiler."""
    from .jit import cache_dir  # noqa: PLC0415

    cmd = _compile_command("OUT")
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"no C++ compiler ({cmd[0]})")
    bhash = _build_hash(cmd)
    folder = cache_dir() / "torch-native" / f"torch-{torch.__version__}"
    return folder / f"{_NAME}-{bhash}.so", folder / f"{_NAME}-{bhash}.json", bhash


def probe() -> str:
    """What the native path's state is, without building anything (for `fag-tvm info`)."""
    from .jit import entry_problem  # noqa: PLC0415

    if _STATE["loaded"] is not None:
        return "loaded" if _STATE["loaded"] else f"unavailable: {_STATE['reason']}"
    if os.environ.get("FAG_TVM_NATIVE", "1") == "0":
        return "disabled by FAG_TVM_NATIVE=0"
    try:
        lib, side, bhash = _entry()
    except Exception as exc:  # noqa: BLE001 - a probe reports
        return f"unavailable: {exc}"
    problem = entry_problem(lib, side, _NAME, bhash) if (lib.exists() or side.exists()) else "missing"
    if problem is None:
        return f"built ({lib})"
    return "not built yet: compiled on first use (~30 s)" if problem == "missing" else \
        f"cache entry damaged ({problem}): rebuilt on first use"


def _library() -> Path:
    """The built extension in the cache (built here if missing or damaged)."""
    from .jit import entry_problem  # noqa: PLC0415

    name = _NAME
    lib, side, bhash = _entry()
    lib.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(str(lib) + ".lock"):
        problem = entry_problem(lib, side, name, bhash) if (lib.exists() or side.exists()) else "missing"
        if problem is not None:
            if problem != "missing":
                warnings.warn(f"fag_tvm: cached {lib.name}: {problem}; rebuilding", stacklevel=4)
            t0 = time.perf_counter()
            if os.environ.get("FAG_TVM_QUIET") != "1":
                print("fag_tvm: compiling the torch op's native path (first use; cached afterwards) ...",
                      file=sys.stderr, flush=True)
            with atomic_output(lib, suffix=".so") as tmp:
                r = subprocess.run(_compile_command(tmp), capture_output=True, text=True, timeout=900)
                if r.returncode != 0:
                    raise RuntimeError(f"compiling {SOURCE.name} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
                meta = {"entry": name, "build_hash": bhash, "target": "torch-native", "size": os.path.getsize(tmp),
                        "sha256": sha256_file(tmp), "torch": torch.__version__,
                        "compile_s": round(time.perf_counter() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_json(side, meta)
    return lib


def _load() -> bool:
    with _LOAD_LOCK:
        if _STATE["loaded"] is None:
            if os.environ.get("FAG_TVM_NATIVE", "1") == "0":
                _STATE.update(loaded=False, reason="disabled by FAG_TVM_NATIVE=0")
            else:
                try:
                    torch.ops.load_library(str(_library()))
                    _STATE.update(loaded=True, reason="")
                except Exception as exc:  # noqa: BLE001 - any build/load failure: the Python path stays
                    _STATE.update(loaded=False, reason=str(exc))
                    warnings.warn(f"fag_tvm: the torch op's native path is unavailable ({exc}); using the "
                                  "Python path", stacklevel=3)
    return _STATE["loaded"]


def status() -> tuple[bool, str]:
    """(usable, why not): builds and loads the extension on first call."""
    return _load(), _STATE["reason"]


def _registered(launch: Any) -> Optional[int]:
    known = _REGISTERED.get(id(launch))
    return known[1] if known is not None and known[0] is launch else None


def _register_pair(fwd: Any, bwd: Any) -> Optional[tuple[int, int]]:
    """The extension's ids of a forward and a backward Launch, each handed over once (metadata arrays shared,
    not copied). Signatures that differ only in the compressed mask's buffer share their Launches (the target
    memoizes them per config and mask shape), so a new mask tensor every step registers nothing new. None
    when the extension's table is full (then the Python path runs; said once)."""
    with _LOAD_LOCK:
        need = [x for x in (fwd, bwd) if _registered(x) is None]
        if len(need) > torch.ops.fag_tvm_native.capacity():
            if not _STATE.get("full_warned"):
                _STATE["full_warned"] = True
                warnings.warn("fag_tvm: the torch op's native path has registered its maximum number of launches "
                              "(many distinct call signatures, e.g. varying TND lengths); new signatures use the "
                              "Python path", stacklevel=4)
            return None
        for x in need:
            _REGISTERED[id(x)] = (x, _register_new(x))
        return _registered(fwd), _registered(bwd)


def _register_new(launch: Any) -> int:
    """Hand one Launch's static part to the extension (under _LOAD_LOCK)."""
    flags = dict(backward=launch.direction == "bwd", pse="pse_shift" in launch.input_names,
                 mask="atten_mask" in launch.input_names, drop="drop_mask" in launch.input_names,
                 band=launch.band, row_check=launch.row_check, dpse=launch.dpse_shape is not None)
    params = [torch.from_numpy(p) for ts in (False, True) for p in launch.params[ts]]  # [tile_skip] order
    shapes: list[int] = []
    for shape, _ in launch.outputs:
        shapes += [len(shape), *shape]
    return torch.ops.fag_tvm_native.register_launch(launch.function.__chandle__(), params,
                                                    [int(flags[f]) for f in _FLAGS], shapes,
                                                    launch.workspace_floats)


def _placeholders(fwd: Any, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The backward's arrays for binding: the forward's inputs plus dy / attention_in / stats shaped as the
    forward's outputs (validation reads their shapes and dtypes only; the launch reads them per call)."""
    (o_shape, o_dtype), (s_shape, _), _ = fwd.outputs
    out = np.zeros(o_shape, o_dtype)
    stats = np.zeros(s_shape, np.float32)
    return dict(a, dy=out, attention_in=out, softmax_max=stats, softmax_sum=stats)


def _bind(a: dict[str, np.ndarray], scalar_key: tuple, scalars: Callable[[], dict[str, Any]]):
    fwd = api.prepared("fwd", a, scalar_key, scalars)
    if fwd is None or fwd.launch is None or getattr(fwd.launch, "function", None) is None:
        return None
    bwd = api.prepared("bwd", _placeholders(fwd.launch, a), scalar_key, scalars)
    if bwd is None or bwd.launch is None or getattr(bwd.launch, "function", None) is None:
        return None
    ids = _register_pair(fwd.launch, bwd.launch)
    return None if ids is None else (*ids, bwd.launch.dpse_shape is not None)


def attention(query: Tensor, key: Tensor, value: Tensor, pse: Optional[Tensor], atten_mask: Optional[Tensor],
              drop_mask: Optional[Tensor], scalar_key: tuple, scalars: Callable[[], dict[str, Any]],
              poison: bool) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(attention_out, softmax_max, softmax_sum) through the extension, differentiable in query, key, value
    and pse; None where this call has no native path (the caller uses the Python one). Plain CPU tensors,
    eager mode only (the caller checks)."""
    key_ = (scalar_key, query.shape, query.dtype, key.shape, key.dtype, value.shape, value.dtype,
            None if pse is None else (pse.shape, pse.dtype),
            None if atten_mask is None else (atten_mask.shape, atten_mask.dtype, atten_mask.data_ptr()),
            None if drop_mask is None else (drop_mask.shape, drop_mask.dtype))
    ids = _BOUND.get(key_, False)
    if ids is False:
        if not _load():
            return None
        from .torch_launch import numpy_arrays  # noqa: PLC0415

        a = numpy_arrays(dict(query=query, key=key, value=value, pse_shift=pse, atten_mask=atten_mask,
                              drop_mask=drop_mask))
        ids = _BOUND.put(key_, _bind(a, scalar_key, scalars))
    if ids is None:
        return None
    fwd, bwd, has_dpse = ids
    pse_grad = has_dpse and pse.requires_grad
    return torch.ops.fag_tvm_native.attention(query, key, value, pse, atten_mask, drop_mask, fwd, bwd, pse_grad,
                                              poison)
