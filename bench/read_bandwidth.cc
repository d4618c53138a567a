// Memory read bandwidth with 1 and 2 OpenMP threads: the ceiling on the
// 2-thread speedup of any sequence whose weights do not fit in the last-
// level cache (each step then streams them from DRAM). Each thread reads
// its half as 4 interleaved streams, as the op's GEMV reads 4 rows of W at
// a time. bench/speedup.py compiles and runs this; prints "threads GB/s".
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

int main() {
  const long n = 64L << 20;  // 256 MiB of floats: far beyond any cache
  std::vector<float> a(n, 1.0f);
  for (int threads = 1; threads <= 2; ++threads) {
    std::vector<double> seconds;
    double sink = 0;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      float s = 0;
#pragma omp parallel num_threads(threads) reduction(+ : s)
      {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const long len = n / nt / 4;  // 4 streams of len floats
        const float* p = a.data() + t * (n / nt);
        float acc[16] = {};  // 16 lanes: vectorised without -ffast-math
        for (long i = 0; i < len; i += 16)
          for (int q = 0; q < 4; ++q)
            for (int j = 0; j < 16; ++j) acc[j] += p[q * len + i + j];
        for (int j = 0; j < 16; ++j) s += acc[j];
      }
      seconds.push_back(std::chrono::duration<double>(
                            std::chrono::steady_clock::now() - t0)
                            .count());
      sink += s;
    }
    std::sort(seconds.begin(), seconds.end());
    std::printf("%d %.2f\n", threads, n * 4.0 / seconds[3] / 1e9);
    if (sink < 0) std::printf("%g\n", sink);
  }
  return 0;
}
