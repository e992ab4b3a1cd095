// How many 256-bit vpmaddubsw (AVX2: 32 u8 x s8 products each, summed in pairs) one core
// retires per second on a CPU without AVX-512 VNNI, fed from L1 with nothing else to do: the
// arithmetic ceiling of specserve's AVX2 matmul (kernel_avx2.inc; bench/arithmetic.py
// compiles and runs this file on such CPUs, vnni_peak.cpp on the others).
//
// Every loop does what the kernel's integer step must do for 4-bit weights: vpmaddubsw per
// group of 4 inputs, the 16-bit pair sums of a block's 8 groups added, then widened by one
// vpmaddwd. Over 48 blocks of 32 inputs (a K = 1536 row):
//   bare:         vpmaddubsw alone on register operands, 8 independent chains (the
//                 instruction's own rate, nothing else);
//   register_fed: 2 rows x 3 column octets, each weight register used by 2 rows and each
//                 activation broadcast by 3 octets, 6 independent 16-bit sums: the best case
//                 for the full integer step;
//   kernel_shape: the shape of kernel_avx2.inc's many-row loop: one half-tile's 8 weight
//                 registers shared by 16 rows, activations as memory broadcasts, a chain of
//                 16-bit adds per row, and the block's float step (convert, scale, two FMAs)
//                 into sums kept in L1. Weights are already decoded: the real kernel also
//                 unpacks them and streams them from memory.
//   mix_unchained: the instructions of one row's step in kernel_shape (8 broadcasts, 8
//                 vpmaddubsw, 7 vpaddw, vpmaddwd, the float step's convert, 2 broadcasts,
//                 multiply, 2 FMAs and the store), with none of its long chains: each
//                 instruction writes a register that no later row reads (an FMA adds to the
//                 convert's or vpmaddwd's result of its own row). The most the execution units
//                 allow for that mix of instructions, however they are arranged.
// Prints one JSON object: giga-instructions (vpmaddubsw) per second for each loop (best of 5).
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

#include "peak_timing.h"

namespace {

constexpr int kBlocks = 48;
constexpr int kRows = 16;
alignas(64) uint8_t g_weights[kBlocks * 3 * 8 * 32];
alignas(64) float g_scales[kBlocks * 16];
alignas(64) int8_t g_x[kRows * kBlocks * 32];
alignas(64) float g_dx[kRows * kBlocks], g_dxs[kRows * kBlocks];
alignas(64) float g_sums[kRows * 8];
volatile float g_sink;

__m256i broadcast4(const int8_t* p) {
  int32_t four;
  __builtin_memcpy(&four, p, 4);
  return _mm256_set1_epi32(four);
}

double bare(long reps) {
  __m256i a[8];
  for (int i = 0; i < 8; i++) a[i] = _mm256_set1_epi8(static_cast<char>(i));
  const __m256i b = _mm256_set1_epi8(3);
  const auto t0 = std::chrono::steady_clock::now();
  for (long rep = 0; rep < reps * kBlocks; rep++)
    for (int i = 0; i < 8; i++) {
      a[i] = _mm256_maddubs_epi16(a[i], b);
      asm volatile("" : "+x"(a[i]));  // keep each chain's instructions
    }
  const double s = seconds_since(t0);
  int sum = 0;
  for (auto& v : a) sum += _mm256_extract_epi32(v, 0);
  g_sink = static_cast<float>(sum);
  return double(reps) * kBlocks * 8 / s / 1e9;
}

double register_fed(long reps) {
  constexpr int MR = 2, NT = 3;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NT];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_si256();
  const auto t0 = std::chrono::steady_clock::now();
  for (long rep = 0; rep < reps; rep++)
    for (int j = 0; j < kBlocks; j++) {
      __m256i pairs[MR][NT];
#pragma GCC unroll 8
      for (int g = 0; g < 8; g++) {
        __m256i w[NT];
        for (int t = 0; t < NT; t++)
          w[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(
              g_weights + ((j * NT + t) * 8 + g) * 32));
        for (int r = 0; r < MR; r++) {
          const __m256i xb = broadcast4(g_x + (r * kBlocks + j) * 32 + 4 * g);
          for (int t = 0; t < NT; t++) {
            const __m256i p = _mm256_maddubs_epi16(w[t], xb);
            pairs[r][t] = g == 0 ? p : _mm256_add_epi16(pairs[r][t], p);
          }
        }
      }
      for (int r = 0; r < MR; r++)
        for (int t = 0; t < NT; t++)
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(pairs[r][t], ones));
    }
  const double s = seconds_since(t0);
  int sum = 0;
  for (auto& row : acc)
    for (auto& a : row) sum += _mm256_extract_epi32(a, 0);
  g_sink = static_cast<float>(sum);
  return double(reps) * kBlocks * 8 * MR * NT / s / 1e9;
}

