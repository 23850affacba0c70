"""Running the CUDA target's kernels on the CPU: TVM's OpenCL rendering of the same TIR (same grid, block and
shared memory), executed by POCL through pyopencl (TVM_NOTES §4b). This module owns the source fix-ups POCL
needs and the program/kernel plumbing; it imports no TVM.

Fix-ups: `atomicAdd(float*, float)` (CUDA's builtin, called by the kernels through T.call_extern) becomes a
compare-and-swap loop; without cl_khr_fp16 (POCL has none) fp16 storage goes through vload_half /
vstore_half_rte and fp16 roundings through a helper, arithmetic stays fp32 (what the kernels do anyway).

What it cannot see (said in the README too): POCL runs a work-group's items in a fixed order with implicit
barriers around uniform loops, so most missing-barrier races and every warp-level effect are invisible;
there is no timing. The GPU check on a real device covers those."""
from __future__ import annotations

import os
import re
import threading
from typing import Any

import numpy as np

ATOMIC_ADD = r"""
inline float atomicAdd(volatile __global float* p, float v) {
  union { unsigned int u; float f; } old, nxt;
  do { old.f = *p; nxt.f = old.f + v; }
  while (atomic_cmpxchg((volatile __global unsigned int*)p, old.u, nxt.u) != old.u);
  return old.f;
}
"""
ROUND_HALF = r"""
inline float __fag_round_half(float x) {
  ushort u; vstore_half_rte(x, 0, (__private half*)&u); return vload_half(0, (__private half*)&u);
}
"""
_SIG = re.compile(r"__kernel void (\w+)\(([^)]*)\)\s*\{")


