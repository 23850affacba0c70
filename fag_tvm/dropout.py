"""Dropout bit masks (SPEC §6): 1 bit per element, LSB-first, indices running across rows without padding."""
from __future__ import annotations

import numpy as np


def gen_drop_mask(B: int, N: int, Sq: int, Skv: int, keep_prob: float, seed: int = 0) -> np.ndarray:
    """Packed uint8 mask of ceil(B·N·Sq·Skv/8) bytes; each element kept with probability keep_prob.

    Bit e = ((b·N + n)·Sq + i)·Skv + j. (Not CANN's Philox stream: V1 takes the mask as an input.)"""
    n = B * N * Sq * Skv
    keep = np.random.default_rng(seed).random(n) < keep_prob
    return np.packbits(keep, bitorder="little")


def gen_drop_mask_tnd(N: int, seq_q: list[int], seq_kv: list[int], keep_prob: float, seed: int = 0) -> np.ndarray:
    """Packed mask for TND varlen: N·Σ Sq_b·Skv_b bits."""
    n = N * sum(a * b for a, b in zip(seq_q, seq_kv))
    keep = np.random.default_rng(seed).random(n) < keep_prob
    return np.packbits(keep, bitorder="little")


def unpack_bits(drop_mask: np.ndarray, start: int, count: int) -> np.ndarray:
    """Bool array of `count` keep-bits starting at bit `start` (LSB-first within each byte)."""
    if count == 0:
        return np.zeros(0, dtype=bool)
    b0, b1 = start >> 3, (start + count + 7) >> 3
    bits = np.unpackbits(np.ascontiguousarray(drop_mask.reshape(-1)[b0:b1]), bitorder="little")
    off = start - (b0 << 3)
    return bits[off:off + count].astype(bool)
