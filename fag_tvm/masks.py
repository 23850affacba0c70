"""Attention masks (SPEC §5): CANN's compressed masks and the dense per-sequence mask of a config."""
from __future__ import annotations

import numpy as np

COMPRESSED = 2048


def compressed_causal_mask() -> np.ndarray:
    """The 2048×2048 `triu(ones, 1)` bool mask that sparse modes 2, 3, 4, 7 and 8 require."""
    return np.triu(np.ones((COMPRESSED, COMPRESSED), dtype=bool), k=1)


def compressed_prefix_mask() -> np.ndarray:
    """The 3072×2048 mask of sparse mode 6: causal part stacked on [zeros(1024,1024) | ones(1024,1024)]."""
    rect = np.hstack([np.zeros((1024, 1024), dtype=bool), np.ones((1024, 1024), dtype=bool)])
    return np.vstack([compressed_causal_mask(), rect])


def structural_visible(sq: int, skv: int, pre: int, nxt: int, prefix: int = 0) -> np.ndarray:
    """Bool [sq, skv]: visible(i,j) = (j-i <= next and i-j <= pre) or j < prefix (left-up origin)."""
    i = np.arange(sq, dtype=np.int64)[:, None]
    j = np.arange(skv, dtype=np.int64)[None, :]
    return ((j - i <= nxt) & (i - j <= pre)) | (j < prefix)


def band_mask(sq: int, skv: int, pre_tokens: int, next_tokens: int) -> np.ndarray:
    """A full (uncompressed) mask consistent with mode-0 tokens: True = masked outside the band."""
    return ~structural_visible(sq, skv, pre_tokens, next_tokens)


def causal_mask(sq: int, skv: int, right_down: bool = False) -> np.ndarray:
    """Full causal mask, left-up (mode 2 semantics) or right-down (mode 3): True = masked."""
    return ~structural_visible(sq, skv, 2**31 - 1, (skv - sq) if right_down else 0)


def prefix_mask(sq: int, skv: int, prefix: int) -> np.ndarray:
    """Full mask of mode 5 for one batch: masked iff j > i + (skv - sq) and j >= prefix."""
    return ~structural_visible(sq, skv, 2**31 - 1, skv - sq, prefix)


def dense_masked(cfg, b: int, atten_mask: np.ndarray | None) -> np.ndarray:
    """Bool [N1 or 1, Sq_b, Skv_b] for batch b: structural rule OR the element-wise mask (SPEC A3)."""
    bi = cfg.batches[b]
    masked = np.zeros((1, bi.sq, bi.skv), dtype=bool)
    if cfg.band:
        masked |= ~structural_visible(bi.sq, bi.skv, bi.pre, bi.next, bi.prefix)[None]
    if cfg.full_mask:
        m = atten_mask.view(np.uint8) != 0
        form = cfg.mask_form
        if form == "SS":
            part = m[None, : bi.sq, : bi.skv]
        elif form == "11SS":
            part = m[0, :, : bi.sq, : bi.skv]
        elif form == "B1SS":
            part = m[b]
        else:  # BNSS
            part = m[b]
        masked = masked | part
    return masked
