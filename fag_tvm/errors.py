"""CANN status codes and the single exception type of fag_tvm (SPEC A8)."""
from __future__ import annotations

ACLNN_SUCCESS = 0
ACLNN_ERR_PARAM_NULLPTR = 161001
ACLNN_ERR_PARAM_INVALID = 161002


class FagError(ValueError):
    """Raised for every invalid or unsupported input; `.code` is the CANN status code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


def invalid(param: str, rule: str) -> FagError:
    """161002 naming the parameter and the rule it breaks."""
    return FagError(ACLNN_ERR_PARAM_INVALID, f"{param}: {rule}")


def unsupported(param: str, what: str) -> FagError:
    """161002 for a combination we do not implement (never a silent wrong answer)."""
    return FagError(ACLNN_ERR_PARAM_INVALID, f"{param}: unsupported: {what}")


def nullptr(param: str) -> FagError:
    """161001: a required tensor is missing."""
    return FagError(ACLNN_ERR_PARAM_NULLPTR, f"{param}: required tensor is missing (None)")
