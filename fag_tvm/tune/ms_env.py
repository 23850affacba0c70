"""Process settings for running meta-schedule inside fag_tvm: quiet logs and no tensor-intrinsic import."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
from typing import Iterator


@contextlib.contextmanager
def no_tensor_intrin() -> Iterator[None]:
    """`TuneContext.__init__` imports tvm.s_tir.tensor_intrin, which parses ~250 TVMScript tensorize
    intrinsics (~20 s here). The knob spaces never tensorize, so a placeholder module stands in for it
    while tuning contexts are created (removed after; build workers never import it: f_build is ours)."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    ph = types.ModuleType(name)
    ph.__fag_tvm_placeholder__ = True  # type: ignore[attr-defined]
    sys.modules[name] = ph
    try:
        yield
    finally:
        if sys.modules.get(name) is ph:
            del sys.modules[name]
            import tvm.s_tir as _s

            if getattr(_s, "tensor_intrin", None) is ph:
                delattr(_s, "tensor_intrin")


@contextlib.contextmanager
def quiet_ms_logs() -> Iterator[None]:
    """meta-schedule logs every iteration at INFO; keep the progress bar readable (FAG_TVM_TUNE_VERBOSE=1
    shows them)."""
    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    old = lg.level
    if os.environ.get("FAG_TVM_TUNE_VERBOSE") != "1":
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)
