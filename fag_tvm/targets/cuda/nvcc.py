"""CUDA source of the backward's phases and nvcc's verdict on it, without a GPU: TVM renders the same TIR
for sm_80 / sm_90 (dynamic shared memory: tiles over 48 KiB need the opt-in), nvcc compiles it to a cubin and
`ptxas -v` reports registers, shared memory and spills per kernel. CI gates on zero spills and shared memory
within the architecture's limit (schedules/cuda.ARCHS)."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ... import _tvm

_FUNC = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def cuda_source(funcs: dict[str, Any], arch: str) -> str:
    """The CUDA C++ of `funcs` (PrimFuncs built with smem_scope="shared.dyn") for `arch`."""
    tvm = _tvm.import_tvm()
    with _tvm.manual_dyn_shared_sync():  # every barrier is placed by the kernels themselves
        ex = tvm.compile(tvm.IRModule(dict(funcs)), target=tvm.target.Target({"kind": "cuda", "arch": arch},
                                                                             host="llvm"))
    return ex.mod.imports[0].inspect_source()


def ptxas_resources(source: str, arch: str, timeout: float = 300.0) -> dict[str, dict]:
    """{kernel: {"registers", "smem_static", "spill_stores", "spill_loads", "stack"}} from `nvcc -cubin -Xptxas -v`
    (RuntimeError with nvcc's output if it fails)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / "k.cu"
        cu.write_text(source)
        r = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-O3", "-Xptxas", "-v", "-diag-suppress", "177",
                            str(cu), "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True, timeout=timeout)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch}:\n{log[-4000:]}")
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": 0, "smem_static": 0, "spill_stores": 0, "spill_loads": 0,
                                              "stack": 0})
            continue
        if cur is None:
            continue
        if (m := _USED.search(line)):
            cur["registers"] = int(m.group(1))
            if (s := _SMEM.search(line)):
                cur["smem_static"] = int(s.group(1))
        if (m := _SPILL.search(line)):
            cur["spill_stores"], cur["spill_loads"] = int(m.group(1)), int(m.group(2))
        if (m := _STACK.search(line)):
            cur["stack"] = int(m.group(1))
    return out
