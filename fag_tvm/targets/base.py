"""The Target contract: what a target plug-in supplies so that the public API, the JIT cache, AOT
packages, the runtime loader, the tuner and the command line work for it without knowing it.

A target is a set of files beside the others (fag_tvm/targets/<name>/ + schedules/<name>.py), registered
by name in fag_tvm.targets. Everything here is TVM-free; methods that build code import TVM themselves.

    hw()                 hardware description (JSON-able dict; part of every cache key, record, package)
    source_files()       its kernel generators + schedule; the per-target source hash adds the shared ABI
                         and math (fag_tvm.core.hashing)
    schedule             the schedules/<name>.py module: Knobs dataclass, default_knobs, prune,
                         candidate_space, features
    phases(spec)         the kernel entries one specialisation needs (LLVM fuses everything: "main")
    make_funcs           TIR PrimFuncs of a specialisation (one per phase)
    compile / export     tvm.compile for this hardware; a shared library on disk
    load                 a library loaded with tvm-ffi only (deploy path: no compiler)
    forward_arrays /     the launcher: packs arguments and runs the phases on this target's arrays
    backward_arrays
    prepare              optional: a call signature's bound launch (flat buffers of any DLPack kind), what a
                         repeated call reuses (api.prepared, the torch op); None where the target has none
    workspace_bytes      scratch a backward call needs (fag_tvm.aclnn's GetWorkspaceSize)
    measurement_args /   tuning: arguments of a workload, and the meta-schedule runner (local, RPC,
    make_runner          or a model)
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.buffers import check_kernel_arg, kernel_view
from ..core.hashing import source_hash
from ..core.spec import KernelSpec

MAIN = "main"


@dataclasses.dataclass
class Kernel:
    """A compiled specialisation: one callable per phase, called with ABI-ordered arrays."""

    target: str
    spec: KernelSpec
    knobs: Any
    name: str
    functions: dict[str, Callable]  # phase -> packed function
    params: dict[str, list[str]]  # phase -> ABI argument names
    path: str | None = None  # library it was loaded from (None: built in memory)
    compile_s: float | None = None

    @property
    def key(self) -> str:
        return self.name

    @property
    def param_names(self) -> list[str]:
        return self.params[MAIN]

    def run(self, phase: str, *arrays: Any) -> None:
        """Call one phase with NumPy arrays (64-byte aligned, C-contiguous; checked, never trusted)."""
        names = self.params[phase]
        if len(arrays) != len(names):
            raise TypeError(f"{self.name}[{phase}]: expected {len(names)} arguments ({', '.join(names)}), "
                            f"got {len(arrays)}")
        args = []
        for i, a in enumerate(arrays):
            check_kernel_arg(a, i)
            args.append(kernel_view(a))
        self.functions[phase](*args)

    def __call__(self, *arrays: Any) -> None:
        self.run(MAIN, *arrays)

    def __repr__(self) -> str:
        return f"Kernel({self.name})"


KernelProvider = Callable[[KernelSpec], Kernel]


class Target:
    """Base class of target plug-ins (see the module docstring for the contract)."""

    name: str = ""
    description: str = ""
    compiled: bool = True  # False: runs NumPy code, no kernels (the reference)
    library_suffix: str = ".so"
    device_type: str = "cpu"  # where a tuning runner executes the target's libraries
    timing: str = "measured"  # "model": predict()'s time, never its CPU run's clock; "none": no time at all (cuda-sim)
    simulated: bool = False  # its kernels run in a CPU simulation of other hardware (slow: tests take a share)

    # ---- availability and hardware -------------------------------------------------------------
    def availability(self) -> tuple[bool, str]:
        """(usable on this machine, why / why not), e.g. (False, "nvcc 13.0 found, no GPU")."""
        return True, "ok"

    def hw(self) -> dict:
        """This machine's hardware description for the target (explicit: never 'native')."""
        return {}

    def hw_tag(self, hw: dict) -> str:
        """Short name of a hardware description, for file and kernel names."""
        return "any"

    def hw_mismatch(self, recorded: dict, current: dict) -> list[str]:
        """Why code or records made for `recorded` hardware do not apply to `current` ([] if they do)."""
        return [] if recorded == current else [f"built for {recorded}, this is {current}"]

    def machine(self) -> str:
        """The measuring machine's model (tuning records are measured on one), '' if irrelevant."""
        return ""

    def host_check(self, hw: dict) -> list[str]:
        """Why code built for `hw` cannot run on this machine ([] if it can)."""
        return []

    # ---- sources and schedule ------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        """The target's own kernel generators and schedule template."""
        return []

    def source_hash(self) -> str:
        return source_hash(self.source_files())

    @property
    def schedule(self) -> Any:
        """The schedules/<name>.py template module (None for targets without knobs)."""
        return None

    def default_knobs(self, spec: KernelSpec, hw: dict) -> Any:
        return None

    def prune(self, spec: KernelSpec, knobs: Any, hw: dict, strict_cache: bool = False) -> tuple[bool, str]:
        """(feasible, reason) of `knobs`, analytically, before anything is built. strict_cache adds the
        heuristic capacity budgets the tuner uses to stay in the useful part of the space."""
        return True, "ok"

    def candidate_space(self, spec: KernelSpec, hw: dict) -> dict[str, list[int]]:
        """Knob values the tuner explores (cartesian product, filtered by prune)."""
        raise NotImplementedError

    def features(self, spec: KernelSpec, workload: dict, knobs: Any, hw: dict) -> list[float]:
        """Cost-model features of one point (knob vector + analytic features)."""
        raise NotImplementedError

    @property
    def feature_names(self) -> list[str]:
        return []

    def tuning_values(self, spec: KernelSpec, hw: dict) -> dict[str, list] | None:
        """Per-knob values the tuner samples, where enumerating the whole space to keep only values of feasible
        points is too slow (None: the tuner enumerates `candidate_space` through `prune`)."""
        return None

    def report_section(self, entries: list[dict], out_dir: str) -> dict | None:
        """`fag-tvm report`'s target-specific part for these best.json entries (files under out_dir; a summary
        with "index" naming its page), or None."""
        return None

    def tvm_target(self, hw: dict) -> dict:
        """The TVM target description the tuner's builder is given (the code's host)."""
        return hw

    def knobs_from_tag(self, tag: str) -> Any:
        """Inverse of knobs.tag() (kernel names spell knobs out; packages are checked against them)."""
        raise NotImplementedError

    def knobs_from_dict(self, d: dict) -> Any:
        """Knobs from a JSON object (tuning records, manifests); FagError-free: raises ValueError."""
        cls = self.schedule.Knobs
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise ValueError(f"knobs must have exactly the fields {sorted(names)}, got {d!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in d.values()):
            raise ValueError(f"knob values must be integers, got {d!r}")
        return cls(**d)

    # ---- kernels -------------------------------------------------------------------------------
    def phases(self, spec: KernelSpec) -> tuple[str, ...]:
        return (MAIN,)

    def entry_name(self, spec: KernelSpec, knobs: Any, hw: dict, phase: str = MAIN) -> str:
        """The exported symbol of one phase: the kernel key (every specialisation spelled out) + the
        hardware tag (+ the phase when there are several)."""
        base = f"{spec.key(self.name, knobs)}_{self.hw_tag(hw)}"
        return base if phase == MAIN else f"{base}_{phase}"

    def param_names(self, spec: KernelSpec, phase: str = MAIN) -> list[str]:
        raise NotImplementedError

    def make_funcs(self, spec: KernelSpec, knobs: Any, hw: dict) -> dict[str, Any]:
        """{entry name: PrimFunc} of every phase of `spec` (needs TVM)."""
        raise NotImplementedError

    def compile(self, funcs: dict[str, Any], hw: dict) -> Any:
        """One executable holding every function of `funcs` (needs TVM)."""
        raise NotImplementedError

    def export(self, executable: Any, path: str) -> None:
        raise NotImplementedError

    def load(self, path: str) -> Any:
        """A compiled library loaded without the TVM compiler."""
        raise NotImplementedError

    def functions(self, module: Any, spec: KernelSpec, knobs: Any, hw: dict) -> dict[str, Callable]:
        """phase -> function of `spec` in a compiled or loaded module (KeyError if missing)."""
        out = {}
        for ph in self.phases(spec):
            name = self.entry_name(spec, knobs, hw, ph)
            try:
                out[ph] = module[name]
            except Exception as e:  # noqa: BLE001 - tvm-ffi raises AttributeError/RuntimeError by version
                raise KeyError(f"{name} not in the module ({e})") from None
        return out

    def kernel(self, module: Any, spec: KernelSpec, knobs: Any, hw: dict, path: str | None = None,
               compile_s: float | None = None) -> Kernel:
        return Kernel(self.name, spec, knobs, self.entry_name(spec, knobs, hw),
                      self.functions(module, spec, knobs, hw),
                      {ph: self.param_names(spec, ph) for ph in self.phases(spec)}, path, compile_s)

    def runtime_files(self) -> dict[str, str]:
        """Files a package must ship so that `load` works on a machine without TVM: {name: path}."""
        return {}

    def load_runtime(self, files: dict[str, str]) -> None:
        """Prepare the process to load this target's libraries with the packaged runtime files."""

    # ---- calls ---------------------------------------------------------------------------------
    def forward_arrays(self, cfg: Any, a: dict[str, Any], kernels: KernelProvider | None) -> dict[str, Any]:
        raise NotImplementedError

    def backward_arrays(self, cfg: Any, a: dict[str, Any], kernels: KernelProvider | None) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, cfg: Any, direction: str, a: dict[str, Any], kernels: KernelProvider | None) -> Any:
        """A bound launch of this call signature, or None (callers then use forward_/backward_arrays). Called
        with flat, C-contiguous, 64-byte aligned buffers named by its `input_names` and fresh outputs shaped by
        its `outputs` (see targets/llvm/launch.Launch); returns the fp32 dpse accumulator or None."""
        return None

    def workspace_bytes(self, cfg: Any) -> int:
        """Bytes of scratch a backward call of `cfg` uses (0 if none)."""
        return 0

    def predict(self, spec: KernelSpec, workload: dict, knobs: Any, hw: dict) -> dict | None:
        """A timing model's prediction of one point -- {"time_s", "tflops", "utilisation", "peak_tflops",
        "memory_gbytes_per_s", "binding", "stages": {stage: {"binding", "cycles", "pipes"}}} -- or None where time
        is measured (timing == "measured")."""
        return None

    # ---- tuning ----------------------------------------------------------------------------------
    def measurement_args(self, task: dict, seed: int = 0) -> list[np.ndarray]:
        """ABI arguments of a tuning task's workload, packed exactly as a real call packs them."""
        raise NotImplementedError

    def make_runner(self, task: dict, options: dict) -> Any:
        """A meta-schedule Runner measuring built candidates of `task` (local, RPC or a model)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<target {self.name}>"


def time_calls(fn: Callable[[], None], repeat: int = 5, number: int = 1) -> list[float]:
    """Wall-clock seconds of `repeat` timings (each the mean of `number` back-to-back calls) after a warm-up."""
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number)
    return out
