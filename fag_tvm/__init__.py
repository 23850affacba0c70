"""fag_tvm: CANN-exact flash-attention backward (and forward) compiled with Apache TVM.

`import fag_tvm` never imports TVM; building or loading a kernel does (see fag_tvm._tvm)."""
from __future__ import annotations

from . import dropout, masks, reference
from .api import ForwardResult, GradResult, flash_attention_score, flash_attention_score_grad
from .version import __version__
from .errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, ACLNN_SUCCESS, FagError


__all__ = [
    "flash_attention_score_grad", "flash_attention_score", "GradResult", "ForwardResult", "FagError",
    "ACLNN_ERR_PARAM_NULLPTR", "ACLNN_ERR_PARAM_INVALID", "ACLNN_SUCCESS", "reference", "masks", "dropout",
    "__version__",
]


def __getattr__(name: str):
    # Lazy submodules that pull in heavier dependencies.
    if name in ("aclnn", "runtime", "cli", "jit", "package", "targets", "workloads", "testing", "torch"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fag_tvm' has no attribute {name!r}")
