// The engine compiled for AVX-512 (F, VL, BW, DQ; with POPCNT), chosen at run time where
// the CPU has it.
// The instruction set is set here with a target pragma, not a -m flag, so
// the library as a whole stays loadable on any x86-64 CPU; the op picks
// this variant at run time (antman_kernels.cc).
#include <immintrin.h>  // masked moves; gathers of the sparse term
#include <omp.h>
#include <sched.h>

#include <cstdint>

#include "custom_ops/cc/kernels/rnn_engine.h"

#if defined(__clang__)
#pragma clang attribute push(                                          \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target(                                                    \
    "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt,prefer-vector-width=512")
#endif

namespace keras_antman {
namespace avx512 {
#define KA_VBYTES 64
#include "custom_ops/cc/kernels/rnn_engine_impl.h"
#undef KA_VBYTES
}  // namespace avx512
}  // namespace keras_antman

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
