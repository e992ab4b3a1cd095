// The packed weight layout shared by every kernel path (see specserve/model/packing.py,
// which writes it, and its `dequantize`, the slow reference the tests compare against).
//
// A weight matrix [N, K] (N outputs) is cut into tiles of TILE = 16 output columns and
// blocks of BLK = 32 inputs. For tile t and block j:
//   q:  8 groups g of 4 inputs; group g is 64 bytes, byte c * 4 + i = q[col c][k = 4g + i].
//       8-bit weights store the 8 groups (512 bytes). Narrower weights store the low 4 bits
//       as 4 chunks of 64 bytes, low nibbles groups 0..3 and high nibbles groups 4..7
//       (256 bytes), then the bits above 4 as planes of 64 bytes:
//       5-bit: one plane, bit g = bit 4 of group g                          (320 bytes)
//       6-bit: two planes (groups 0..3, 4..7); bits 4-5 of the plane's 4 groups sit at
//              bits 4-5, 6-7, 0-1, 2-3, so one shift puts each at bits 4-5   (384 bytes)
//   s:  the block's scale codes, by mode:
//       SYM16     w = S * (q - c), c = 2^(bits - 1): f16 S[16]              (32 bytes)
//       AFFINE16  w = S * q + Mn: f16 S[16], f16 Mn[16]                      (64 bytes)
//       KAFFINE   S = d * sc, Mn = nd * mn: u8 sc[16], u8 mn[16]             (32 bytes)
//                 with f16 d[16], nd[16] per super-block of 8 blocks (K-quants)
//       K6        two halves of 16 inputs, w = d * sc_h * (q - 32): i8 sc[2][16] (32 bytes)
//                 with f16 d[16] per super-block of 8 blocks (Q6_K)
// Every weight value is exactly what GGUF's own dequantizer gives: the layout is a
// re-arrangement of the file's blocks, never a re-quantization.
#pragma once

#include <cstdint>

namespace specserve {

constexpr int TILE = 16;
constexpr int BLK = 32;
constexpr int SUPER = 8;

enum Mode : int { AFFINE16 = 0, KAFFINE = 1, K6 = 2, SYM16 = 3 };

struct PackedWeights {
  int mode;
  int qbits;  // 4, 5, 6 or 8
  const uint8_t* q;
  const uint8_t* s;
  const uint16_t* d;  // f16 per super-block (KAFFINE, K6); unused for AFFINE16
  int64_t tiles;
  int64_t k;
  int64_t col0;  // first output column in the destination
};

constexpr int64_t q_block_bytes(int qbits) { return qbits == 8 ? 512 : 256 + (qbits - 4) * 64; }
constexpr int64_t s_block_bytes(int mode) { return mode == AFFINE16 ? 64 : 32; }

// SYM16's offsets -c * (sum of a block's activation codes), one slot per bit width.
constexpr int kSymSlots = 4;  // c = 8, 16, 128, and a pad to 16 bytes
constexpr int sym_slot(int qbits) { return qbits == 4 ? 0 : (qbits == 5 ? 1 : 2); }
constexpr int64_t d_super_halves(int mode) { return mode == KAFFINE ? 2 * TILE : TILE; }

// Activations quantized per block of 32: x ~= dx[j] * q[32 j .. 32 j + 31].
struct QuantizedRows {
  const int8_t* q;      // [M, K]
  const float* dx;      // [M, K / 32]
  const float* dxs;     // [M, K / 32]  dx * (sum of the block's q)
  const int32_t* k6off; // [M, K / 16]  -32 * (sum of each half-block's q): K6's offset
  const int32_t* off;   // [M, K / 32, kSymSlots]  -c * (sum of the block's q), c = 8, 16, 128
  int64_t m;
  int64_t k;
};

}  // namespace specserve
