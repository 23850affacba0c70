"""Task identity: what one tuning run measures, and the meta-schedule workload that carries it.

The kernels are hand-written TIR generated from Python with the knobs as closure constants, so
schedule primitives cannot retile them; meta-schedule searches the knobs instead, on a one-block stub
PrimFunc whose function attribute holds the task identity as JSON (target, direction, kernel spec,
workload shape, hardware, machine, kernel source hash, TVM versions). meta-schedule keys records by the
structural hash of that module, so records are per (target, spec, workload, source, TVM, hardware)."""
from __future__ import annotations

from dataclasses import asdict

from .. import _tvm
from ..version import __version__
from ..core.spec import KernelSpec
from ..targets.base import Target
from ..workloads import canonical_workload, configs

FORMAT = "fag_tvm-tuning/2"
BLOCK = "fag_kernel"
TASK_ATTR = "fag_tvm.task"
ANN = "fag_tvm.knob."
ENTRY = "fag_tvm_tune_entry"


def current_meta(target: Target, hw: dict | None = None) -> dict:
    """What a record must match to apply here (source hash, TVM, hardware, machine)."""
    return {"fag_tvm_version": __version__, "tvm_version": _tvm.tvm_version(),
            "tvm_ffi_version": _tvm.tvm_ffi_version(), "hw": dict(hw or target.hw()),
            "machine": target.machine(), "source_hash": target.source_hash()}


def task_spec(target: Target, w: dict, direction: str = "bwd") -> KernelSpec:
    from ..core.abi import kernel_spec

    fcfg, bcfg = configs(w)
    return kernel_spec(bcfg if direction == "bwd" else fcfg, direction)


def make_task(target: Target, w: dict, direction: str = "bwd", hw: dict | None = None) -> dict:
    """The identity of one tuning task (JSON-serialisable; stored in the workload stub)."""
    spec = task_spec(target, w, direction)
    meta = current_meta(target, hw)
    meta.pop("fag_tvm_version")  # informational only (best.json records the writer's version)
    return {"format": FORMAT, "target": target.name, "direction": direction, "spec": asdict(spec),
            "family": spec.key(target.name), "workload": canonical_workload(w), **meta}


def spec_of(task: dict) -> KernelSpec:
    return KernelSpec(**task["spec"])


def stub_mod(task: dict):
    """The meta-schedule workload: a one-sblock PrimFunc whose attrs identify the task (needs TVM)."""
    import json

    tvm = _tvm.import_tvm()
    from tvm import te

    a = te.placeholder((1,), "float32", name="A")
    b = te.compute((1,), lambda i: a[i], name=BLOCK)
    func = te.create_prim_func([a, b]).with_attr(TASK_ATTR, json.dumps(task, sort_keys=True))
    return tvm.IRModule({"main": func})


def task_of_mod(mod) -> dict | None:
    """The task identity of a (scheduled) stub module, or None if it is not one."""
    import json

    try:
        func = mod["main"]
        s = func.attrs[TASK_ATTR] if func.attrs is not None and TASK_ATTR in func.attrs else None
    except Exception:  # noqa: BLE001 - any non-stub module
        return None
    return json.loads(str(s)) if s is not None else None


def structural_hash(mod) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))
