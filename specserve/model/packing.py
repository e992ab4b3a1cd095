"""GGUF quantized blocks -> the packed layout of the native matmul (native/layout.h).

Each supported GGUF type is split into its integer weights ``q`` (unsigned, one byte each
here) and the scale codes the file stores, then re-arranged into tiles of 16 output columns
so one SIMD register holds 4 inputs of 16 columns. Nothing is re-quantized: ``dequantize``
of the packed form equals the ``gguf`` package's reference dequantizer bit for bit (tested).

| GGUF type | q bits | mode     | w                                   |
|-----------|--------|----------|-------------------------------------|
| Q4_0      | 4      | SYM16    | d * (q - 8)                         |
| Q4_1      | 4      | AFFINE16 | d * q + m                           |
| Q5_0      | 5      | SYM16    | d * (q - 16)                        |
| Q8_0      | 8      | SYM16    | d * (q' - 128)      (q' = q + 128)  |
| Q4_K      | 4      | KAFFINE  | d sc_j * q - dmin m_j               |
| Q5_K      | 5      | KAFFINE  | d sc_j * q - dmin m_j               |
| Q6_K      | 6      | K6       | d sc_h * (q - 32)   (halves of 16)  |

The packed bytes per weight are the file's, within a few percent: 4.5 bits for Q4_K, 5.5
for Q5_0, 6.6 for Q6_K. SYM16's offset is implied by the bit width (half the range), so
its blocks store the scale alone and the kernels subtract the offset in integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

TILE = 16  # output columns per tile
BLK = 32  # inputs per block
SUPER = 8  # blocks per K-quant super-block (256 inputs)
AFFINE16, KAFFINE, K6, SYM16 = 0, 1, 2, 3

PACKED_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K})


@dataclass(frozen=True)
class Decomposed:
    """One tensor's integers and scale codes, rows = outputs. Unused codes are None."""

    q: np.ndarray  # [N, K] uint8
    mode: int
    qbits: int
    scale: np.ndarray | None = None  # AFFINE16, SYM16: [N, K/32] float16
    offset: np.ndarray | None = None  # AFFINE16: [N, K/32] float16
    sc: np.ndarray | None = None  # KAFFINE: [N, K/32] uint8; K6: [N, K/16] int8
    mn: np.ndarray | None = None  # KAFFINE: [N, K/32] uint8
    d: np.ndarray | None = None  # KAFFINE, K6: [N, K/256] float16
    nd: np.ndarray | None = None  # KAFFINE: [N, K/256] float16 (= -dmin)

    def dequantize(self) -> np.ndarray:
        """The float32 weights, computed as the kernels' scale codes define them."""
        n, k = self.q.shape
        q = self.q.reshape(n, k // BLK, BLK).astype(np.float32)
        if self.mode == SYM16:
            assert self.scale is not None
            offset = float(1 << (self.qbits - 1))
            return (self.scale.astype(np.float32)[..., None] * (q - offset)).reshape(n, k)
        if self.mode == AFFINE16:
            assert self.scale is not None and self.offset is not None
            s, m = self.scale.astype(np.float32), self.offset.astype(np.float32)
            return (s[..., None] * q + m[..., None]).reshape(n, k)
        assert self.sc is not None and self.d is not None
        d = np.repeat(self.d.astype(np.float32), SUPER * (1 if self.mode == KAFFINE else 2), 1)
        if self.mode == KAFFINE:
            assert self.mn is not None and self.nd is not None
            s = d * self.sc.astype(np.float32)
            m = np.repeat(self.nd.astype(np.float32), SUPER, axis=1) * self.mn.astype(np.float32)
            return (s[..., None] * q + m[..., None]).reshape(n, k)
        s = d * self.sc.astype(np.float32)  # [N, K/16]
        q16 = self.q.reshape(n, k // 16, 16).astype(np.float32) - 32.0
        return (s[..., None] * q16).reshape(n, k)


def f16_field(raw: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float16."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32]: low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 12] bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K / Q5_K)."""
    lo_sc, lo_m, hi = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc.astype(np.uint8), mn.astype(np.uint8)


def _bits(plane: np.ndarray, count: int) -> np.ndarray:
    """[..., 32] bytes -> [..., count, 32]: bit i of each byte, for i < count."""
    shifts = np.arange(count, dtype=np.uint8)[:, None]
    return (plane[..., None, :] >> shifts) & 1


def _affine(n: int, q: np.ndarray, qbits: int, d: np.ndarray, m: np.ndarray) -> Decomposed:
    return Decomposed(q.reshape(n, -1), AFFINE16, qbits, scale=d, offset=m.astype(np.float16))


def _symmetric(n: int, q: np.ndarray, qbits: int, d: np.ndarray) -> Decomposed:
    return Decomposed(q.reshape(n, -1), SYM16, qbits, scale=d)


def _q4_0(b: np.ndarray) -> Decomposed:  # d, qs[16]
    return _symmetric(b.shape[0], nibbles(b[..., 2:18]), 4, f16_field(b[..., 0:2]))


def _q4_1(b: np.ndarray) -> Decomposed:  # d, m, qs[16]
    d, m = f16_field(b[..., 0:2]), f16_field(b[..., 2:4])
    return _affine(b.shape[0], nibbles(b[..., 4:20]), 4, d, m)


def _q5_0(b: np.ndarray) -> Decomposed:  # d, qh (32 bits), qs[16]
    d = f16_field(b[..., 0:2])
    qh = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)  # [N, nb, 1]
    high = (qh >> np.arange(32, dtype=np.uint32)) & 1
    q = nibbles(b[..., 6:22]) | (high.astype(np.uint8) << 4)
    return _symmetric(b.shape[0], q, 5, d)


def _q8_0(b: np.ndarray) -> Decomposed:  # d, qs[32] int8
    q = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return _symmetric(b.shape[0], q, 8, f16_field(b[..., 0:2]))


def _kaffine(b: np.ndarray, q: np.ndarray, qbits: int) -> Decomposed:
    n = b.shape[0]
    d, dmin = f16_field(b[..., 0:2]), f16_field(b[..., 2:4])
    sc, mn = k_scales(b[..., 4:16])
    return Decomposed(
        q.reshape(n, -1), KAFFINE, qbits,
        sc=sc.reshape(n, -1), mn=mn.reshape(n, -1), d=d, nd=-dmin,
    )  # fmt: skip


def _q4_k(b: np.ndarray) -> Decomposed:
    # qs: 4 chunks of 32 bytes; low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 1, 32)
    return _kaffine(b, np.concatenate([qs & 0x0F, qs >> 4], axis=-2), 4)


def _q5_k(b: np.ndarray) -> Decomposed:
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    high = _bits(b[..., 16:48], 8)  # bit i of qh[e] is the fifth bit of sub-block i
    return _kaffine(b, low | (high << 4), 5)


def _q6_k(b: np.ndarray) -> Decomposed:  # ql[128], qh[64], scales[16] int8, d
    n, nb = b.shape[0], b.shape[1]
    # ql: 2 halves x (low, high nibbles) x 64; qh: 2 halves x 4 bit pairs x 32.
    low_shifts = np.array([[0], [4]], np.uint8)
    high_shifts = np.array([[0], [2], [4], [6]], np.uint8)
    ql = ((b[..., 0:128].reshape(n, nb, 2, 1, 64) >> low_shifts) & 0x0F).reshape(n, nb, 8, 32)
    qh = ((b[..., 128:192].reshape(n, nb, 2, 1, 32) >> high_shifts) & 0x03).reshape(n, nb, 8, 32)
    q = (ql | (qh << 4)).astype(np.uint8).reshape(n, -1)
    sc = b[..., 192:208].view(np.int8).reshape(n, -1)
    return Decomposed(q, K6, 6, sc=sc, d=f16_field(b[..., 208:210]))


_DECODERS = {
    T.Q4_0: (18, 32, _q4_0),
    T.Q4_1: (20, 32, _q4_1),
    T.Q5_0: (22, 32, _q5_0),
    T.Q8_0: (34, 32, _q8_0),
    T.Q4_K: (144, 256, _q4_k),
    T.Q5_K: (176, 256, _q5_k),
    T.Q6_K: (210, 256, _q6_k),
}


def decompose(raw: np.ndarray, qtype: T, cols: int) -> Decomposed:
    """Raw GGUF rows ``[N, bytes_per_row]`` of a packed type -> integers and scale codes."""
    block_bytes, block_len, decode = _DECODERS[qtype]
    return decode(raw.reshape(raw.shape[0], cols // block_len, block_bytes))


@dataclass(frozen=True)
class Packed:
    """A tensor in the kernels' layout: tiles of 16 columns (see native/layout.h)."""

    mode: int
    qbits: int
    rows: int  # real output rows (the last tile may be padded with zero weights)
    cols: int
    q: np.ndarray  # uint8 [tiles, K/32, 256 or 512]
    s: np.ndarray  # uint8 [tiles, K/32, 64 (AFFINE16) or 32]
    d: np.ndarray  # float16 [tiles, K/256, 32 or 16], or [0] for AFFINE16, SYM16

    @property
    def tiles(self) -> int:
        return self.q.shape[0]


def packed_shapes(
    mode: int, qbits: int, rows: int, cols: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The shapes `pack` gives a tensor's q, s and d arrays (native/layout.h)."""
    tiles, blocks = -(-rows // TILE), cols // BLK
    q_bytes = 512 if qbits == 8 else 256 + (qbits - 4) * 64
    s_bytes = 64 if mode == AFFINE16 else 32
    d_shape: tuple[int, ...] = (0,)
    if mode in (KAFFINE, K6):
        d_shape = (tiles, blocks // SUPER, 2 * TILE if mode == KAFFINE else TILE)
    return (tiles, blocks, q_bytes), (tiles, blocks, s_bytes), d_shape


def _tiles(a: np.ndarray, rows: int) -> np.ndarray:
    """[N, X, ...] -> [tiles, X, 16, ...]: N padded to a whole tile with zeros."""
    pad = -rows % TILE
    if pad:
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
    return a.reshape(-1, TILE, *a.shape[1:]).swapaxes(1, 2)


# 6-bit weights: where bits 4-5 of each of a plane's 4 groups sit (native/layout.h).
_SIX_BIT_SHIFTS = (4, 6, 0, 2)


def _pack_q(q: np.ndarray, qbits: int) -> np.ndarray:
    """[N, K] -> [tiles, K/32, bytes]: group g (4 inputs) of a block is 16 columns x 4."""
    n, k = q.shape
    grouped = _tiles(q.reshape(n, k // BLK, 8, 4), n)  # [t, nb, 16, 8, 4]
    groups = grouped.transpose(0, 1, 3, 2, 4).reshape(-1, k // BLK, 8, 64)
    if qbits == 8:
        return np.ascontiguousarray(groups.reshape(-1, k // BLK, 512))
    nibbles = (groups[:, :, :4] & 0x0F) | ((groups[:, :, 4:] & 0x0F) << 4)
    planes = [nibbles.reshape(-1, k // BLK, 256)]
    high = (groups >> 4).astype(np.uint8)  # [t, nb, 8, 64]
    if qbits == 5:
        weights = (1 << np.arange(8, dtype=np.uint8))[:, None]
        planes.append((high * weights).sum(axis=2, dtype=np.uint8))
    if qbits == 6:
        for half in (high[:, :, :4], high[:, :, 4:]):
            shifted = [half[:, :, i] << shift for i, shift in enumerate(_SIX_BIT_SHIFTS)]
            planes.append(np.bitwise_or.reduce(shifted).astype(np.uint8))
    return np.ascontiguousarray(np.concatenate(planes, axis=-1))


def _codes(*codes: np.ndarray, rows: int) -> np.ndarray:
    """Per-block codes [N, X] each -> [tiles, X, bytes]: code by code, 16 columns each."""
    tiles = [_tiles(c, rows) for c in codes]  # each [t, X, 16]
    both = np.stack(tiles, axis=2)  # [t, X, len(codes), 16]
    return np.ascontiguousarray(both).view(np.uint8).reshape(*both.shape[:2], -1)


def pack(dec: Decomposed) -> Packed:
    """The kernels' layout of a decomposed tensor."""
    n, k = dec.q.shape
    q = _pack_q(dec.q, dec.qbits)
    if dec.mode == SYM16:
        assert dec.scale is not None
        s = _codes(dec.scale, rows=n)
        d = np.zeros(0, np.float16)
    elif dec.mode == AFFINE16:
        assert dec.scale is not None and dec.offset is not None
        s = _codes(dec.scale, dec.offset, rows=n)
        d = np.zeros(0, np.float16)
    elif dec.mode == KAFFINE:
        assert dec.sc is not None and dec.mn is not None
        assert dec.d is not None and dec.nd is not None
        s = _codes(dec.sc, dec.mn, rows=n)
        d = _codes(dec.d, dec.nd, rows=n).view(np.float16)
    else:
        assert dec.sc is not None and dec.d is not None
        s = _codes(dec.sc[:, 0::2], dec.sc[:, 1::2], rows=n).view(np.uint8)
        d = _codes(dec.d, rows=n).view(np.float16)
    return Packed(dec.mode, dec.qbits, n, k, q, s, np.ascontiguousarray(d))