double kernel_shape(long reps) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (auto& v : g_sums) v = 0.0f;
  const auto t0 = std::chrono::steady_clock::now();
  for (long rep = 0; rep < reps; rep++)
    for (int j = 0; j < kBlocks; j++) {
      __m256i w[8];
      for (int g = 0; g < 8; g++)
        w[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(g_weights + (j * 8 + g) * 32));
      const __m256 s = _mm256_load_ps(g_scales + j * 16), mn = _mm256_load_ps(g_scales + j * 16 + 8);
      for (int r = 0; r < kRows; r++) {
        const int8_t* x = g_x + (r * kBlocks + j) * 32;
        __m256i pairs = _mm256_maddubs_epi16(w[0], broadcast4(x));
#pragma GCC unroll 7
        for (int g = 1; g < 8; g++)
          pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[g], broadcast4(x + 4 * g)));
        const __m256i dot = _mm256_madd_epi16(pairs, ones);
        const __m256 dx = _mm256_set1_ps(g_dx[r * kBlocks + j]);
        __m256 sum = _mm256_load_ps(g_sums + 8 * r);
        sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, dx), sum);
        sum = _mm256_fmadd_ps(mn, _mm256_set1_ps(g_dxs[r * kBlocks + j]), sum);
        _mm256_store_ps(g_sums + 8 * r, sum);
      }
    }
  const double s = seconds_since(t0);
  float sum = 0;
  for (float v : g_sums) sum += v;
  g_sink = sum;
  return double(reps) * kBlocks * 8 * kRows / s / 1e9;
}

// One row's step over a half-block without its chains (see mix_unchained above).
#define SPEC_BM(o, b, m) \
  "vpbroadcastd " #o "(%0), %%ymm" #b "\n\tvpmaddubsw %%ymm8, %%ymm9, %%ymm" #m "\n\t"
#define SPEC_ADD(d) "vpaddw %%ymm10, %%ymm11, %%ymm" #d "\n\t"
#define SPEC_ROW                                                                               \
  SPEC_BM(0, 0, 4) SPEC_ADD(12) SPEC_BM(4, 1, 5) SPEC_ADD(13) SPEC_BM(8, 2, 6) SPEC_ADD(12)      \
  SPEC_BM(12, 3, 7) SPEC_ADD(13) SPEC_BM(16, 0, 4) SPEC_ADD(12) SPEC_BM(20, 1, 5) SPEC_ADD(13)   \
  SPEC_BM(24, 2, 6) SPEC_ADD(12) SPEC_BM(28, 3, 7)                                               \
  "vpmaddwd %%ymm8, %%ymm9, %%ymm14\n\tvcvtdq2ps %%ymm10, %%ymm15\n\t"                          \
  "vbroadcastss (%1), %%ymm0\n\tvmulps %%ymm8, %%ymm9, %%ymm1\n\tvbroadcastss 4(%1), %%ymm2\n\t" \
  "vfmadd231ps %%ymm8, %%ymm9, %%ymm15\n\tvfmadd231ps %%ymm10, %%ymm11, %%ymm14\n\t"           \
  "vmovaps %%ymm14, (%2)\n\t"

double mix_unchained(long reps) {
  const auto t0 = std::chrono::steady_clock::now();
  for (long rep = 0; rep < reps; rep++)
    asm volatile(SPEC_ROW SPEC_ROW SPEC_ROW SPEC_ROW
                 :
                 : "r"(g_x), "r"(g_dx), "r"(g_sums)
                 : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm12",
                   "xmm13", "xmm14", "xmm15", "memory");
  return double(reps) * 4 * 8 / seconds_since(t0) / 1e9;
}

}  // namespace

int main() {
  fill_operands(g_weights, g_x, g_scales, g_dx, g_dxs);
  const double b = best_of(bare, 200000), fed = best_of(register_fed, 100000),
               shape = best_of(kernel_shape, 20000), mix = best_of(mix_unchained, 2000000);
  std::printf(
      "{\"bare_g_per_s\": %.3f, \"register_fed_g_per_s\": %.3f, \"kernel_shape_g_per_s\": %.3f, "
      "\"mix_unchained_g_per_s\": %.3f}\n",
      b, fed, shape, mix);
  return 0;
}
