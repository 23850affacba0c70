"""A toy target plug-in, registered from tests without touching any other target's files.

Its "kernel" is a real TVM-compiled LLVM function (an element-wise scale y = x * alpha over a flat buffer)
used to finish every output of the float64 reference math: enough to drive the whole plug-in machinery
(registry, `target=`, JIT cache, packages + the compiler-free loader, info, source hashes)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from fag_tvm import _tvm
from fag_tvm.core.abi import kernel_spec
from fag_tvm.core.buffers import aligned_empty, ensure_aligned
from fag_tvm.targets import Target
from fag_tvm.targets import reference as ref_math
from fag_tvm.targets.llvm import hw as cpu


@dataclass(frozen=True)
class ToyKnobs:
    unroll: int = 4

    def tag(self) -> str:
        return f"u{self.unroll}"


class ToyTarget(Target):
    name = "toy"
    description = "test plug-in: reference math finished by a compiled scale kernel"

    def hw(self) -> dict:
        return {"kind": "llvm", "mcpu": cpu.detect_mcpu(), "num-cores": 1}

    def hw_tag(self, hw: dict) -> str:
        return f"toy{hw['mcpu']}"

    def host_check(self, hw: dict) -> list[str]:
        return [] if hw.get("mcpu") == cpu.detect_mcpu() else ["other CPU"]

    @property
    def schedule(self) -> Any:
        return SimpleNamespace(Knobs=ToyKnobs)

    def source_files(self) -> list[Path]:
        return [Path(__file__)]

    def default_knobs(self, spec, hw):
        return ToyKnobs()

    def param_names(self, spec, phase="main") -> list[str]:
        return ["x", "alpha", "y"]

    def make_funcs(self, spec, knobs, hw) -> dict:
        tirx, T = _tvm.tirx_script()
        name = self.entry_name(spec, knobs, hw)
        U = knobs.unroll

        @T.prim_func
        def scale(x_h: T.handle, alpha: T.Buffer((1,), "float32"), y_h: T.handle):
            n = T.int64()
            x = T.match_buffer(x_h, (n,), "float32")
            y = T.match_buffer(y_h, (n,), "float32")
            for i in range(n):
                y[i] = x[i] * alpha[0]

        return {name: scale.with_attr("global_symbol", name)}

    def compile(self, funcs, hw):
        tvm = _tvm.import_tvm()
        return tvm.compile(tvm.IRModule(dict(funcs)), target=tvm.target.Target(dict(hw)))

    def export(self, executable, path):
        executable.export_library(path)

    def load(self, path):
        return _tvm.load_module(path)

    def runtime_files(self) -> dict:
        return {"libtvm_runtime.so": _tvm.runtime_library_path()}

    def load_runtime(self, files):
        _tvm.load_runtime(files.get("libtvm_runtime.so"))

    def _finish(self, kernel, arr: np.ndarray, cast) -> np.ndarray:
        x = ensure_aligned(np.asarray(arr, np.float32).reshape(-1))
        y = aligned_empty(x.shape, np.float32)
        kernel(x, ensure_aligned(np.ones(1, np.float32)), y)
        return y.reshape(np.shape(arr)).astype(cast)

    def forward_arrays(self, cfg, a, kernels):
        k = kernels(kernel_spec(cfg, "fwd"))
        f = ref_math.forward_arrays(cfg, a)
        f["attention_out"] = self._finish(k, f["attention_out"], f["attention_out"].dtype)
        return f

    def backward_arrays(self, cfg, a, kernels):
        k = kernels(kernel_spec(cfg, "bwd"))
        g = ref_math.backward_arrays(cfg, a)
        for n in ("dq", "dk", "dv"):
            g[n] = self._finish(k, g[n], g[n].dtype)
        return g


TOY = ToyTarget()
