"""The LLVM target's hardware description: this CPU as an explicit TVM target dict (never
mcpu="native", which TVM silently turns into generic x86-64 code; TVM_NOTES §5), its vector width and
the CPU flags a compiled kernel needs. TVM-free (reads /proc/cpuinfo and sysfs).

FAG_TVM_MCPU overrides the detected CPU model; it must be one of KNOWN_MCPUS (an unknown name would
make LLVM fall back to generic code without an error)."""
from __future__ import annotations

import functools
import os

from ..._tvm import cpu_count
from ...errors import invalid

AVX512_MCPUS = ("znver4", "znver5", "sapphirerapids", "icelake-server", "skylake-avx512", "x86-64-v4",
                "cascadelake", "cooperlake", "tigerlake", "icelake-client", "graniterapids")
AVX2_MCPUS = ("haswell", "broadwell", "skylake", "znver1", "znver2", "znver3", "x86-64-v3", "alderlake")
GENERIC_MCPUS = ("x86-64", "x86-64-v2")
KNOWN_MCPUS = AVX512_MCPUS + AVX2_MCPUS + GENERIC_MCPUS


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """/proc/cpuinfo flags of this CPU (plus "vendor:<id>")."""
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
def cpu_model() -> str:
    """The CPU's marketing name (tuning records are measured on one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    import platform

    return platform.processor() or platform.machine()


def detect_mcpu(flags: frozenset[str] | None = None) -> str:
    """AVX-512 with bf16 on AMD -> znver4 (Zen 4/5); other AVX-512 -> sapphirerapids / icelake-server /
    skylake-avx512 by feature level; AVX2+FMA -> znver2 (AMD) / haswell; else x86-64 (slow but correct)."""
    f = cpu_flags() if flags is None else flags
    amd = "vendor:AuthenticAMD" in f
    if "avx512f" in f:
        if amd and "avx512_bf16" in f:
            return "znver4"
        if "amx_tile" in f or "avx512_fp16" in f:
            return "sapphirerapids"
        if "avx512_vbmi2" in f:
            return "icelake-server"
        return "skylake-avx512"
    if "avx2" in f and "fma" in f:
        return "znver2" if amd else "haswell"
    return "x86-64"


def cpu_target() -> dict:
    """The LLVM target dict for this machine, always with an explicit, known mcpu."""
    mcpu = os.environ.get("FAG_TVM_MCPU") or detect_mcpu()
    if mcpu not in KNOWN_MCPUS:
        raise invalid("FAG_TVM_MCPU", f"unknown CPU model {mcpu!r} (LLVM would silently build generic code); "
                      f"one of {', '.join(KNOWN_MCPUS)}")
    return {"kind": "llvm", "mcpu": mcpu, "num-cores": cpu_count()}


def vector_lanes(target: dict | None = None) -> int:
    """fp32 lanes of one vector register of the target (16 for AVX-512, 8 for AVX2, 4 otherwise)."""
    mcpu = (target or cpu_target()).get("mcpu", "")
    if mcpu in AVX512_MCPUS:
        return 16
    if mcpu in AVX2_MCPUS:
        return 8
    return 4


def required_flags(target: dict) -> list[str]:
    """CPU flags a machine needs to run code built for `target` (checked when a package is loaded)."""
    lanes = vector_lanes(target)
    return ["avx512f"] if lanes == 16 else ["avx2", "fma"] if lanes == 8 else []


def hw_tag(target: dict) -> str:
    """Short name of a CPU target for file names and records, e.g. 'znver4'."""
    return str(target.get("mcpu", "generic"))


@functools.lru_cache(maxsize=None)
def l2_bytes() -> int:
    """Per-core L2 size (bytes), from sysfs; 1 MiB if unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            p = os.path.join(base, idx)
            with open(os.path.join(p, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(p, "size")) as f:
                s = f.read().strip().upper()
            mult = 1024 * 1024 if s.endswith("M") else 1024 if s.endswith("K") else 1
            return int(s.rstrip("KMB")) * mult
    except (OSError, ValueError):
        pass
    return 1024 * 1024
