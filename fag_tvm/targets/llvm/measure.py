"""Tuning measurements of LLVM kernels: realistic arguments of a workload (packed by the same launcher
as a real call) and meta-schedule's local or RPC runner timing the built candidate's entry."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ...core.buffers import ensure_aligned, kernel_view
from ...workloads import configs, random_call


class _Capture:
    """A kernel provider that records the packed ABI arguments instead of running a kernel."""

    def __init__(self, spec):
        self.spec = spec
        self.args = None

    def __call__(self, *args):
        if self.args is None:
            self.args = [kernel_view(ensure_aligned(x)) for x in args]


def kernel_args(task: dict, seed: int = 0) -> list[np.ndarray]:
    """ABI arguments (aligned NumPy, kernel views) of the task's workload."""
    from ...tune.task import spec_of
    from . import launch

    w = task["workload"]
    fcfg, bcfg = configs(w)
    cap = _Capture(spec_of(task))
    a = random_call(w, seed)
    if task["direction"] == "bwd":
        launch.backward_arrays(bcfg, a, lambda s: cap)
    else:
        launch.forward_arrays(fcfg, a, lambda s: cap)
    assert cap.args is not None
    return cap.args


def _alloc(task: dict, device, alloc_repeat: int):
    import tvm

    host = kernel_args(task)
    return [[tvm.runtime.tensor(x, device) for x in host] for _ in range(max(1, alloc_repeat))]


def alloc_local(task, device, args_info, alloc_repeat):  # LocalRunner f_alloc_argument
    return _alloc(task, device, alloc_repeat)


def alloc_rpc(task, session, device, args_info, alloc_repeat):  # RPCRunner f_alloc_argument
    return _alloc(task, device, alloc_repeat)


def _evaluate(rt_mod, device, cfg, repeated_args) -> list[float]:
    from ...tune.task import ENTRY

    f = rt_mod.time_evaluator(ENTRY, device, number=cfg.number, repeat=cfg.repeat, min_repeat_ms=cfg.min_repeat_ms)
    out = []
    for args in repeated_args:
        device.sync()
        out += [float(x) for x in f(*args).results]
    return out


def run_local(rt_mod, device, cfg, repeated_args):
    return _evaluate(rt_mod, device, cfg, repeated_args)


def run_rpc(session, rt_mod, device, cfg, repeated_args):
    return _evaluate(rt_mod, device, cfg, repeated_args)


def make_runner(task: dict, options: dict[str, Any]):
    """LocalRunner, or RPCRunner when options["rpc_tracker"] = (host, port) with options["rpc_key"]."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

    evaluator = EvaluatorConfig(number=options.get("number", 1), repeat=options.get("repeat", 3),
                                min_repeat_ms=options.get("min_repeat_ms", 40), enable_cpu_cache_flush=False)
    timeout = options.get("run_timeout", 120.0)
    if options.get("rpc_tracker"):
        host, port = options["rpc_tracker"]
        return ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=options["rpc_key"],
                                           session_timeout_sec=int(timeout), session_priority=1),
            evaluator_config=evaluator, f_alloc_argument=functools.partial(alloc_rpc, task),
            f_run_evaluator=run_rpc, max_workers=1)
    return ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator,
                                 f_alloc_argument=functools.partial(alloc_local, task), f_run_evaluator=run_local)
