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
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif
