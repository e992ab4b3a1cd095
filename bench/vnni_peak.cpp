// How many 512-bit vpdpbusd (AVX-512 VNNI: 64 int8 multiply-adds each) one core retires
// per second, fed from L1 with nothing else to do: the arithmetic ceiling of specserve's
// quantized matmul on this machine (bench/arithmetic.py compiles and runs this file).
//
// Two loops, each over 48 blocks of 32 inputs (a K = 1536 row) with enough independent
// accumulator chains to hide the instruction's latency:
//   register_fed: 4 rows x 3 column tiles, each activation broadcast into a register once and
//                 used by 3 tiles (the fewest loads per instruction: the best case);
//   kernel_shape: the shape of specserve's kernel (kernel_avx512.inc): 8 rows share one
//                 tile's 8 weight registers, activations as memory broadcasts, and each
//                 block's float step (convert, scale, two FMAs per row). Weights are already
//                 decoded: the real kernel also unpacks them and streams them from memory.
// Prints one JSON object: giga-instructions per second for each loop (best of 5).
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

#include "peak_timing.h"

namespace {

constexpr int kBlocks = 48;
alignas(64) int8_t g_weights[kBlocks * 3 * 8 * 64];
alignas(64) float g_scales[kBlocks * 3 * 32];
alignas(64) int8_t g_x[8 * kBlocks * 32];
alignas(64) float g_dx[8 * kBlocks], g_dxs[8 * kBlocks];
volatile float g_sink;

double register_fed(long reps) {
  constexpr int MR = 4, NT = 3;
  __m512i acc[MR][NT];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_si512();
  const auto t0 = std::chrono::steady_clock::now();
  for (long rep = 0; rep < reps; rep++)
    for (int j = 0; j < kBlocks; j++)
#pragma GCC unroll 8
      for (int g = 0; g < 8; g++) {
        __m512i w[NT];
#pragma GCC unroll 3
        for (int t = 0; t < NT; t++)
          w[t] = _mm512_load_si512(g_weights + ((j * NT + t) * 8 + g) * 64);
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) {
          int32_t four;
          __builtin_memcpy(&four, g_x + (r * kBlocks + j) * 32 + 4 * g, 4);
          const __m512i xb = _mm512_set1_epi32(four);
#pragma GCC unroll 3
          for (int t = 0; t < NT; t++) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w[t], xb);
        }
      }
  const double s = seconds_since(t0);
  int sum = 0;
  for (auto& row : acc)
    for (auto& a : row) sum += _mm512_reduce_add_epi32(a);
  g_sink = static_cast<float>(sum);
  return double(reps) * kBlocks * 8 * MR * NT / s / 1e9;
}

double kernel_shape(long reps) {
  constexpr int R = 8;
  __m512 acc[R];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const auto t0 = std::chrono::steady_clock::now();
  for (long rep = 0; rep < reps; rep++)
    for (int j = 0; j < kBlocks; j++) {
      __m512i w[8];
#pragma GCC unroll 8
      for (int g = 0; g < 8; g++) w[g] = _mm512_load_si512(g_weights + (j * 8 + g) * 64);
      const __m512 s = _mm512_load_ps(g_scales + j * 32), mn = _mm512_load_ps(g_scales + j * 32 + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) {
        const int8_t* x = g_x + (r * kBlocks + j) * 32;
        __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
        for (int g = 0; g < 4; g++)
          asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(a) : "v"(w[g]), "m"(*(const int32_t*)(x + 4 * g)));
        for (int g = 4; g < 8; g++)
          asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(b) : "v"(w[g]), "m"(*(const int32_t*)(x + 4 * g)));
        const __m512 dx = _mm512_set1_ps(g_dx[r * kBlocks + j]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, b)), _mm512_mul_ps(s, dx), acc[r]);
        acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(g_dxs[r * kBlocks + j]), acc[r]);
      }
    }
  const double s = seconds_since(t0);
  float sum = 0;
  for (auto& a : acc) sum += _mm512_reduce_add_ps(a);
  g_sink = sum;
  return double(reps) * kBlocks * 8 * R / s / 1e9;
}

}  // namespace

int main() {
  fill_operands(g_weights, g_x, g_scales, g_dx, g_dxs);
  const double fed = best_of(register_fed, 200000), shape = best_of(kernel_shape, 200000);
  std::printf("{\"register_fed_g_per_s\": %.3f, \"kernel_shape_g_per_s\": %.3f}\n", fed, shape);
  return 0;
}