def _match_bracket(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "[":
            depth += 1
        elif s[j] == "]":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError("unbalanced brackets in OpenCL source")


def _emulate_half(src: str) -> str:
    """fp16 without cl_khr_fp16: global half via vload_half / vstore_half_rte, other half values as float
    rounded through __fag_round_half (scalar code only)."""
    if re.search(r"\bhalf\d+\b", src):
        raise NotImplementedError("vector half types in the OpenCL source")
    src = re.sub(r"#ifdef cl_khr_fp16.*?#endif\n", "", src, flags=re.S)
    for name in sorted(set(re.findall(r"__global half\*\s*(?:restrict\s+)?(\w+)", src))):
        out, i = [], 0
        pat = re.compile(r"\b" + name + r"\[")
        while True:
            m = pat.search(src, i)
            if not m:
                out.append(src[i:])
                break
            lb = m.end() - 1
            rb = _match_bracket(src, lb)
            idx = src[lb + 1:rb]
            store = re.match(r"\s*=(?!=)", src[rb + 1:])
            if store:
                semi = src.index(";", rb)
                expr = src[rb + 1 + store.end():semi]
                out.append(src[i:m.start()] + f"vstore_half_rte((float)({expr}), {idx}, {name})")
                i = semi
            else:
                out.append(src[i:m.start()] + f"vload_half({idx}, {name})")
                i = rb + 1
        src = "".join(out)
    pieces = re.split(r"(__kernel void \w+\([^)]*\)\s*[;{])", src)
    for n in range(2, len(pieces), 2):  # bodies only: the signatures keep their __global half* parameters
        body = re.sub(r"\(half\)\s*\(", "__fag_round_half(", pieces[n])
        pieces[n] = re.sub(r"\bhalf\b", "float", body).replace("convert_half(", "__fag_round_half(")
    return "".join(pieces)


_LITERAL = re.compile(r"(?<![\w.])(\d\.\d{6}e[+-]\d\d)f")


def exact_literals(src: str, constants: list[float]) -> str:
    """TVM's OpenCL codegen prints float32 constants with 7 significant digits (%.6e), which is not exact
    (FLT_MAX prints as 3.402823e+38f, below FLT_MAX; the exp polynomial's coefficients move by ulps); its CUDA
    codegen prints exact hex floats. Every printed literal is mapped back to the kernel's own constant with
    that rendering (`constants`: the float32 immediates of the TIR) and written as an exact hex float.
    A literal matching no constant raises (a silent ulp change is not acceptable)."""
    table: dict[str, str] = {}
    for c in constants:
        c32 = float(np.float32(c))
        key = f"{abs(c32):.6e}"
        exact = float(np.float32(abs(c32))).hex()
        if table.get(key, exact) != exact:
            raise ValueError(f"two float32 constants print as {key}")
        table[key] = exact

    def sub(m: re.Match) -> str:
        v = m.group(1)
        if v not in table:
            if float(v) == float(np.float32(float(v))) and f"{float(np.float32(float(v))):.6e}" == v \
                    and float(v).is_integer():
                return m.group(0)  # an exactly representable integer value prints exactly
            raise ValueError(f"OpenCL literal {v}f matches no float32 constant of the kernel")
        return f"{table[v]}f"

    return _LITERAL.sub(sub, src)


def prepare_source(src: str) -> str:
    """The OpenCL C that POCL builds: helpers prepended before the first kernel, fp16 emulated if used."""
    if re.search(r"\bhalf\b", src):
        src = _emulate_half(src)
    k = src.index("__kernel")
    return src[:k] + ATOMIC_ADD + ROUND_HALF + src[k:]


def kernel_params(src: str) -> dict[str, list[str]]:
    """{kernel name: parameter names} (TVM names buffer parameters <buffer>_ptr and orders them by name)."""
    out = {}
    for m in _SIG.finditer(src):
        names = [re.search(r"(\w+)$", p.strip()).group(1) for p in m.group(2).split(",") if p.strip()]
        out[m.group(1)] = [n[:-4] if n.endswith("_ptr") else n for n in names]
    return out


_CTX: dict[str, Any] = {}
_LOCK = threading.Lock()


def platform_info() -> tuple[bool, str]:
    """(an OpenCL CPU device is usable, what it is / why not)."""
    try:
        ctx = _context()
    except Exception as e:  # noqa: BLE001 - missing pyopencl, no platform, ...
        return False, f"no OpenCL device for the simulation ({type(e).__name__}: {e}); pip install pyopencl " \
            f"pocl-binary-distribution"
    dev = ctx["device"]
    return True, f"{dev.platform.name} {dev.platform.version.split()[1] if ' ' in dev.platform.version else ''}".strip()


def _context() -> dict:
    with _LOCK:
        if not _CTX:
            # Work-groups run one at a time. With POCL's default (one pthread per core), one configuration (the
            # dK/dV kernel walking the batches, 1NSS dpse) gave wrong dV rows in about half the runs and never
            # with one thread: inter-work-group interference nobody could attribute to a kernel race (no global
            # memory is shared between those CTAs). Open until racecheck runs on a GPU; sequential is also what
            # the probe recommended (TVM_NOTES §4b) and keeps pytest-xdist workers from oversubscribing.
            os.environ.setdefault("POCL_MAX_PTHREAD_COUNT", "1")
            import pyopencl as cl  # noqa: PLC0415

            plats = [p for p in cl.get_platforms() if "Portable Computing Language" in p.name] or cl.get_platforms()
            dev = plats[0].get_devices()[0]
            ctx = cl.Context([dev])
            _CTX.update(cl=cl, device=dev, ctx=ctx, queue=cl.CommandQueue(ctx))
        return _CTX


class Program:
    """A built OpenCL program of one library: its kernels by name, launched with CUDA-style grids."""

    def __init__(self, source: str) -> None:
        self.source = prepare_source(source)
        self.params = kernel_params(self.source)
        self._built = None
        self._lock = threading.Lock()

    def _program(self):
        with self._lock:
            if self._built is None:
                c = _context()
                self._built = c["cl"].Program(c["ctx"], self.source).build()
            return self._built

    def run(self, launches: list[tuple[str, tuple[int, int], int, dict[str, Any]]], arrays: dict[str, np.ndarray],
            outputs: tuple[str, ...]) -> None:
        """Copy `arrays` in, run `launches` in order [(kernel, (grid_x, grid_y), threads, scalars)], copy the
        arrays named in `outputs` back into their NumPy arrays."""
        c = _context()
        cl, ctx, queue = c["cl"], c["ctx"], c["queue"]
        prg = self._program()
        mf = cl.mem_flags
        with _LOCK:  # one queue per process
            bufs = {}
            for name, a in arrays.items():  # explicit blocking copies: COPY_HOST_PTR may be deferred by POCL
                host = np.ascontiguousarray(a if a.size else np.zeros(1, a.dtype))
                bufs[name] = cl.Buffer(ctx, mf.READ_WRITE, host.nbytes)
                cl.enqueue_copy(queue, bufs[name], host, is_blocking=True)
            for kname, (gx, gy), threads, scalars in launches:
                if gx <= 0 or gy <= 0:
                    continue
                args = []
                for p in self.params[kname]:
                    if p in scalars:
                        args.append(np.int32(scalars[p]))
                    else:
                        args.append(bufs[p])
                cl.Kernel(prg, kname)(queue, (gx * threads, gy), (threads, 1), *args)
            for name in outputs:
                a = arrays[name]
                if a.size:
                    cl.enqueue_copy(queue, a, bufs[name])
            queue.finish()
