// Timing helpers shared by the instruction-rate probes (vnni_peak.cpp, maddubs_peak.cpp).
#pragma once

#include <chrono>

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
