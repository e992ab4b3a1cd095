// What the extension's translation units share: the matmul, the pool and the ISA choice.
#pragma once

#if !defined(SPECSERVE_NO_PYTHON)
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <vector>

#include "layout.h"
#include "pool.h"

namespace specserve {

// out[:, part columns] = x @ W.T for every part (qmatmul.cpp).
void linear(const float* x, int64_t m, int64_t k, float* out, int64_t ldo,
            const std::vector<PackedWeights>& parts);

Pool& pool();

// The kernel path in use: 0 generic, 1 AVX2, 2 AVX-512, 3 Arm dot product (qmatmul.cpp's Isa).
int current_isa();

#if !defined(SPECSERVE_NO_PYTHON)
// A Python tuple of parts -> PackedWeights for input width k; false with an exception set.
bool parse_parts(PyObject* tuple, int64_t k, std::vector<PackedWeights>* parts);
#endif

}  // namespace specserve

#if !defined(SPECSERVE_NO_PYTHON)
PyObject* py_layer_forward(PyObject* self, PyObject* args);
PyObject* py_exp_fixed(PyObject* self, PyObject* args);
#endif
