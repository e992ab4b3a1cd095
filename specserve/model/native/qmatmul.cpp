// specserve._native: matrix products computed directly on packed GGUF blocks (layout.h).
//
// y[m, n] = sum_k x[m, k] * w[n, k] with x quantized to int8 per block of 32 (like
// llama.cpp's Q8_0 activations) and w in its GGUF integer form: integer dot products per
// block, then one fixed sequence of float operations per block. Each output is computed
// by the same operations whatever the number of rows M, the rows it is batched with, the
// thread count or the ISA path, so a k-token verify forward equals k single steps bit for
// bit. Threads split output columns, never the sum over k.
#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__GLIBC__)  // defined by the headers above on glibc systems
#include <malloc.h>  // mallopt
#endif
#include <string>
#include <vector>

#include "api.h"
#include "intrinsics.h"

// The Arm path needs the dot-product instructions: GCC compiles them under a target pragma
// (checked at run time before use); clang only where the target has them by default (Apple
// M-series: arm64-apple-macos), else the portable path runs.
#if defined(__aarch64__) && (defined(__ARM_FEATURE_DOTPROD) || !defined(__clang__))
#define SPECSERVE_NEON 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#endif

namespace specserve {

constexpr int64_t kRowChunk = 64;  // rows that share each decoded weight block
constexpr int kMaxRows = 4;         // rows per pass of the portable path

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(mant & 0x400)) {
      mant <<= 1;
      exp--;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest, ties to even, for |v| <= 2^22 (IEEE: identical on every path).
static inline float round_even(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return (v + magic) - magic;
}

// A block whose largest |v| is below this quantizes to zeros: 127 / amax would overflow to
// infinity near 3.7e-37, and infinity times a zero input is NaN, whose int8 cast is undefined.
// (Infinite or NaN activations, a model that has already overflowed, still give codes that
// may differ between paths.)
constexpr float kMinAmax = 1e-30f;

// One row's blocks of 32: scale amax / 127, codes rounded half to even, and the sums the
// kernels' offsets need. Each path supplies block_amax and block_codes (the largest |v|, and
// the codes with their two half sums): every step is exact per element, or an exact max
// and integer sum, so every path gives the same bits.
#define SPECSERVE_QUANTIZE_BODY                                                     \
  static void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* q, float* dx, \
                            float* dxs, int32_t* k6off, int32_t* off) {             \
    const int64_t nb = k / BLK;                                                     \
    for (int64_t r = 0; r < m; r++)                                                 \
      for (int64_t j = 0; j < nb; j++) {                                            \
        const float* v = x + r * k + j * BLK;                                       \
        const float amax = block_amax(v);                                           \
        const float inv = amax >= kMinAmax ? 127.0f / amax : 0.0f;                  \
        int32_t lo = 0, hi = 0;                                                     \
        block_codes(v, inv, q + r * k + j * BLK, &lo, &hi);                         \
        const float d = amax / 127.0f;                                              \
        dx[r * nb + j] = d;                                                         \
        dxs[r * nb + j] = d * static_cast<float>(lo + hi);                          \
        k6off[r * 2 * nb + 2 * j] = -32 * lo;                                       \
        k6off[r * 2 * nb + 2 * j + 1] = -32 * hi;                                   \
        int32_t* o = off + (r * nb + j) * kSymSlots;                                \
        o[0] = -8 * (lo + hi);                                                      \
        o[1] = -16 * (lo + hi);                                                     \
        o[2] = -128 * (lo + hi);                                                    \
        o[3] = 0;                                                                   \
      }                                                                             \
  }

namespace generic {
// NaN never passes `a > amax`: a NaN input is skipped, as the vector paths' max skips it.
static inline float block_amax(const float* v) {
  float amax = 0.0f;
  for (int i = 0; i < BLK; i++) {
    const float a = std::fabs(v[i]);
    amax = a > amax ? a : amax;
  }
  return amax;
}

static inline void block_codes(const float* v, float inv, int8_t* out, int32_t* lo, int32_t* hi) {
  for (int i = 0; i < BLK; i++) {
    out[i] = static_cast<int8_t>(round_even(v[i] * inv));
    (i < 16 ? *lo : *hi) += out[i];
  }
}
SPECSERVE_QUANTIZE_BODY
#include "kernel_generic.inc"
}  // namespace generic

