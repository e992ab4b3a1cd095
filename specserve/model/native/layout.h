// The packed weight layout shared by every kernel path (see specserve/model/packing.py,
// which writes it, and its `dequantize`, the slow reference the tests compare against).
//
// A weight matrix [N, K] (N outputs) is cut into tiles of TILE = 16 output columns and
// blocks of BLK = 32 inputs. For tile t and block j:
//   q:  8 groups g of 4 inputs; group g is 64 bytes, byte c * 4 + i = q[col c][k = 4g + i].
//       8-bit weights store the 8 groups (512 bytes). 4-bit weights store 4 chunks of 64
//       bytes: low nibbles are groups 0..3, high nibbles groups 4..7 (256 bytes).
//   s:  the block's scale codes, by mode:
//       AFFINE16  w = S * q + Mn: f16 S[16], f16 Mn[16]                      (64 bytes)
//       KAFFINE   S = d * sc, Mn = nd * mn: u8 sc[16], u8 mn[16]             (32 bytes)
//                 with f32 d[16], nd[16] per super-block of 8 blocks (K-quants)
//       K6        two halves of 16 inputs, w = d * sc_h * (q - 32): i8 sc[2][16] (32 bytes)
//                 with f32 d[16] per super-block of 8 blocks (Q6_K)
// Every weight value is exactly what GGUF's own dequantizer gives: the layout is a
// re-arrangement of the file's blocks, never a re-quantization.
#pragma once

#include <cstdint>

namespace specserve {

constexpr int TILE = 16;
constexpr int BLK = 32;
constexpr int SUPER = 8;

enum Mode : int { AFFINE16 = 0, KAFFINE = 1, K6 = 2 };

struct PackedWeights {
  int mode;
  int qbits;  // 4 or 8
  const uint8_t* q;
  const uint8_t* s;
  const float* d;  // per super-block (KAFFINE, K6); unused for AFFINE16
  int64_t tiles;
  int64_t k;
  int64_t col0;  // first output column in the destination
};

inline int64_t q_block_bytes(int qbits) { return qbits == 4 ? 256 : 512; }
inline int64_t s_block_bytes(int mode) { return mode == AFFINE16 ? 64 : 32; }
inline int64_t d_super_floats(int mode) { return mode == KAFFINE ? 2 * TILE : TILE; }

// Activations quantized per block of 32: x ~= dx[j] * q[32 j .. 32 j + 31].
struct QuantizedRows {
  const int8_t* q;      // [M, K]
  const float* dx;      // [M, K / 32]
  const float* dxs;     // [M, K / 32]  dx * (sum of the block's q)
  const int32_t* s16;   // [M, K / 16]  sum of each half-block's q
  int64_t m;
  int64_t k;
};

}  // namespace specserve
