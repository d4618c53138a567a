// The engine compiled for the x86-64 baseline (SSE2), for CPUs without
// AVX2 + FMA.
// The instruction set is set here with a target pragma, not a -m flag, so
// the library as a whole stays loadable on any x86-64 CPU; the op picks
// this variant at run time (antman_kernels.cc).
#include <omp.h>
#include <sched.h>

#include <cstdint>

#include "custom_ops/cc/kernels/rnn_engine.h"

namespace keras_antman {
namespace generic {
#define KA_VBYTES 16
#include "custom_ops/cc/kernels/rnn_engine_impl.h"
#undef KA_VBYTES
}  // namespace generic
}  // namespace keras_antman