#if defined(__x86_64__)
SPECSERVE_TARGET_BEGIN("avx2,fma,f16c")
namespace avx2 {
// The compiler leaves the scalar loops above unvectorized (a max that must skip NaN), which
// cost ~5% of the 1.5B's 16-token forward; these are the same steps in vector registers.
// max_ps(a, m) returns m when a is NaN, like `a > m ? a : m`; the max of the rest is exact.
static inline float block_amax(const float* v) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < BLK; i += 8)
    m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)), m);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

static inline int32_t sum_codes(__m256i a, __m256i b) {
  __m256i s = _mm256_add_epi32(a, b);
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
  return _mm_cvtsi128_si32(h);
}

static inline void block_codes(const float* v, float inv, int8_t* out, int32_t* lo, int32_t* hi) {
  const __m256 scale = _mm256_set1_ps(inv), magic = _mm256_set1_ps(12582912.0f);
  __m256i c[4];
  for (int i = 0; i < 4; i++) {  // round_even: (v * inv + magic) - magic, each step rounded
    const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), scale);
    c[i] = _mm256_cvtps_epi32(_mm256_sub_ps(_mm256_add_ps(p, magic), magic));
  }
  // Codes lie in [-127, 127]: the saturating packs are exact; permute undoes their lanes.
  const __m256i w =
      _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *lo += sum_codes(c[0], c[1]);
  *hi += sum_codes(c[2], c[3]);
}
SPECSERVE_QUANTIZE_BODY
#include "kernel_avx2.inc"
}  // namespace avx2
SPECSERVE_TARGET_END

SPECSERVE_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
namespace avx512 {
// As the AVX2 path's, 16 lanes at a time.
static inline float block_amax(const float* v) {
  __m512 m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v)), _mm512_setzero_ps());
  m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v + 16)), m);
  __m256 h = _mm256_max_ps(_mm512_castps512_ps256(m), _mm512_extractf32x8_ps(m, 1));
  __m128 g = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  g = _mm_max_ps(g, _mm_movehl_ps(g, g));
  g = _mm_max_ss(g, _mm_movehdup_ps(g));
  return _mm_cvtss_f32(g);
}

static inline void block_codes(const float* v, float inv, int8_t* out, int32_t* lo, int32_t* hi) {
  const __m512 scale = _mm512_set1_ps(inv), magic = _mm512_set1_ps(12582912.0f);
  for (int i = 0; i < 2; i++) {
    const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(v + 16 * i), scale);
    const __m512i c = _mm512_cvtps_epi32(_mm512_sub_ps(_mm512_add_ps(p, magic), magic));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * i), _mm512_cvtepi32_epi8(c));
    *(i == 0 ? lo : hi) += _mm512_reduce_add_epi32(c);
  }
}
SPECSERVE_QUANTIZE_BODY
#include "kernel_avx512.inc"
}  // namespace avx512
SPECSERVE_TARGET_END
#endif

#if defined(SPECSERVE_NEON)
#if !defined(__ARM_FEATURE_DOTPROD)
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif
namespace neon {
#include "kernel_neon.inc"
}  // namespace neon
#if !defined(__ARM_FEATURE_DOTPROD)
#pragma GCC pop_options
#endif
#endif

enum Isa : int { GENERIC = 0, AVX2 = 1, AVX512 = 2, NEON = 3, kIsaCount = 4 };
[[maybe_unused]] static const char* kIsaNames[] = {"generic", "avx2", "avx512", "neon"};
static const int kPreferred[] = {AVX512, AVX2, NEON};  // fastest first

static bool neon_supported() {
#if defined(SPECSERVE_NEON) && defined(__APPLE__)
  return true;  // every arm64 Mac (M1 and later) has the dot-product instructions
#elif defined(SPECSERVE_NEON) && defined(__linux__)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
  return false;
#endif
}

