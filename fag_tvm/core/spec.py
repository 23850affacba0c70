"""Compile-time specialisation of one kernel (ABI.md "Compile-time specialisation"); TVM-free.

Everything else (shapes, B/Sq/Skv/T, layout strides, scale, keep_prob, tokens, prefix, alibi
offsets, TILE_SKIP, INVALID_ROWS) is a runtime argument, so one compiled kernel serves many calls.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

DIRECTIONS = ("fwd", "bwd")
DTYPES = ("float32", "float16", "bfloat16")
PSE_KINDS = ("none", "ext", "alibi_c", "slopes", "slopes_sqrt")
_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_PSE_SHORT = {"ext": "ext", "alibi_c": "alibic", "slopes": "slopes", "slopes_sqrt": "slopessqrt"}


@dataclass(frozen=True)
class KernelSpec:
    """Compile-time fields of a fag kernel (exactly those of ABI.md)."""

    direction: str  # "fwd" | "bwd"
    dtype: str  # "float32" | "float16" | "bfloat16"
    d: int  # head dim of q/k
    dv: int  # head dim of v (dv <= d)
    group: int = 1  # G = N1 / N2
    band: bool = False  # structural band/prefix rule from bmeta PRE/NEXT/PREFIX
    full_mask: bool = False  # uint8 atten_mask read from memory
    pse: str = "none"  # none | ext | alibi_c | slopes | slopes_sqrt
    pse_add_first: bool = True  # pse_type 1: S = scale*(QK^T + pse); else S = scale*QK^T + pse
    dropout: bool = False
    dpse: bool = False  # bwd, pse == "ext" only: accumulate dpse into dpse_acc
    dpse_sum_b: bool = False  # pse broadcast over B (PSE_OFF equal for all b): b serial inside a task

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"KernelSpec.direction {self.direction!r} not in {DIRECTIONS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KernelSpec.dtype {self.dtype!r} not in {DTYPES}")
        if self.pse not in PSE_KINDS:
            raise ValueError(f"KernelSpec.pse {self.pse!r} not in {PSE_KINDS}")
        if not (1 <= self.dv <= self.d):
            raise ValueError(f"KernelSpec: need 1 <= dv <= d, got d={self.d} dv={self.dv}")
        if self.group < 1:
            raise ValueError("KernelSpec.group must be >= 1")
        if self.dpse and (self.direction != "bwd" or self.pse != "ext"):
            raise ValueError("KernelSpec.dpse needs direction='bwd' and pse='ext'")
        if self.dpse_sum_b and not self.dpse:
            raise ValueError("KernelSpec.dpse_sum_b needs dpse")

    @classmethod
    def from_dict(cls, d: object) -> "KernelSpec":
        """A spec from JSON (manifests, records), with every field's type checked (ValueError if bad)."""
        if not isinstance(d, dict):
            raise ValueError(f"kernel spec must be a JSON object, got {type(d).__name__}")
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        missing = sorted(n for n in ("direction", "dtype", "d", "dv") if n not in d)
        if unknown or missing:
            raise ValueError(f"kernel spec: unknown fields {unknown}, missing {missing}")
        for k, v in d.items():
            want = {"str": str, "int": int, "bool": bool}[str(names[k].type)]
            if type(v) is not want:  # noqa: E721 - bool is not an int here
                raise ValueError(f"kernel spec field {k}={v!r} is not a {want.__name__}")
        return cls(**d)

    @property
    def dtype_short(self) -> str:
        return _SHORT[self.dtype]

    @property
    def low_precision(self) -> bool:
        return self.dtype != "float32"

    @property
    def storage_dtype(self) -> str:
        """Element type of q/k/v/... as the kernel declares them (bf16 is passed as raw uint16 bits)."""
        return "uint16" if self.dtype == "bfloat16" else self.dtype

    @property
    def pse_storage_dtype(self) -> str:
        return "float32" if self.pse in ("slopes", "slopes_sqrt") else self.storage_dtype

    def features(self) -> list[str]:
        """The specialisation flags as name fragments, in a fixed order."""
        out = []
        if self.band:
            out.append("band")
        if self.full_mask:
            out.append("mask")
        if self.pse != "none":
            out.append(f"pse{1 if self.pse_add_first else 0}{_PSE_SHORT[self.pse]}")
        if self.dropout:
            out.append("drop")
        if self.dpse:
            out.append("dpsesumb" if self.dpse_sum_b else "dpse")
        return out

    def key(self, target_name: str, knobs=None) -> str:
        """FlashInfer-style readable kernel name spelling out every specialisation, e.g.
        `fag_bwd_llvm_f16_d128_dv128_g4_band_mask_pse1ext_drop_dpse_bq64_bkv64_mr4_nr4`."""
        parts = ["fag", self.direction, target_name, self.dtype_short, f"d{self.d}", f"dv{self.dv}",
                 f"g{self.group}", *self.features()]
        if knobs is not None:
            parts.append(knobs.tag())
        return "_".join(parts).replace("-", "")
