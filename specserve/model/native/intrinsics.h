// The x86 intrinsics of the AVX2 and AVX-512 paths. GCC 12's AVX-512 headers fill the
// operands an instruction ignores from a variable set to itself (`__m512 __Y = __Y;`), and
// -Wall reports each inlined use as maybe-uninitialized: ~300 false warnings a build (GCC
// bug 105593, fixed in GCC 13). Silenced for the headers' own lines, nowhere else.
#pragma once

#if defined(__x86_64__)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <cpuid.h>
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// A region of functions compiled for more instructions than the build's baseline (a path
// chosen at run time): GCC's target pragmas, or clang's attribute pragma, which does the
// same for every function declared between the two (clang ignores GCC's).
#define SPECSERVE_PRAGMA(text) _Pragma(#text)
#if defined(__clang__)
#define SPECSERVE_TARGET_BEGIN(isa) \
  SPECSERVE_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define SPECSERVE_TARGET_END SPECSERVE_PRAGMA(clang attribute pop)
#else
#define SPECSERVE_TARGET_BEGIN(isa) \
  SPECSERVE_PRAGMA(GCC push_options) SPECSERVE_PRAGMA(GCC target(isa))
#define SPECSERVE_TARGET_END SPECSERVE_PRAGMA(GCC pop_options)
#endif