#if defined(__x86_64__)
// F16C by cpuid: clang's __builtin_cpu_supports has no name for it (the AVX2 test covers the
// operating system's support of the registers).
static bool has_f16c() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}
#endif

static bool isa_supported(int isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == AVX2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
  if (isa == AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512dq");
#endif
  if (isa == NEON) return neon_supported();
  return isa == GENERIC;
}

static int best_isa() {
  for (int isa : kPreferred)
    if (isa_supported(isa)) return isa;
  return GENERIC;
}

static int g_isa = best_isa();
static Pool g_pool;

Pool& pool() { return g_pool; }
int current_isa() { return g_isa; }

// Tiles are handed out in small chunks (pool.h), so a thread that the OS delays costs a
// call one chunk, not half the matmul. Which thread computes a tile never changes it.
constexpr int64_t kTilesPerChunk = 16;

struct Job {
  const std::vector<PackedWeights>* parts;
  int64_t total_tiles;
  const QuantizedRows* rows;
  float* out;
  int64_t ldo;
  int isa;
  int64_t chunks;     // tile chunks per row chunk
  int64_t row_chunk;  // rows per row chunk (<= kRowChunk)
};

static void run_tiles(const Job& job, const PackedWeights& pw, int64_t t, int64_t r0,
                      int64_t r1) {
#if defined(__x86_64__)
  if (job.isa == AVX512) {
    avx512::tile_rows(pw, t, *job.rows, r0, static_cast<int>(r1 - r0), job.out, job.ldo);
    return;
  }
  if (job.isa == AVX2) {
    avx2::tile_rows(pw, t, *job.rows, r0, static_cast<int>(r1 - r0), job.out, job.ldo);
    return;
  }
#endif
#if defined(SPECSERVE_NEON)
  if (job.isa == NEON) {
    neon::tile_rows(pw, t, *job.rows, r0, static_cast<int>(r1 - r0), job.out, job.ldo);
    return;
  }
#endif
  for (int64_t r = r0; r < r1; r += kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, r1 - r));
    generic::tile_rows(pw, t, *job.rows, r, rows, job.out, job.ldo);
  }
}

// Work item i covers row chunk c = i / chunks (rows [c r, c r + r), r = row_chunk) of tile
// chunk i % chunks, row chunk by row chunk:
// the rows' activations stay in cache while the weights stream past.
static void run_item(void* ctx, int64_t item) {
  const Job& job = *static_cast<const Job*>(ctx);
  const int64_t r0 = (item / job.chunks) * job.row_chunk;
  const int64_t r1 = std::min(job.rows->m, r0 + job.row_chunk);
  const int64_t lo = (item % job.chunks) * kTilesPerChunk;
  const int64_t hi = std::min(job.total_tiles, lo + kTilesPerChunk);
  int64_t base = 0;
  for (const PackedWeights& pw : *job.parts) {
    for (int64_t t = std::max(lo, base); t < std::min(hi, base + pw.tiles); t++)
      run_tiles(job, pw, t - base, r0, r1);
    base += pw.tiles;
  }
}

// Activations are quantized row by row on every thread (no bit depends on how they are
// shared out).
constexpr int64_t kQuantizeRows = 4;

static void quantize(const float* x, int64_t m, int64_t k, int8_t* q, float* dx, float* dxs,
                     int32_t* k6off, int32_t* off) {
#if defined(__x86_64__)
  if (g_isa == AVX512) return avx512::quantize_rows(x, m, k, q, dx, dxs, k6off, off);
  if (g_isa == AVX2) return avx2::quantize_rows(x, m, k, q, dx, dxs, k6off, off);
#endif
  generic::quantize_rows(x, m, k, q, dx, dxs, k6off, off);
}

struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> dx, dxs;
  std::vector<int32_t> k6off, off;
};

