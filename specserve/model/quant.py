"""GGUF quantized blocks -> affine 4-bit groups for the int4 matmul kernel.

GGUF's Q4_0, Q4_1 and Q4_K all store groups of 32 weights as ``w = a * q + b`` with a
4-bit ``q``. PyTorch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) computes
``w = (q - 8) * scale + zero`` per group of 32, so these types map onto it exactly, without
re-quantizing; only the fp16 block scales are rounded to bf16. Every function here returns
``Int4Groups`` in the kernel's convention, and ``Int4Groups.dequantize`` is checked against
the ``gguf`` package's reference dequantizer in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

# The field decoders are the native packing's (one reading of GGUF's block layouts).
from specserve.model.packing import f16_field, k_scales, nibbles

GROUP_SIZE = 32
INT4_TYPES = (
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q8_0,  # as a pair of 4-bit halves, see _q8_0_pair
)


@dataclass(frozen=True)
class Int4Groups:
    """Affine 4-bit weights: ``w[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]``."""

    q: np.ndarray  # [rows, cols * input_repeats] uint8 in 0..15
    scale: np.ndarray  # [rows, cols * input_repeats // 32] float32
    zero: np.ndarray  # [rows, cols * input_repeats // 32] float32
    # 2 for an 8-bit tensor split into two 4-bit halves: the input is fed twice (see Q8_0).
    input_repeats: int = 1

    def dequantize(self) -> np.ndarray:
        rows, cols = self.q.shape
        q = self.q.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE).astype(np.float32)
        w = ((q - 8.0) * self.scale[..., None] + self.zero[..., None]).reshape(rows, cols)
        parts = np.split(w, self.input_repeats, axis=1)
        return np.sum(parts, axis=0) if self.input_repeats > 1 else w

    def permute_rows(self, order: np.ndarray) -> Int4Groups:
        return Int4Groups(self.q[order], self.scale[order], self.zero[order], self.input_repeats)


def _f32(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 (an fp16 field) -> [...] float32."""
    return f16_field(raw).astype(np.float32)


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # block: d (f16), qs[16]; w = d * (q - 8)
    d = _f32(blocks[..., 0:2])
    return nibbles(blocks[..., 2:18]), d, np.zeros_like(d)


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # block: d (f16), m (f16), qs[16]; w = d * q + m = (q - 8) * d + (m + 8 d)
    d, m = _f32(blocks[..., 0:2]), _f32(blocks[..., 2:4])
    return nibbles(blocks[..., 4:20]), d, m + 8.0 * d


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # super-block of 256: d, dmin (f16), scales[12], qs[128]; sub-block j of 32 has
    # w = d * sc[j] * q - dmin * m[j]. qs holds 4 chunks of 32 bytes: low nibbles are
    # sub-block 2c, high nibbles sub-block 2c + 1.
    d, dmin = _f32(blocks[..., 0:2]), _f32(blocks[..., 2:4])
    sc, mn = (codes.astype(np.float32) for codes in k_scales(blocks[..., 4:16]))
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2)  # [..., 4, 2, 32]
    q = q.reshape(*blocks.shape[:-1], 8, 32)
    scale = d[..., None] * sc
    zero = 8.0 * scale - dmin[..., None] * mn
    return q.reshape(*blocks.shape[:-1], 256), scale, zero


def _q8_0_pair(raw: np.ndarray, cols: int) -> Int4Groups:
    """Q8_0 (``w = d * q``, int8 q) as two 4-bit halves, exactly: with ``q = 16 h + l``,
    ``h`` in -8..7 and ``l`` in 0..15, ``w = 16 d h + d l``. The kernel computes
    ``[x | x] @ [W_h | W_l]^T``: half the bytes of a bf16 matmul, same values."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, cols // 32, 34)
    d = _f32(blocks[..., 0:2])
    q = blocks[..., 2:34].view(np.int8).astype(np.int16)
    low = q & 0x0F
    high = (q - low) // 16 + 8
    scale = np.concatenate([16.0 * d, d], axis=1)
    zero = np.concatenate([np.zeros_like(d), 8.0 * d], axis=1)
    q4 = np.concatenate([high.reshape(rows, cols), low.reshape(rows, cols)], axis=1)
    return Int4Groups(q4.astype(np.uint8), scale, zero, input_repeats=2)


_DECODERS = {
    GGMLQuantizationType.Q4_0: (18, 32, _q4_0),
    GGMLQuantizationType.Q4_1: (20, 32, _q4_1),
    GGMLQuantizationType.Q4_K: (144, 256, _q4_k),
}


def int4_groups(raw: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> Int4Groups:
    """Raw GGUF rows ``[rows, bytes_per_row]`` of a 4-bit type (or Q8_0) -> ``Int4Groups``."""
    if qtype == GGMLQuantizationType.Q8_0:
        return _q8_0_pair(raw, cols)
    block_bytes, block_len, decode = _DECODERS[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, cols // block_len, block_bytes)
    q, scale, zero = decode(blocks)
    return Int4Groups(
        q=np.ascontiguousarray(q.reshape(rows, cols).astype(np.uint8)),
        scale=np.ascontiguousarray(scale.reshape(rows, cols // GROUP_SIZE), dtype=np.float32),
        zero=np.ascontiguousarray(zero.reshape(rows, cols // GROUP_SIZE), dtype=np.float32),
    )
