// Every kernel path of this build that the CPU runs, checked against the portable one bit for
// bit: random packed blocks of each (mode, bits) pair that GGUF types produce, 1 to 65 rows,
// on two threads, and each row of a many-row product against that row alone. It needs no
// Python, so it also runs where the package cannot be tested here: the Arm path, built by
// a cross compiler and run under qemu-aarch64 (tests/unit/test_kernel_paths.py).
//
//   g++ -O2 -std=c++17 -ffp-contract=off -fno-trapping-math -pthread kernel_paths.cpp
//   ./a.out [--require PATH]    exit 0: every path bit-identical; 1: a mismatch; 2: PATH absent
#define SPECSERVE_NO_PYTHON 1
#include "../../specserve/model/native/qmatmul.cpp"

#include <cstdio>

namespace {

using specserve::PackedWeights;

struct Rng {
  uint64_t state = 0x9E3779B97F4A7C15ull;
  uint32_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(state >> 33);
  }
};

// A finite f16 between 2^-6 and 2^2 in magnitude, either sign.
uint16_t random_half(Rng& rng) {
  const uint32_t r = rng.next();
  return static_cast<uint16_t>(((r & 1) << 15) | ((9 + (r >> 1) % 8) << 10) | ((r >> 4) & 0x3FF));
}

struct Case {
  int mode, qbits;
  const char* type;
};

const Case kCases[] = {
    {specserve::SYM16, 4, "Q4_0"},    {specserve::SYM16, 5, "Q5_0"},
    {specserve::SYM16, 8, "Q8_0"},    {specserve::AFFINE16, 4, "Q4_1"},
    {specserve::KAFFINE, 4, "Q4_K"}, {specserve::KAFFINE, 5, "Q5_K"},
    {specserve::K6, 6, "Q6_K"},
};
const int64_t kRowCounts[] = {1, 2, 3, 4, 5, 8, 16, 17, 32, 33, 65};
constexpr int64_t kTiles = 3, kK = 512, kN = kTiles * specserve::TILE;

struct Matrix {
  std::vector<uint8_t> q, s;
  std::vector<uint16_t> d;
  PackedWeights packed(const Case& c) const {
    return PackedWeights{c.mode, c.qbits, q.data(), s.data(), d.data(), kTiles, kK, 0};
  }
};

Matrix random_matrix(const Case& c, Rng& rng) {
  const int64_t blocks = kTiles * (kK / specserve::BLK);
  Matrix w;
  w.q.resize(blocks * specserve::q_block_bytes(c.qbits));
  for (auto& b : w.q) b = static_cast<uint8_t>(rng.next());
  w.s.resize(blocks * specserve::s_block_bytes(c.mode));
  if (c.mode == specserve::SYM16 || c.mode == specserve::AFFINE16) {
    for (size_t i = 0; i < w.s.size(); i += 2) {
      const uint16_t h = random_half(rng);
      std::memcpy(&w.s[i], &h, 2);
    }
  } else {
    for (auto& b : w.s) b = static_cast<uint8_t>(rng.next());  // u8 or i8 sub-scales
  }
  w.d.resize(blocks / specserve::SUPER * specserve::d_super_halves(c.mode) + 1);
  for (auto& h : w.d) h = random_half(rng);
  return w;
}

std::vector<float> product(int isa, const std::vector<float>& x, int64_t m, const Matrix& w,
                           const Case& c) {
  specserve::g_isa = isa;
  std::vector<float> out(m * kN);
  specserve::linear(x.data(), m, kK, out.data(), kN, {w.packed(c)});
  return out;
}

// 0 when `isa` gives the portable path's bits for every row count, and each row alone.
int check(int isa, const Case& c, Rng& rng) {
  const Matrix w = random_matrix(c, rng);
  for (int64_t m : kRowCounts) {
    std::vector<float> x(m * kK);
    for (auto& v : x)  // -10.03 .. 10.03
      v = static_cast<float>(static_cast<int32_t>(rng.next() % 20001) - 10000) / 997.0f;
    const std::vector<float> want = product(specserve::GENERIC, x, m, w, c);
    const std::vector<float> got = product(isa, x, m, w, c);
    for (int64_t i = 0; i < m * kN; i++)
      if (std::memcmp(&want[i], &got[i], sizeof(float)) != 0) {
        std::printf("%s %s M=%lld: row %lld column %lld: %.9g, portable path %.9g\n",
                    specserve::kIsaNames[isa], c.type, static_cast<long long>(m),
                    static_cast<long long>(i / kN), static_cast<long long>(i % kN), got[i],
                    want[i]);
        return 1;
      }
    const int64_t last = m - 1;  // the last row alone equals its row in the batch
    const std::vector<float> row(x.begin() + last * kK, x.end());
    const std::vector<float> alone = product(isa, row, 1, w, c);
    if (std::memcmp(alone.data(), got.data() + last * kN, kN * sizeof(float)) != 0) {
      std::printf("%s %s: row %lld of %lld differs from the row alone\n",
                  specserve::kIsaNames[isa], c.type, static_cast<long long>(last),
                  static_cast<long long>(m));
      return 1;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  specserve::g_pool.resize(2);
  const char* required = argc == 3 && std::string(argv[1]) == "--require" ? argv[2] : nullptr;
  bool found = required == nullptr;
  Rng rng;
  int failed = 0;
  for (int isa : specserve::kPreferred) {
    if (!specserve::isa_supported(isa)) continue;
    found = found || std::string(required) == specserve::kIsaNames[isa];
    for (const Case& c : kCases) failed |= check(isa, c, rng);
    std::printf("%s: %s\n", specserve::kIsaNames[isa], failed ? "MISMATCH" : "bit-identical");
  }
  if (!found) {
    std::printf("this CPU does not run the %s path\n", required);
    return 2;
  }
  return failed;
}