void linear(const float* x, int64_t m, int64_t k, float* out, int64_t ldo,
            const std::vector<PackedWeights>& parts) {
  static thread_local Scratch scratch;
  const int64_t nb = k / BLK;
  scratch.q.resize(m * k);
  scratch.dx.resize(m * nb);
  scratch.dxs.resize(m * nb);
  scratch.k6off.resize(m * 2 * nb);
  scratch.off.resize(m * nb * kSymSlots);
  // The calling thread's buffers (`scratch` is thread-local: not named in the lambda).
  QuantizedRows rows{scratch.q.data(),   scratch.dx.data(),  scratch.dxs.data(),
                     scratch.k6off.data(), scratch.off.data(), m, k};
  int8_t* q = scratch.q.data();
  float *dx = scratch.dx.data(), *dxs = scratch.dxs.data();
  int32_t *k6off = scratch.k6off.data(), *off = scratch.off.data();
  g_pool.for_rows(m, kQuantizeRows, [=](int64_t r0, int64_t r1) {
    quantize(x + r0 * k, r1 - r0, k, q + r0 * k, dx + r0 * nb, dxs + r0 * nb, k6off + r0 * 2 * nb,
             off + r0 * nb * kSymSlots);
  });
  int64_t total = 0;
  for (const PackedWeights& pw : parts) total += pw.tiles;
  const int64_t chunks = (total + kTilesPerChunk - 1) / kTilesPerChunk;
  // Each row chunk streams every weight once: 130 rows as 44 + 43 + 43, not 64 + 64 + 2, whose
  // last pass would read all the weights for 2 rows (a verify of 64 drafts is 65 rows).
  const int64_t row_chunks = (m + kRowChunk - 1) / kRowChunk;
  const int64_t row_chunk = row_chunks > 0 ? (m + row_chunks - 1) / row_chunks : 1;
  Job job{&parts, total, &rows, out, ldo, g_isa, chunks, row_chunk};
  g_pool.run(run_item, &job, chunks * row_chunks);
}

}  // namespace specserve

// ---- Python bindings -------------------------------------------------------------------
#if !defined(SPECSERVE_NO_PYTHON)  // tests/native/kernel_paths.cpp builds the kernels alone

using specserve::PackedWeights;

static bool parse_part(PyObject* item, int64_t k, PackedWeights* pw) {
  long long mode, qbits, q, s, d, tiles, col0;
  if (!PyArg_ParseTuple(item, "LLLLLLL", &mode, &qbits, &q, &s, &d, &tiles, &col0)) return false;
  const bool super_blocks = mode == specserve::KAFFINE || mode == specserve::K6;
  // The (mode, bits) pairs that GGUF types produce; the AVX-512 path has code for these.
  const bool known = (mode == specserve::SYM16 && (qbits == 4 || qbits == 5 || qbits == 8)) ||
                     (mode == specserve::AFFINE16 && qbits == 4) ||
                     (mode == specserve::KAFFINE && (qbits == 4 || qbits == 5)) ||
                     (mode == specserve::K6 && qbits == 6);
  if (!known || tiles < 0 || (super_blocks && k % (specserve::BLK * specserve::SUPER) != 0)) {
    PyErr_SetString(PyExc_ValueError, "invalid packed weight part");
    return false;
  }
  *pw = PackedWeights{static_cast<int>(mode), static_cast<int>(qbits),
                      reinterpret_cast<const uint8_t*>(q), reinterpret_cast<const uint8_t*>(s),
                      reinterpret_cast<const uint16_t*>(d), tiles, k, col0};
  return true;
}

bool specserve::parse_parts(PyObject* tuple, int64_t k, std::vector<PackedWeights>* parts) {
  parts->resize(PyTuple_GET_SIZE(tuple));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++)
    if (!parse_part(PyTuple_GET_ITEM(tuple, i), k, &(*parts)[i])) return false;
  return true;
}

