"""Builds the native quantized-matmul extension; everything else is in pyproject.toml.

The extension is optional: where it cannot be compiled, the package still installs and the
runtime uses its PyTorch formats (``specserve.model.qlinear.native_available``).
"""

from setuptools import Extension, setup

NATIVE = "specserve/model/native/"

setup(
    ext_modules=[
        Extension(
            "specserve.model._native",
            sources=[NATIVE + "qmatmul.cpp", NATIVE + "layer.cpp"],
            depends=[
                NATIVE + name
                for name in (
                    "api.h",
                    "intrinsics.h",
                    "layout.h",
                    "pool.h",
                    "kernel_generic.inc",
                    "kernel_avx2.inc",
                    "kernel_neon.inc",
                    "kernel_avx512.inc",
                    "kernel_dispatch.inc",
                    "layer_body.inc",
                    "attention_avx512.inc",
                    "attention_avx2.inc",
                )
            ],
            # No -march: each ISA path is compiled by target pragmas and chosen at run time.
            # -ffp-contract=off keeps the written order of float operations on every path.
            # -fno-trapping-math (clang's default) changes no value: it lets GCC vectorize
            # loops with a branch, such as exp_fixed's clamp, without AVX-512's masks.
            extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math"],
            language="c++",
            optional=True,
        )
    ]
)
