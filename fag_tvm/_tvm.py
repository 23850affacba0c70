"""The one compat module that touches TVM (DESIGN: "all TVM imports behind one compat module").

Everything here imports tvm / tvm_ffi lazily, inside functions, so `import fag_tvm` never loads the
260 MB compiler library. Loading an already-compiled kernel (disk cache, AOT package) needs only
tvm_ffi + libtvm_runtime.so (`load_module`).

Facts this relies on (TVM_NOTES.md): targets are dicts with an explicit `mcpu` (never "native": it
silently gives generic x86-64 code); kernels assume 64-byte aligned buffers and segfault otherwise;
TVM's thread pool uses hardware_concurrency/2 threads on x86 unless TVM_NUM_THREADS is set; a module
loaded through tvm_ffi alone segfaults unless libtvm_runtime.so was loaded first with RTLD_GLOBAL.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import numpy as np

ALIGN = 64


# ------------------------------------------------------------------------------------------------
# imports / versions


def import_tvm():
    """`import tvm` (the compiler), with the thread count configured first."""
    set_num_threads()
    import tvm  # noqa: PLC0415

    return tvm


def tirx_script():
    """(tvm.tirx, tvm.script.tirx) for the kernel generators: the TIR IR module and TVMScript's `T`."""
    import_tvm()
    from tvm import tirx  # noqa: PLC0415
    from tvm.script import tirx as T  # noqa: PLC0415, N812

    return tirx, T


def import_tvm_ffi():
    import tvm_ffi  # noqa: PLC0415

    return tvm_ffi


@functools.lru_cache(maxsize=None)
def tvm_version() -> str:
    """Version of the installed apache-tvm, read without importing the compiler."""
    try:
        from importlib.metadata import version

        return version("apache-tvm")
    except Exception:  # noqa: BLE001 - source builds have no metadata
        return import_tvm().__version__


@functools.lru_cache(maxsize=None)
def tvm_ffi_version() -> str:
    try:
        from importlib.metadata import version

        return version("apache-tvm-ffi")
    except Exception:  # noqa: BLE001
        return getattr(import_tvm_ffi(), "__version__", "unknown")


# ------------------------------------------------------------------------------------------------
# threads


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int | None = None) -> int:
    """Set TVM_NUM_THREADS (to all usable cores unless the user already chose) before the runtime's thread
    pool starts. With an explicit n the variable is overwritten (effective only before the pool exists)."""
    if n is not None:
        os.environ["TVM_NUM_THREADS"] = str(int(n))
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(cpu_count()))
    return int(os.environ["TVM_NUM_THREADS"])


def num_threads() -> int:
    """Threads TVM's pool will use (TVM_NUM_THREADS, which fag_tvm sets to all usable cores)."""
    return set_num_threads()


# ------------------------------------------------------------------------------------------------
# CPU target


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    flags: set[str] = set()
    vendor = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    if vendor:
        flags.add("vendor:" + vendor)
    return frozenset(flags)


@functools.lru_cache(maxsize=None)
def cpu_target() -> dict:
    """The LLVM target dict for this machine, always with an explicit mcpu (never "native").

    AVX-512 with bf16 on AMD -> znver4 (Zen 4/5); other AVX-512 -> sapphirerapids / icelake-server /
    skylake-avx512 by feature level; AVX2+FMA -> haswell; else x86-64 (generic; slow, but correct).
    FAG_TVM_MCPU overrides the choice."""
    f = cpu_flags()
    amd = "vendor:AuthenticAMD" in f
    mcpu = os.environ.get("FAG_TVM_MCPU")
    if not mcpu:
        if "avx512f" in f:
            if amd and "avx512_bf16" in f:
                mcpu = "znver4"
            elif "amx_tile" in f or "avx512_fp16" in f:
                mcpu = "sapphirerapids"
            elif "avx512_vbmi2" in f:
                mcpu = "icelake-server"
            else:
                mcpu = "skylake-avx512"
        elif "avx2" in f and "fma" in f:
            mcpu = "znver2" if amd else "haswell"
        else:
            mcpu = "x86-64"
    return {"kind": "llvm", "mcpu": mcpu, "num-cores": cpu_count()}


