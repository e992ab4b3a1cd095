// One decoder layer of the Llama family (Llama, SmolLM2, Qwen2) and Gemma 3 in one native call:
//   x += o_proj(attention(rope(qkv(rmsnorm(x)))));  x += down(silu(gate) * up)
// Gemma 3 adds a norm on each query and key head, norms on both outputs, tanh-GELU, and a
// sliding window on most layers.
// Python's ~30 small ops per layer cost more than the matmuls on small models; here they
// are loops over rows. Every row (one token of one sequence) goes through the same
// operations in the same order whatever the batch: attention reads keys 0..position one by
// one, so a k-token verify equals k single steps bit for bit, and batched rows equal each
// alone.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "api.h"
#include "intrinsics.h"

namespace specserve {

constexpr int kLanes = 16;  // fixed partial sums: the reduction order never depends on M

// A float buffer every element of which is written before it is read: no zero fill (a
// std::vector's memset was 3% of a prefill). Each of a block's buffers has its own slot,
// kept per thread and grown, never shrunk: a fresh allocation per layer (a 512-token
// prefill's gate/up product is 36 MB, above glibc's mmap threshold) was mapped, faulted in
// page by page and unmapped again 28 times per forward: 475,000 page faults per 1.5B
// prefill, ~3% of its time (A/B). What a slot keeps is bounded by the scheduler's prefill
// chunk (512 rows): for the 1.5B model about 60 MB, the size the first prefill reaches anyway.
class Buffer {
 public:
  static constexpr int kSlots = 4;  // a block uses slots 0..3; the blocks run one at a time

  Buffer(int slot, int64_t n) {
    static thread_local std::unique_ptr<float[]> store[kSlots];
    static thread_local int64_t capacity[kSlots] = {};
    if (n > capacity[slot]) {
      store[slot].reset();  // free the old one first: the peak stays one buffer per slot
      store[slot].reset(new float[n]);
      capacity[slot] = n;
    }
    data_ = store[slot].get();
  }
  float* data() { return data_; }
  float& operator[](int64_t i) { return data_[i]; }

 private:
  float* data_;
};

struct Layer {
  int64_t c, heads, kv_heads, d, ffn, max_len;
  float eps, scale;
  const float *attn_norm, *ffn_norm, *qkv_bias, *cos, *sin;
  // Gemma 3's extra norms (null elsewhere; q_norm and k_norm come together): each query and
  // key head before RoPE, and the attention's and the MLP's outputs before they join the
  // residual stream.
  const float *q_norm, *k_norm, *post_attn_norm, *post_ffw_norm;
  int64_t window;  // 0: a query sees every key before it; else only the last `window`
  int64_t gelu;    // the MLP's activation: 0 SiLU, 1 tanh-GELU (Gemma)
  float *keys, *values;
  std::vector<PackedWeights> qkv, o, gate_up, down;
};

namespace generic {
#include "layer_body.inc"
}  // namespace generic

#if defined(__x86_64__)
SPECSERVE_TARGET_BEGIN("avx2,fma")
namespace avx2 {
#define SPECSERVE_ATTENTION_AVX2 1
#include "layer_body.inc"
#undef SPECSERVE_ATTENTION_AVX2
}  // namespace avx2
SPECSERVE_TARGET_END

SPECSERVE_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
#define SPECSERVE_ATTENTION_AVX512 1
#include "layer_body.inc"
#undef SPECSERVE_ATTENTION_AVX512
}  // namespace avx512
SPECSERVE_TARGET_END
#endif

namespace {

bool parse_layer(PyObject* args, Layer* L, long long* x, long long* m, long long* slot,
                 long long* pos) {
  long long an, fn, bias, qn, kn, pan, pfn, cos, sin, keys, values, window, gelu;
  PyObject *qkv, *o, *gate_up, *down;
  if (!PyArg_ParseTuple(args, "LLLL(LLLLLLffLLLLLLLLLLLLL)(O!O!O!O!)", x, m, slot, pos, &L->c,
                        &L->heads, &L->kv_heads, &L->d, &L->ffn, &L->max_len, &L->eps,
                        &L->scale, &an, &fn, &bias, &qn, &kn, &pan, &pfn, &cos, &sin, &keys,
                        &values, &window, &gelu, &PyTuple_Type, &qkv, &PyTuple_Type, &o,
                        &PyTuple_Type, &gate_up, &PyTuple_Type, &down))
    return false;
  auto f = [](long long p) { return reinterpret_cast<float*>(p); };
  L->attn_norm = f(an);
  L->ffn_norm = f(fn);
  L->qkv_bias = f(bias);
  L->q_norm = f(qn);
  L->k_norm = f(kn);
  L->post_attn_norm = f(pan);
  L->post_ffw_norm = f(pfn);
  L->window = window;
  L->gelu = gelu;
  L->cos = f(cos);
  L->sin = f(sin);
  L->keys = f(keys);
  L->values = f(values);
  if (L->d % kLanes != 0 || L->c % kLanes != 0 || L->heads % L->kv_heads != 0) {
    PyErr_SetString(PyExc_ValueError, "native layer: unsupported head or model width");
    return false;
  }
  return parse_parts(qkv, L->c, &L->qkv) && parse_parts(o, L->heads * L->d, &L->o) &&
         parse_parts(gate_up, L->c, &L->gate_up) && parse_parts(down, L->ffn, &L->down);
}

}  // namespace
}  // namespace specserve

// layer_forward(x_ptr, M, slot_ptr, pos_ptr, (dims, scalars, pointers, window, gelu),
//               (qkv, o, gate_up, down))
// updates the residual stream x [M, C] in place and writes the layer's KV cache.
PyObject* py_layer_forward(PyObject*, PyObject* args) {
  specserve::Layer layer;
  long long x, m, slot, pos;
  if (!specserve::parse_layer(args, &layer, &x, &m, &slot, &pos)) return nullptr;
  float* rows = reinterpret_cast<float*>(x);
  const auto* slots = reinterpret_cast<const int64_t*>(slot);
  const auto* positions = reinterpret_cast<const int64_t*>(pos);
  Py_BEGIN_ALLOW_THREADS;
#if defined(__x86_64__)
  if (specserve::current_isa() == 2) {
    specserve::avx512::attention_block(layer, rows, m, slots, positions);
    specserve::avx512::mlp_block(layer, rows, m);
  } else if (specserve::current_isa() == 1) {
    specserve::avx2::attention_block(layer, rows, m, slots, positions);
    specserve::avx2::mlp_block(layer, rows, m);
  } else
#endif
  {
    specserve::generic::attention_block(layer, rows, m, slots, positions);
    specserve::generic::mlp_block(layer, rows, m);
  }
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}

// exp_fixed(x_ptr, n, out_ptr): the layer's exp on n floats, by the current ISA path (tests).
PyObject* py_exp_fixed(PyObject*, PyObject* args) {
  long long x, n, out;
  if (!PyArg_ParseTuple(args, "LLL", &x, &n, &out)) return nullptr;
  const float* in = reinterpret_cast<const float*>(x);
  float* res = reinterpret_cast<float*>(out);
#if defined(__x86_64__)
  if (specserve::current_isa() == 2) {
    specserve::avx512::exp_all(in, n, res);
    Py_RETURN_NONE;
  }
  if (specserve::current_isa() == 1) {
    specserve::avx2::exp_all(in, n, res);
    Py_RETURN_NONE;
  }
#endif
  specserve::generic::exp_all(in, n, res);
  Py_RETURN_NONE;
}
