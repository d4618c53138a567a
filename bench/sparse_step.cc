// The recurrent sparse term's step and the input term on their own: the
// AVX-512 engine's SparseSlices (one step, batch 1) and SparseRowsAdd (100
// rows) on a random S [800, 3200] of the given density, thread CPU time,
// best of 5 runs, checked against a plain sum. For the before/after of the
// sparse kernels (bench/results/doping_speed.md). Build and run from the
// repository root (AVX-512 CPU):
//   g++ -std=c++17 -O3 -fopenmp -ffp-contract=fast -I. -o /tmp/ss bench/sparse_step.cc
//   /tmp/ss [density=0.04875] [form: 0 auto, 1 gathered, 2 windowed] [seed]
#include <immintrin.h>
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "custom_ops/cc/kernels/sparse_pack.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt," \
                   "prefer-vector-width=512")
namespace keras_antman {
namespace avx512 {
#define KA_VBYTES 64
#include "custom_ops/cc/kernels/rnn_engine_impl.h"
#undef KA_VBYTES

double Now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int Main(int argc, char** argv) {
  const int64_t n = 800, m = 3200, rows = 100;
  const double density = argc > 1 ? atof(argv[1]) : 0.04875;
  const int form = argc > 2 ? atoi(argv[2]) : 0;
  std::mt19937 rng(argc > 3 ? atoi(argv[3]) : 1);
  std::uniform_real_distribution<float> u(0, 1);
  std::vector<int32_t> rp(m + 1, 0), ci;
  std::vector<float> va;
  for (int64_t j = 0; j < m; ++j) {
    for (int32_t i = 0; i < n; ++i)
      if (u(rng) < density) {
        ci.push_back(i);
        va.push_back(u(rng) - 0.5f);
      }
    rp[j + 1] = static_cast<int32_t>(ci.size());
  }
  const int64_t nnz = static_cast<int64_t>(ci.size());
  double t0 = Now();
  auto p = PackSparse(1 + form, n, m, rp.data(), ci.data(), va.data(), nnz);
  const double pack = Now() - t0;
  SparseTerm sp{rp.data(), ci.data(), va.data(), nnz};
  p->Attach(&sp);
  // x 64-byte aligned, as the op's h (rows of its 64-byte aligned
  // scratch): the blocks' loads never split a cache line.
  std::vector<float> res(m), x_buf(n + 80);
  float* x = x_buf.data() +
             (64 - reinterpret_cast<uintptr_t>(x_buf.data()) % 64) % 64 / 4;
  for (int64_t i = 0; i < n + 64; ++i) x[i] = u(rng) - 0.5f;
  sp.result = res.data();
  SparseSlices(sp, x, n, 1, m, 0, 1);
  double err = 0;
  for (int64_t j = 0; j < m; ++j) {
    double a = 0;
    for (int k = rp[j]; k < rp[j + 1]; ++k) a += va[k] * x[ci[k]];
    err = std::max(err, std::abs(a - res[j]));
  }
  double best = 1e9;
  for (int r = 0; r < 5; ++r) {
    t0 = Now();
    for (int i = 0; i < 2000; ++i) SparseSlices(sp, x, n, 1, m, 0, 1);
    best = std::min(best, (Now() - t0) / 2000);
  }
  const int64_t vectors = p->slice_ptr[p->num_slices];
  printf("nnz %ld, %s form, %ld vectors; pack %.2f ms; step %.2f us, "
         "%.3f ns per vector; max error %.2g\n",
         static_cast<long>(nnz), p->windowed ? "windowed" : "gathered",
         static_cast<long>(vectors), 1e3 * pack, 1e6 * best,
         1e9 * best / vectors, err);
  std::vector<float> xs(rows * n), y(rows * m, 0.0f), xt(n * kRowChunk);
  for (auto& v : xs) v = u(rng) - 0.5f;
  const Stage last{nullptr, 1, n, m, false, false};
  const auto input_term = [&] {
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk)
      SparseRowsAdd(sp, n, m, last, xs.data() + r0 * n, n,
                    std::min(kRowChunk, rows - r0), xt.data(),
                    y.data() + r0 * m, m);
  };
  input_term();
  err = 0;
  for (int64_t r = 0; r < rows; r += 7)
    for (int64_t j = 0; j < m; ++j) {
      double a = 0;
      for (int k = rp[j]; k < rp[j + 1]; ++k) a += va[k] * xs[r * n + ci[k]];
      err = std::max(err, std::abs(a - y[r * m + j]));
    }
  best = 1e9;
  for (int r = 0; r < 5; ++r) {
    t0 = Now();
    for (int i = 0; i < 20; ++i) input_term();
    best = std::min(best, (Now() - t0) / 20);
  }
  printf("input term, %ld rows: %.3f ms; max error %.2g\n",
         static_cast<long>(rows), 1e3 * best, err);
  return 0;
}

}  // namespace avx512
}  // namespace keras_antman
#pragma GCC pop_options

int main(int argc, char** argv) {
  return keras_antman::avx512::Main(argc, argv);
}
