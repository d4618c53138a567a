// The engine compiled for AVX2 + FMA, the portable fast path.
// The instruction set is set here with a target pragma, not a -m flag, so
// the library as a whole stays loadable on any x86-64 CPU; the op picks
// this variant at run time (antman_kernels.cc).
#include <immintrin.h>  // masked moves; gathers of the sparse term
#include <omp.h>
#include <sched.h>

#include <cstdint>

#include "custom_ops/cc/kernels/rnn_engine.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace keras_antman {
namespace avx2 {
#define KA_VBYTES 32
#include "custom_ops/cc/kernels/rnn_engine_impl.h"
#undef KA_VBYTES
}  // namespace avx2
}  // namespace keras_antman

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
