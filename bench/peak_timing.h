// Timing helpers shared by the instruction-rate probes (vnni_peak.cpp, maddubs_peak.cpp).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The best (highest) of 5 runs of f(reps), a rate.
template <class F>
double best_of(F f, long reps) {
  double best = 0;
  for (int i = 0; i < 5; i++) {
    const double v = f(reps);
    best = v > best ? v : best;
  }
  return best;
}

// Fills the probes' operand arrays at run time with a fixed pseudo-random sequence (bytes for
// weights and activations, floats of the given size for scales). Arrays that nothing writes
// are zeros the compiler knows of: GCC then folded most of kernel_shape's float step away
// (8 conversions and 7 FMAs left per block of 8 rows, where the kernel does 24 float ops),
// and the loop reported ~10% more than the kernel's shape allows.
struct Filler {
  uint32_t state = 12345;
  uint32_t next() {
    state = state * 1664525u + 1013904223u;  // a linear congruential step
    return state >> 8;
  }
  template <class T>
  void bytes(T* p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = static_cast<T>(next());
  }
  void floats(float* p, size_t n, float size) {
    for (size_t i = 0; i < n; i++) p[i] = size * (0.5f + static_cast<float>(next() & 0xFFFF) / 65536.0f);
  }
};

// A probe's arrays: weight and activation bytes, then scales, activation scales and their
// sums near 1e-3 (small enough that no sum overflows over a probe's repetitions).
template <class W, size_t NW, class X, size_t NX, size_t NS, size_t ND>
void fill_operands(W (&weights)[NW], X (&x)[NX], float (&scales)[NS], float (&dx)[ND],
                   float (&dxs)[ND]) {
  Filler fill;
  fill.bytes(weights, NW);
  fill.bytes(x, NX);
  fill.floats(scales, NS, 1e-3f);
  fill.floats(dx, ND, 1e-3f);
  fill.floats(dxs, ND, 1e-3f);
}