static PyObject* py_linear(PyObject*, PyObject* args) {
  long long x, m, k, out, ldo;
  PyObject* parts_obj;
  if (!PyArg_ParseTuple(args, "LLLLLO!", &x, &m, &k, &out, &ldo, &PyTuple_Type, &parts_obj))
    return nullptr;
  if (m < 0 || k <= 0 || k % specserve::BLK != 0) {
    PyErr_SetString(PyExc_ValueError, "input width must be a multiple of 32");
    return nullptr;
  }
  std::vector<PackedWeights> parts;
  if (!specserve::parse_parts(parts_obj, k, &parts)) return nullptr;
  Py_BEGIN_ALLOW_THREADS;
  specserve::linear(reinterpret_cast<const float*>(x), m, k, reinterpret_cast<float*>(out), ldo,
                    parts);
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}

static PyObject* py_set_threads(PyObject*, PyObject* args) {
  int n;
  if (!PyArg_ParseTuple(args, "i", &n)) return nullptr;
  if (n < 1) {
    PyErr_SetString(PyExc_ValueError, "threads must be >= 1");
    return nullptr;
  }
  if (n != specserve::g_pool.size()) specserve::g_pool.resize(n);
  Py_RETURN_NONE;
}

static PyObject* py_park(PyObject*, PyObject*) {
  specserve::g_pool.park();
  Py_RETURN_NONE;
}

static PyObject* py_threads(PyObject*, PyObject*) {
  return PyLong_FromLong(specserve::g_pool.size());
}

static PyObject* py_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(specserve::kIsaNames[specserve::g_isa]);
}

static PyObject* py_supported_isas(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  for (int isa = specserve::GENERIC; isa < specserve::kIsaCount; isa++)
    if (specserve::isa_supported(isa))
      PyList_Append(list, PyUnicode_FromString(specserve::kIsaNames[isa]));
  return list;
}

static PyObject* py_set_isa(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  for (int isa = specserve::GENERIC; isa < specserve::kIsaCount; isa++)
    if (std::string(name) == specserve::kIsaNames[isa]) {
      if (!specserve::isa_supported(isa)) {
        PyErr_Format(PyExc_ValueError, "this CPU does not support the %s path", name);
        return nullptr;
      }
      specserve::g_isa = isa;
      Py_RETURN_NONE;
    }
  PyErr_Format(PyExc_ValueError, "unknown ISA path %s (generic, avx2, avx512, neon)", name);
  return nullptr;
}

static PyMethodDef kMethods[] = {
    {"linear", py_linear, METH_VARARGS,
     "linear(x_ptr, M, K, out_ptr, ldo, parts): out[:, part columns] = x @ W.T"},
    {"layer_forward", py_layer_forward, METH_VARARGS,
     "one Llama-family decoder layer on the residual stream, in place (layer.cpp)"},
    {"exp_fixed", py_exp_fixed, METH_VARARGS,
     "exp_fixed(x_ptr, n, out_ptr): the layer's exp (SiLU, softmax) on n floats (tests)"},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n): threads per matmul"},
    {"threads", py_threads, METH_NOARGS, "threads per matmul"},
    {"park", py_park, METH_NOARGS, "park(): the workers sleep now, not after spinning (idle)"},
    {"isa", py_isa, METH_NOARGS, "the kernel path in use: generic, avx2, avx512 or neon"},
    {"supported_isas", py_supported_isas, METH_NOARGS, "paths this CPU can run"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa(name): choose a path (tests)"},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native",
                              "Quantized matmul on packed GGUF blocks.", -1, kMethods};

// glibc serves an allocation above its mmap threshold (128 KB at start) with a fresh mapping,
// faulted in page by page and unmapped on free; it raises the threshold only after such a
// block is freed. The layer's buffers are kept (layer.cpp), so nothing raised it any more, and
// every forward's logits (16 rows of the 1.5B: 9.7 MB) cost ~2,400 page faults. The module
// sets the thresholds where glibc's own adjustment ends (32 MB; trim at twice that), so blocks
// of a forward are reused from the heap. Other C libraries keep their defaults.
static void keep_large_blocks() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
}

PyMODINIT_FUNC PyInit__native(void) {
  keep_large_blocks();
  return PyModule_Create(&kModule);
}
#endif  // SPECSERVE_NO_PYTHON
