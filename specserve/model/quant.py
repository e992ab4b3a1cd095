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

GROUP_SIZE = 32
INT4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)


@dataclass(frozen=True)
class Int4Groups:
    """Affine 4-bit weights: ``w[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]``."""

    q: np.ndarray  # [rows, cols] uint8 in 0..15
    scale: np.ndarray  # [rows, cols // 32] float32
    zero: np.ndarray  # [rows, cols // 32] float32

    def dequantize(self) -> np.ndarray:
        rows, cols = self.q.shape
        q = self.q.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE).astype(np.float32)
        w = (q - 8.0) * self.scale[..., None] + self.zero[..., None]
        return w.reshape(rows, cols)

    def permute_rows(self, order: np.ndarray) -> Int4Groups:
        return Int4Groups(self.q[order], self.scale[order], self.zero[order])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] packed bytes -> [..., 32]: low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # block: d (f16), qs[16]; w = d * (q - 8)
    d = _f16(blocks[..., 0:2])
    return _nibbles(blocks[..., 2:18]), d, np.zeros_like(d)


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # block: d (f16), m (f16), qs[16]; w = d * q + m = (q - 8) * d + (m + 8 d)
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    return _nibbles(blocks[..., 4:20]), d, m + 8.0 * d


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    p = packed.astype(np.uint16)
    lo_sc, lo_m, hi = p[..., 0:4], p[..., 4:8], p[..., 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # super-block of 256: d, dmin (f16), scales[12], qs[128]; sub-block j of 32 has
    # w = d * sc[j] * q - dmin * m[j]. qs holds 4 chunks of 32 bytes: low nibbles are
    # sub-block 2c, high nibbles sub-block 2c + 1.
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, mn = _q4_k_scales(blocks[..., 4:16])
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2)  # [..., 4, 2, 32]
    q = q.reshape(*blocks.shape[:-1], 8, 32)
    scale = d[..., None] * sc
    zero = 8.0 * scale - dmin[..., None] * mn
    return q.reshape(*blocks.shape[:-1], 256), scale, zero


_DECODERS = {
    GGMLQuantizationType.Q4_0: (18, 32, _q4_0),
    GGMLQuantizationType.Q4_1: (20, 32, _q4_1),
    GGMLQuantizationType.Q4_K: (144, 256, _q4_k),
}


def int4_groups(raw: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> Int4Groups:
    """Raw GGUF rows ``[rows, bytes_per_row]`` of a 4-bit type -> ``Int4Groups``."""
    block_bytes, block_len, decode = _DECODERS[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, cols // block_len, block_bytes)
    q, scale, zero = decode(blocks)
    return Int4Groups(
        q=np.ascontiguousarray(q.reshape(rows, cols).astype(np.uint8)),
        scale=np.ascontiguousarray(scale.reshape(rows, cols // GROUP_SIZE), dtype=np.float32),
        zero=np.ascontiguousarray(zero.reshape(rows, cols // GROUP_SIZE), dtype=np.float32),
    )
