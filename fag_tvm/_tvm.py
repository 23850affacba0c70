"""The one compat module that touches TVM (DESIGN: "all TVM imports behind one compat module").

Everything here imports tvm / tvm_ffi lazily, inside functions, so `import fag_tvm` never loads the
260 MB compiler library. Loading an already-compiled kernel (disk cache, AOT package) needs only
tvm_ffi + libtvm_runtime.so (`load_module`).

Facts this relies on (TVM_NOTES.md): TVM's thread pool uses hardware_concurrency/2 threads on x86
unless TVM_NUM_THREADS is set; a module loaded through tvm_ffi alone segfaults unless libtvm_runtime.so
was loaded first with RTLD_GLOBAL. (Target descriptions live with each target, e.g. the explicit CPU
model in fag_tvm.targets.llvm.hw; aligned buffers in fag_tvm.core.buffers.)
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading



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

    _fast_macro_parser_lookup()
    return tirx, T


@functools.lru_cache(maxsize=None)
def _fast_macro_parser_lookup() -> None:
    """TVM 0.27's ScriptMacro finds the active parser with inspect.getouterframes(), which reads the source
    lines of every frame on the stack (inspect.getmodule scans sys.modules per frame): with torch imported
    that was ~85% of generating a kernel (4 s of 5). The same search over f_back without source lookup:
    identical result, ~20x faster generation."""
    import inspect  # noqa: PLC0415

    from tvm.script.parser.core.parser import ScriptMacro  # noqa: PLC0415

    def _find_parser_def(self):
        frame = inspect.currentframe()
        while frame is not None:
            parser = frame.f_globals.get(ScriptMacro.parser_object_name)
            if parser is not None:
                return parser
            frame = frame.f_back
        raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")

    ScriptMacro._find_parser_def = _find_parser_def


def import_tvm_ffi():
    import tvm_ffi  # noqa: PLC0415

    return tvm_ffi


def ffi_build_paths() -> tuple[list[str], str]:
    """(include folders, folder of libtvm_ffi.so) for C++ code that calls tvm-ffi functions through its C API
    (fag_tvm.torch_native)."""
    import tvm_ffi.libinfo as info  # noqa: PLC0415

    inc = info.find_include_path()
    includes = [inc] if isinstance(inc, str) else list(inc)
    includes.append(info.find_dlpack_include_path())
    return list(dict.fromkeys(includes)), os.path.dirname(info.find_libtvm_ffi())


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


_SYNC_LOCK = threading.Lock()


@contextlib.contextmanager
def manual_dyn_shared_sync():
    """Compile with TVM's automatic barrier insertion off for `shared.dyn` (kernels that place every barrier
    themselves). TVM 0.27's ThreadSync treats all dynamic shared buffers as one (they are merged later), so it
    sees hazards between distinct tiles and fails with "Cannot insert syncs inside condition" on per-element
    conditionals; static `shared` keeps its planner."""
    tvm = import_tvm()
    from tvm import s_tir  # noqa: PLC0415

    orig = s_tir.transform.ThreadSync

    def thread_sync(scope):
        return tvm.transform.Sequential([]) if scope == "shared.dyn" else orig(scope)

    with _SYNC_LOCK:
        s_tir.transform.ThreadSync = thread_sync
        try:
            yield
        finally:
            s_tir.transform.ThreadSync = orig