def vector_lanes(target: dict | None = None) -> int:
    """fp32 lanes of one vector register of the target (16 for AVX-512, 8 for AVX2, 4 otherwise)."""
    t = target or cpu_target()
    mcpu = t.get("mcpu", "")
    if mcpu in ("znver4", "znver5", "sapphirerapids", "icelake-server", "skylake-avx512", "x86-64-v4",
                "cascadelake", "cooperlake", "tigerlake", "icelake-client", "graniterapids"):
        return 16
    if mcpu in ("haswell", "broadwell", "skylake", "znver1", "znver2", "znver3", "x86-64-v3", "alderlake"):
        return 8
    return 4


def target_name(target: dict | None = None) -> str:
    t = target or cpu_target()
    return f"{t['kind']}-{t.get('mcpu', 'generic')}"


def make_target(target: dict | None = None):
    tvm = import_tvm()
    return tvm.target.Target(target or cpu_target())


# ------------------------------------------------------------------------------------------------
# aligned NumPy buffers


def is_aligned(a: np.ndarray) -> bool:
    return a.ctypes.data % ALIGN == 0


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is 64-byte aligned."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = max(1, n) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, dtype=np.uint8)
    off = (-buf.ctypes.data) % ALIGN
    return buf[off:off + n * dtype.itemsize].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype) -> np.ndarray:
    a = aligned_empty(shape, dtype)
    a[...] = 0
    return a


def ensure_aligned(arr: np.ndarray) -> np.ndarray:
    """`arr` itself if C-contiguous and 64-byte aligned, else an aligned contiguous copy."""
    arr = np.asarray(arr)
    if arr.flags.c_contiguous and is_aligned(arr):
        return arr
    out = aligned_empty(arr.shape, arr.dtype)
    out[...] = arr
    return out


def kernel_view(arr: np.ndarray) -> np.ndarray:
    """The array as the kernel sees it: bool -> uint8, bfloat16 -> uint16 (kernels store bf16 as raw bits;
    DLPack cannot export ml_dtypes bf16), always 1-D. No copy (the caller made it aligned+contiguous)."""
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    elif arr.dtype.kind == "V" or arr.dtype.name == "bfloat16":
        arr = arr.view(np.uint16)
    return arr.reshape(-1)


def check_kernel_arg(arr: Any, index: int) -> None:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"argument #{index}: expected a numpy array, got {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"argument #{index}: not C-contiguous")
    if arr.size and not is_aligned(arr):
        raise ValueError(f"argument #{index}: data pointer not {ALIGN}-byte aligned (use ensure_aligned)")


# ------------------------------------------------------------------------------------------------
# runtime loading (no compiler needed)


@functools.lru_cache(maxsize=None)
def runtime_library_path() -> str:
    """Path of libtvm_runtime.so shipped with the tvm wheel (found without importing tvm)."""
    import importlib.util

    cands = []
    env = os.environ.get("FAG_TVM_RUNTIME_LIB")
    if env:
        cands.append(env)
    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append(os.path.join(loc, "lib", "libtvm_runtime.so"))
            cands.append(os.path.join(loc, "libtvm_runtime.so"))
    for c in cands:
        if os.path.exists(c):
            return os.path.abspath(c)
    raise FileNotFoundError("libtvm_runtime.so not found (set FAG_TVM_RUNTIME_LIB)")


_RUNTIME_HANDLE = None


def _runtime_already_mapped() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libtvm_runtime.so" in f.read()
    except OSError:  # pragma: no cover - non-Linux
        return "tvm" in __import__("sys").modules


def load_runtime(path: str | None = None) -> None:
    """dlopen libtvm_runtime.so with RTLD_GLOBAL (once). Needed before tvm_ffi.load_module of a kernel."""
    global _RUNTIME_HANDLE
    if _RUNTIME_HANDLE is None and _runtime_already_mapped():
        _RUNTIME_HANDLE = "already-loaded"  # e.g. by `import tvm`: a second copy would register twice (abort)
    if _RUNTIME_HANDLE is None:
        set_num_threads()
        # libtvm_runtime.so needs libtvm_ffi.so (DT_NEEDED, not on the loader path): importing tvm_ffi
        # loads it first, so the dependency resolves by soname.
        import_tvm_ffi()
        _RUNTIME_HANDLE = ctypes.CDLL(path or runtime_library_path(), mode=ctypes.RTLD_GLOBAL)


def load_module(path: str):
    """Load a compiled kernel library with tvm_ffi only (the TVM compiler is not imported)."""
    load_runtime()
    tvm_ffi = import_tvm_ffi()
    return tvm_ffi.load_module(os.path.abspath(path))
