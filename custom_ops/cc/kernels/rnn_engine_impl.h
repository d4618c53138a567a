// The engine's kernels, written once with GCC vector extensions and
// compiled once per instruction set: each rnn_engine_<isa>.cc includes this
// file inside namespace keras_antman::<isa> after setting the target and
// KA_VBYTES (the vector width in bytes). This file includes nothing but
// its own part sparse_term_impl.h (the AVX2 and AVX-512 files include
// <immintrin.h> for masked moves and gathers), and everything in it has
// internal linkage except RunRnn and RunBlockDiag, so no
// differently-compiled copy of a function can be picked by the linker for
// another instruction set.
//
// Row-vector convention: y = x @ W with W [n, m] row-major.

namespace {

typedef float vf __attribute__((vector_size(KA_VBYTES)));
typedef float vfu
    __attribute__((vector_size(KA_VBYTES), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(KA_VBYTES)));
constexpr int V = KA_VBYTES / 4;

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }

// s in every lane. A uniform initializer is one broadcast (from memory
// where s is loaded); `vf{} + s` was an add of 0 (which IEEE rules keep)
// and a register broadcast, two floating-point ops per broadcast in every
// product's inner loop.
inline vf Splat(float s) {
#if KA_VBYTES == 64
  return vf{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
#elif KA_VBYTES == 32
  return vf{s, s, s, s, s, s, s, s};
#else
  return vf{s, s, s, s};
#endif
}
inline vf LoadU(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void StoreU(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }

// Partial vectors are padded with zeros so that every lane runs the same
// code: a unit's result does not depend on where it falls in a vector.
// AVX-512 and AVX2 move them with masked loads and stores (a task's units
// end mid-vector whenever units / g is not a multiple of V).
#if KA_VBYTES == 64
inline __mmask16 FirstLanes(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1);
}
inline vf LoadN(const float* p, int64_t n) {
  if (n == V) return LoadU(p);
  return (vf)_mm512_maskz_loadu_ps(FirstLanes(n), p);
}
inline void StoreN(float* p, vf v, int64_t n) {
  if (n == V) {
    StoreU(p, v);
    return;
  }
  _mm512_mask_storeu_ps(p, FirstLanes(n), (__m512)v);
}
#elif KA_VBYTES == 32
inline __m256i FirstLanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vf LoadN(const float* p, int64_t n) {
  if (n == V) return LoadU(p);
  return (vf)_mm256_maskload_ps(p, FirstLanes(n));
}
inline void StoreN(float* p, vf v, int64_t n) {
  if (n == V) {
    StoreU(p, v);
    return;
  }
  _mm256_maskstore_ps(p, FirstLanes(n), (__m256)v);
}
#else
inline vf LoadN(const float* p, int64_t n) {
  if (n == V) return LoadU(p);
  float t[V] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return LoadU(t);
}
inline void StoreN(float* p, vf v, int64_t n) {
  if (n == V) {
    StoreU(p, v);
    return;
  }
  float t[V];
  StoreU(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
#endif

// exp with the Cephes expf polynomial (about 1 ulp on the clamped range);
// the clamp keeps 2^n finite and is far beyond where sigmoid and tanh
// saturate in float32. ExpReduced is e^(x - n ln 2) for the integer n = nf
// (ln 2 in two parts, then the polynomial), shared by both Exp variants.
[[gnu::always_inline]] inline vf ExpReduced(vf x, vf nf) {
  x = x - nf * 0.693359375f;
  x = x - nf * -2.12194440e-4f;
  vf z = x * x;
  vf y = Splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  return y;
}
#if KA_VBYTES == 64
// AVX-512: the nearest integer n and the final y * 2^n in one instruction
// each (roundscale, scalef).
[[gnu::always_inline]] inline vf Exp(vf x) {
  // min(hi, x), max(lo, x) as one instruction each (the select took a
  // compare and a masked move); they return x where it is NaN, as the
  // select did.
  x = (vf)_mm512_min_ps((__m512)Splat(87.0f), (__m512)x);
  x = (vf)_mm512_max_ps((__m512)Splat(-87.0f), (__m512)x);
  const vf nf = (vf)_mm512_roundscale_ps(
      (__m512)(x * 1.44269504088896341f),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf y = ExpReduced(x, nf);
  return (vf)_mm512_scalef_ps((__m512)y, (__m512)nf);
}
#else
[[gnu::always_inline]] inline vf Exp(vf x) {
#if KA_VBYTES == 32  // as above
  x = (vf)_mm256_min_ps((__m256)Splat(87.0f), (__m256)x);
  x = (vf)_mm256_max_ps((__m256)Splat(-87.0f), (__m256)x);
#else
  const vf hi = Splat(87.0f), lo = Splat(-87.0f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
#endif
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);  // truncates toward zero
  vf nf = __builtin_convertvector(n, vf);
  n += (vi)(nf > fx);  // -1 where truncation rounded up: floor
  nf = __builtin_convertvector(n, vf);
  const vf y = ExpReduced(x, nf);
  vi e = (n + 127) << 23;
  return y * (vf)e;
}
#endif
[[gnu::always_inline]] inline vf Sigmoid(vf x) {
  return 1.0f / (1.0f + Exp(-x));
}
[[gnu::always_inline]] inline vf Tanh(vf x) {
  return 2.0f / (1.0f + Exp(-2.0f * x)) - 1.0f;
}

// The LSTM cell for one vector of units: c' = f * c + i * tanh(g),
// h' = o * tanh(c'), with 3 divides instead of 5: sigmoid(a) * tanh(b) =
// (1 - e^-2b) / ((1 + e^-a) (1 + e^-2b)). Where that denominator rounds to
// inf the product is below 1e-37; the numerator stays finite (Exp clamps),
// so the quotient is 0.
struct CellOut {
  vf c, h;
};
[[gnu::always_inline]] inline vf SigmoidTimesTanh(vf a, vf b) {
  const vf ea = Exp(-a), eb = Exp(-2.0f * b);
  return (1.0f - eb) / ((1.0f + ea) * (1.0f + eb));
}
[[gnu::always_inline]] inline CellOut LstmCell(vf zi, vf zf, vf zg, vf zo,
                                               vf c) {
  const vf cn = c / (1.0f + Exp(-zf)) + SigmoidTimesTanh(zi, zg);
  return {cn, SigmoidTimesTanh(zo, cn)};
}

// y[0, n) = a[0, n) + b[0, n); y may be a.
inline void AddRow(const float* a, const float* b, int64_t n, float* y) {
  int64_t k = 0;
  for (; k + V <= n; k += V) StoreU(y + k, LoadU(a + k) + LoadU(b + k));
  if (k < n) StoreN(y + k, LoadN(a + k, n - k) + LoadN(b + k, n - k), n - k);
}

// The barrier of the step loop, one per step or more: each thread adds
// its arrival to a shared counter and spins (pausing) until all nt have
// arrived. On a 2-core Zen 4 VM a step at d = 16 took 0.4 us longer on two
// threads than on one with the OpenMP barrier, 0.1 us with this one (best
// of 40 calls); a step at d = 400 takes about 5 us. A thread still waiting
// after kSpins pauses yields its core: on a busy machine the thread it
// waits for may be waiting for a core.
constexpr int kSpins = 500;

struct Sync {
  int64_t* arrivals;  // shared, zero before the first barrier
  int nt;
  int64_t passed;  // nt x the barriers this thread has passed

  void Wait() {
    if (nt <= 1) return;
    passed += nt;
    __atomic_fetch_add(arrivals, 1, __ATOMIC_ACQ_REL);
    for (int i = 0; __atomic_load_n(arrivals, __ATOMIC_ACQUIRE) < passed;
         ++i) {
      if (i < kSpins) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        sched_yield();
      }
    }
  }
};

// Contiguous split of [0, n) over nt threads with boundaries on multiples
// of `align` (so no two threads write the same cache line when it can be
// avoided).
inline void Split(int64_t n, int tid, int nt, int64_t align, int64_t* b,
                  int64_t* e) {
  int64_t per = (n + nt - 1) / nt;
  per = (per + align - 1) / align * align;
  *b = Min(n, tid * per);
  *e = Min(n, *b + per);
}

// ---------------------------------------------------------------------------
// Small GEMM: Y[R, N] = X[R, K] @ W[K, N] (all row-major with leading
// dimensions), register-blocked MR rows x NV vectors.

template <int MR, int NV>
inline void Kern(const float* __restrict x, int64_t ldx,
                 const float* __restrict w, int64_t ldw, int64_t k_len,
                 float* __restrict y, int64_t ldy) {
  vf acc[MR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 32
    for (int j = 0; j < NV; ++j) acc[i][j] = Splat(0.0f);
  for (int64_t k = 0; k < k_len; ++k) {
    const float* wk = w + k * ldw;
    vf wv[NV];
#pragma GCC unroll 32
    for (int j = 0; j < NV; ++j) wv[j] = LoadU(wk + j * V);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      const vf xb = Splat(x[i * ldx + k]);
#pragma GCC unroll 32
      for (int j = 0; j < NV; ++j) acc[i][j] += xb * wv[j];
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 32
    for (int j = 0; j < NV; ++j) StoreU(y + i * ldy + j * V, acc[i][j]);
}

// The last nc < V columns, one partial vector (masked moves): a block
// whose width is no multiple of V (GRU g = 10 at d = 400: 120 columns; a
// Kronecker factor B [40, 40] in each of its many row tiles) ran its last
// columns scalar, in the step loop too.
template <int MR>
inline void KernTail(const float* __restrict x, int64_t ldx,
                     const float* __restrict w, int64_t ldw, int64_t k_len,
                     float* __restrict y, int64_t ldy, int64_t nc) {
  vf acc[MR];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) acc[i] = Splat(0.0f);
  for (int64_t k = 0; k < k_len; ++k) {
    const vf wk = LoadN(w + k * ldw, nc);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) acc[i] += Splat(x[i * ldx + k]) * wk;
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) StoreN(y + i * ldy, acc[i], nc);
}

// One row against NV vectors, the last of them nc < V columns (masked
// moves): a row's tail in the same pass as its other columns. KernTail<1>
// runs one accumulator chain, waiting on the FMA latency at every row of
// W: the 8 tail columns of a GRU block at d = 400 (40 rows) and of
// LowRank-LGP's 200 x 200 mix took a third of the time of the other 7
// and 12 vectors.
template <int NV>
void KernRowMasked(const float* __restrict x, const float* __restrict w,
                   int64_t ldw, int64_t k_len, float* __restrict y,
                   int64_t nc) {
  vf acc[NV];
#pragma GCC unroll 32
  for (int j = 0; j < NV; ++j) acc[j] = Splat(0.0f);
  for (int64_t k = 0; k < k_len; ++k) {
    const float* wk = w + k * ldw;
    const vf xb = Splat(x[k]);
#pragma GCC unroll 32
    for (int j = 0; j + 1 < NV; ++j) acc[j] += xb * LoadU(wk + j * V);
    acc[NV - 1] += xb * LoadN(wk + (NV - 1) * V, nc);
  }
#pragma GCC unroll 32
  for (int j = 0; j + 1 < NV; ++j) StoreU(y + j * V, acc[j]);
  StoreN(y + (NV - 1) * V, acc[NV - 1], nc);
}

typedef void (*KernRowMaskedFn)(const float*, const float*, int64_t, int64_t,
                                float*, int64_t);

template <int NV>
KernRowMaskedFn PickKernRowMasked(int64_t nv) {
  if constexpr (NV == 0) {
    return nullptr;
  } else {
    return nv == NV ? &KernRowMasked<NV> : PickKernRowMasked<NV - 1>(nv);
  }
}

// Register tiles: MR rows x NV vectors of accumulators, plus NV weight
// vectors and one broadcast, within the vector registers (32 with AVX-512,
// 16 otherwise). One row (batch 1) takes a whole 24- or 12-vector row
// segment of W per pass, so the FMAs of one weight row are independent and
// each weight is read once; more rows share each weight load (a small
// GEMM: the batch reuses every weight MR times from a register).
constexpr int kRegs = KA_VBYTES == 64 ? 32 : 16;
constexpr int kMaxRowTile = KA_VBYTES == 64 ? 8 : 4;
constexpr int MaxNv(int mr) {
  return mr == 1 ? (kRegs * 3) / 4 : (kRegs - 1) / (mr + 1);
}

typedef void (*KernFn)(const float*, int64_t, const float*, int64_t, int64_t,
                       float*, int64_t);

// Kern<MR, nv> for a run-time nv in [1, NV].
template <int MR, int NV>
KernFn PickKern(int64_t nv) {
  if constexpr (NV == 0) {
    return nullptr;
  } else {
    return nv == NV ? &Kern<MR, NV> : PickKern<MR, NV - 1>(nv);
  }
}

// `tiles` tiles of MR rows: Y[tiles * MR, n] = X @ W. Columns outer, in
// near-equal chunks of at most MaxNv(MR) vectors, rows inner, so a chunk of
// W stays in L1 while every row tile passes over it.
template <int MR>
void RowTiles(const float* x, int64_t ldx, int64_t tiles, const float* w,
              int64_t ldw, int64_t k_len, int64_t n, float* y, int64_t ldy) {
  constexpr int kNv = MaxNv(MR);
  const int64_t nvec = n / V;
  if constexpr (MR == 1) {
    if (n % V != 0) {  // one tile (TileGemm); the partial vector in the last chunk
      const int64_t total = nvec + 1, chunks = (total + kNv - 1) / kNv;
      int64_t c = 0;
      for (int64_t j = 0; j < chunks; ++j) {
        const int64_t nv = total / chunks + (j < total % chunks ? 1 : 0);
        if (j + 1 < chunks)
          PickKern<1, kNv>(nv)(x, ldx, w + c, ldw, k_len, y + c, ldy);
        else
          PickKernRowMasked<kNv>(nv)(x, w + c, ldw, k_len, y + c, n % V);
        c += nv * V;
      }
      return;
    }
  }
  const int64_t chunks = (nvec + kNv - 1) / kNv;
  int64_t c = 0;
  for (int64_t j = 0; j < chunks; ++j) {
    const int64_t nv = nvec / chunks + (j < nvec % chunks ? 1 : 0);
    const KernFn fn = PickKern<MR, kNv>(nv);
    for (int64_t t = 0; t < tiles; ++t)
      fn(x + t * MR * ldx, ldx, w + c, ldw, k_len, y + t * MR * ldy + c, ldy);
    c += nv * V;
  }
  if (c < n)
    for (int64_t t = 0; t < tiles; ++t)
      KernTail<MR>(x + t * MR * ldx, ldx, w + c, ldw, k_len,
                   y + t * MR * ldy + c, ldy, n - c);
}

// Y[rows, n] = X[rows, k_len] @ W[k_len, n] in register tiles: as many
// kMaxRowTile-row tiles as fit, then one tile of the rest.
void TileGemm(const float* x, int64_t ldx, int64_t rows, const float* w,
              int64_t ldw, int64_t k_len, int64_t n, float* y, int64_t ldy) {
  int64_t r = 0;
  if (rows - r >= kMaxRowTile) {
    const int64_t tiles = (rows - r) / kMaxRowTile;
    RowTiles<kMaxRowTile>(x, ldx, tiles, w, ldw, k_len, n, y, ldy);
    r += tiles * kMaxRowTile;
  }
  if (kMaxRowTile > 4 && rows - r >= 4) {
    RowTiles<4>(x + r * ldx, ldx, 1, w, ldw, k_len, n, y + r * ldy, ldy);
    r += 4;
  }
  const float* xr = x + r * ldx;
  float* yr = y + r * ldy;
  switch (rows - r) {
    case 3:
      RowTiles<3>(xr, ldx, 1, w, ldw, k_len, n, yr, ldy);
      break;
    case 2:
      RowTiles<2>(xr, ldx, 1, w, ldw, k_len, n, yr, ldy);
      break;
    case 1:
      RowTiles<1>(xr, ldx, 1, w, ldw, k_len, n, yr, ldy);
      break;
    default:
      break;
  }
}

// One or two rows against the gate columns [q * units + u0, + len) of a
// large single-block W, for every gate q in one pass over the rows of W:
// y[i * ldy + q * len + c]. With one thread the segments of a row are the
// whole row, one contiguous stream; 128-unit column tasks (LastStage) would
// instead touch every row of W per task, a page per row at large d.
template <int MR>
void GemvGates(const float* x, int64_t ldx, const float* w, int64_t ldw,
               int64_t k_len, int64_t units, int gates, int64_t u0,
               int64_t len, float* y, int64_t ldy) {
  for (int i = 0; i < MR; ++i)
    for (int64_t c = 0; c < gates * len; ++c) y[i * ldy + c] = 0.0f;
  int64_t k = 0;
  for (; k + 4 <= k_len; k += 4) {
    for (int i = 0; i < MR; ++i) {
      const float* xi = x + i * ldx + k;
      const vf a0 = Splat(xi[0]), a1 = Splat(xi[1]);
      const vf a2 = Splat(xi[2]), a3 = Splat(xi[3]);
      for (int q = 0; q < gates; ++q) {
        const float* w0 = w + k * ldw + q * units + u0;
        const float* w1 = w0 + ldw;
        const float* w2 = w1 + ldw;
        const float* w3 = w2 + ldw;
        float* yq = y + i * ldy + q * len;
        int64_t c = 0;
        for (; c + V <= len; c += V)
          StoreU(yq + c, LoadU(yq + c) + a0 * LoadU(w0 + c) +
                             a1 * LoadU(w1 + c) + a2 * LoadU(w2 + c) +
                             a3 * LoadU(w3 + c));
        for (; c < len; ++c)
          yq[c] += xi[0] * w0[c] + xi[1] * w1[c] + xi[2] * w2[c] +
                   xi[3] * w3[c];
      }
    }
  }
  for (; k < k_len; ++k)
    for (int i = 0; i < MR; ++i) {
      const float a = x[i * ldx + k];
      for (int q = 0; q < gates; ++q) {
        const float* wk = w + k * ldw + q * units + u0;
        float* yq = y + i * ldy + q * len;
        for (int64_t c = 0; c < len; ++c) yq[c] += a * wk[c];
      }
    }
}

// One or two rows against a large W (batch-1 inference): the product is
// bound by reading W, so walk W row by row in contiguous segments that the
// prefetcher follows, keeping a segment of y in L1. Column strips (Kern)
// would touch every row of W per strip, a page per row at large d.
template <int MR>
void GemvStream(const float* x, int64_t ldx, const float* w, int64_t ldw,
                int64_t k_len, int64_t n, float* y, int64_t ldy) {
  // Segments of 2048 columns (8 KiB of y per row) while W may stay in the
  // last-level cache, so y stays in L1; whole rows once it cannot
  // (W >= 16 MiB), where one long stream per row is what the prefetcher
  // follows best and DRAM bandwidth is the limit (bench/ has the numbers).
  const int64_t kCols = k_len * n >= (int64_t{1} << 22) ? n : 2048;
  for (int64_t c0 = 0; c0 < n; c0 += kCols)
    GemvGates<MR>(x, ldx, w, ldw, k_len, 0, 1, c0, Min(kCols, n - c0), y + c0,
                  ldy);
}

// With many rows W is walked in column blocks; `pack` (kBlockFloats, or
// null) receives a copy of each strided block so that the rows read it
// contiguously: a narrow block of a wide W spans one page per row, which
// the TLB and the prefetcher handle badly, and the copy is paid once per
// block for many rows. Rows shorter than a page are read in place: a
// block of a block-diagonal stage (LGP-Shuffle g=10 at d = 1600, 640
// columns) stays in L2 anyway, and its copy took 8% of the op's time.
constexpr int64_t kPackMinLdw = 1024;
void Gemm(const float* x, int64_t ldx, int64_t rows, const float* w,
          int64_t ldw, int64_t k_len, int64_t n, float* y, int64_t ldy,
          float* pack = nullptr) {
  if (rows <= 0 || n <= 0) return;
  // Large matrices only: small blocks stay in cache and Kern's register
  // accumulators win there.
  if (rows <= kStreamRows && k_len * n >= (int64_t{1} << 18)) {
    if (rows == 1)
      GemvStream<1>(x, ldx, w, ldw, k_len, n, y, ldy);
    else
      GemvStream<2>(x, ldx, w, ldw, k_len, n, y, ldy);
    return;
  }
  // With many rows, walk W in column blocks that stay in L2 (about 256 KiB)
  // while every row tile passes over them.
  int64_t nb = n;
  if (rows > 4) {
    nb = (kBlockFloats / Max(k_len, 1)) / (2 * V) * (2 * V);
    nb = Max(nb, 2 * V);
  }
  for (int64_t c0 = 0; c0 < n; c0 += nb) {
    const int64_t nc = Min(nb, n - c0);
    const float* wb = w + c0;
    int64_t ldb = ldw;
    if (pack != nullptr && rows > 4 && nc < ldw && ldw >= kPackMinLdw &&
        k_len * nc <= kBlockFloats) {
      for (int64_t k = 0; k < k_len; ++k)
        for (int64_t c = 0; c < nc; ++c) pack[k * nc + c] = wb[k * ldw + c];
      wb = pack;
      ldb = nc;
    }
    TileGemm(x, ldx, rows, wb, ldb, k_len, nc, y + c0, ldy);
  }
}

// Columns [c0, c1) of x @ blockdiag(stage) without the shuffle, written to
// y[:, 0 : c1 - c0]. The range may span several groups.
void StageColumns(const Stage& s, const float* x, int64_t ldx, int64_t rows,
                  int64_t c0, int64_t c1, float* y, int64_t ldy,
                  float* pack = nullptr) {
  if (s.shared) {  // whole groups in range: rows of one GEMM with block 0
    const int64_t gi0 = (c0 + s.b - 1) / s.b, gi1 = c1 / s.b;
    if (gi0 < gi1) {
      // Groups before gi0 and from gi1 on, then this.
      const Stage unshared{s.w, s.g, s.a, s.b, s.shuffle, false, nullptr};
      StageColumns(unshared, x, ldx, rows, c0, gi0 * s.b, y, ldy, pack);
      StageColumns(unshared, x, ldx, rows, gi1 * s.b, c1,
                   y + (gi1 * s.b - c0), ldy, pack);
      const int64_t ng = gi1 - gi0;
      float* yg = y + (gi0 * s.b - c0);
      if (ng == s.g && ldx == s.g * s.a && ldy == s.g * s.b) {
        Gemm(x, s.a, rows * s.g, s.w, s.b, s.a, s.b, yg, s.b, pack);
        return;
      }
      for (int64_t r = 0; r < rows; ++r)
        Gemm(x + r * ldx + gi0 * s.a, s.a, ng, s.w, s.b, s.a, s.b,
             yg + r * ldy, s.b, pack);
      return;
    }
  }
  while (c0 < c1) {
    const int64_t gi = c0 / s.b;
    const int64_t cend = Min(c1, (gi + 1) * s.b);
    Gemm(x + gi * s.a, ldx, rows, s.w + gi * s.a * s.b + (c0 - gi * s.b), s.b,
         s.a, cend - c0, y, ldy, pack);
    y += cend - c0;
    c0 = cend;
  }
}

// A block's nvec column vectors in near-equal panels of at most max_nv
// vectors: panel c has PanelVectors(...) vectors from vector PanelStart(...).
// A packed stage (PackLayout) stores each panel as [a, its width].
inline int64_t Panels(int64_t nvec, int64_t max_nv) {
  return (nvec + max_nv - 1) / max_nv;
}
inline int64_t PanelVectors(int64_t nvec, int64_t max_nv, int64_t c) {
  const int64_t n = Panels(nvec, max_nv);
  return nvec / n + (c < nvec % n ? 1 : 0);
}
inline int64_t PanelStart(int64_t nvec, int64_t max_nv, int64_t c) {
  const int64_t n = Panels(nvec, max_nv);
  return c * (nvec / n) + Min(c, nvec % n);
}

// Panel widths of the packed layouts: the input GEMM's register tile (so
// that any row tile takes a whole panel per pass, one stream), the batch-1
// GEMV's accumulators.
constexpr int kInputNv = MaxNv(kMaxRowTile);
constexpr int kGroupNv = MaxNv(1);

// The groups [g0, g1) of X @ blockdiag(s) (unshuffled: group i's outputs
// in y[:, i * b, + b)) from the stage's kInputPanels copy: each panel is
// read contiguously by every row tile.
void PanelStage(const Stage& s, const float* x, int64_t ldx, int64_t rows,
                int64_t g0, int64_t g1, float* y, int64_t ldy) {
  const int64_t nvec = s.b / V, panels = Panels(nvec, kInputNv);
  for (int64_t i = g0; i < g1; ++i) {
    const float* block = s.packed + i * s.a * s.b;
    for (int64_t c = 0; c < panels; ++c) {
      const int64_t nv = PanelVectors(nvec, kInputNv, c);
      const int64_t c0 = PanelStart(nvec, kInputNv, c) * V;
      TileGemm(x + i * s.a, ldx, rows, block + c0 * s.a, nv * V, s.a, nv * V,
               y + i * s.b + c0, ldy);
    }
  }
}

// Columns [c0, c1) of x @ blockdiag(s) for one row (unshuffled), from the
// stage's kRecurrentChunks copy, into y[0, c1 - c0): each panel is one
// contiguous stream of a rows x its width, read with the row's whole
// range of it in accumulators (a range that starts or ends inside a
// panel reads that panel with its width as the row stride). The batch-1
// recurrent stages of a chain (LowRank-LGP's dense mix and its last
// blocks) take this instead of strided column chunks of the blocks.
void PackedColumns(const Stage& s, const float* x, int64_t c0, int64_t c1,
                   float* y) {
  const int64_t nvec = s.b / V, panels = Panels(nvec, kGroupNv);
  while (c0 < c1) {
    const int64_t gi = c0 / s.b, j0 = c0 - gi * s.b;
    const int64_t jend = Min(s.b, c1 - gi * s.b);  // group-local end
    const float* block = s.packed + gi * s.a * s.b;
    // The panel holding column j0, then every panel up to jend.
    int64_t c = 0;
    while (c + 1 < panels && PanelStart(nvec, kGroupNv, c + 1) * V <= j0) ++c;
    for (int64_t j = j0; j < jend; ++c) {
      const int64_t p0 = PanelStart(nvec, kGroupNv, c) * V;
      const int64_t width = PanelVectors(nvec, kGroupNv, c) * V;
      const int64_t e = Min(jend, p0 + width);
      const float* w = block + p0 * s.a + (j - p0);
      float* yj = y + (j - j0);
      const int64_t nv = (e - j) / V, tail = (e - j) % V;
      if (tail == 0)
        PickKern<1, kGroupNv>(nv)(x + gi * s.a, 0, w, width, s.a, yj, 0);
      else  // nv + 1 <= width / V vectors
        PickKernRowMasked<kGroupNv>(nv + 1)(x + gi * s.a, w, width, s.a, yj,
                                            tail);
      j = e;
    }
    y += jend - j0;
    c0 = gi * s.b + jend;
  }
}

// The shuffle of a stage's unshuffled columns [c0, c1): column c = i * b + j
// (output j of group i) goes to j * g + i. `u` holds them from column 0,
// `y` is the whole shuffled output.
void ShuffleColumns(const Stage& s, const float* u, int64_t ldu, int64_t rows,
                    int64_t c0, int64_t c1, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* ur = u + r * ldu - c0;
    float* yr = y + r * ldy;
    // Group by group: no division per column.
    for (int64_t i = c0 / s.b, c = c0; c < c1; ++i) {
      const int64_t end = Min(c1, (i + 1) * s.b);
      for (int64_t j = c - i * s.b; c < end; ++c, ++j) yr[j * s.g + i] = ur[c];
    }
  }
}

// ---------------------------------------------------------------------------
// The whole-sequence RNN.

// A task of a recurrent product's last stage: the units first_unit +
// unit_stride * l for l in [0, len), every gate of them, held in the slots
// [first_slot, first_slot + len) of each gate (RnnPlan's slot layout).
struct Task {
  int64_t first_unit;
  int64_t unit_stride;
  int64_t len;
  int64_t first_slot;
};

inline void Gather(const float* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
  }
}
inline void Scatter(const float* src, int64_t n, float* dst, int64_t stride) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = src[i];
  }
}

// A task's units of a natural-order state row, into task order and back.
inline void GatherUnits(const float* row, const Task& tk, float* dst) {
  Gather(row + tk.first_unit, tk.unit_stride, tk.len, dst);
}
inline void ScatterUnits(const float* src, const Task& tk, float* row) {
  Scatter(src, tk.len, row + tk.first_unit, tk.unit_stride);
}

#include "custom_ops/cc/kernels/sparse_term_impl.h"

bool GroupStepFits(const RnnPlan& p);
bool HSlots(const RnnPlan& p);

// Rows of a one-stage input product per pass over the weights: a sequence
// of 100 steps in one pass (5% faster than 64-row chunks at d = 1600), but
// few enough that the rows' x stays in L2 while every panel passes over it
// (all 3200 rows of batch 32 at d = 800 were 5% slower).
constexpr int64_t kPanelRows = 256;

// Whether each thread's step loop reads z values that the input product's
// same groups make: LstmGroupStep (task-major x_proj) after one stage of as
// many groups, with the identity gather and no sparse term.
bool InputByGroups(const RnnPlan& p) {
  const Chain& ch = p.input;
  return GroupStepFits(p) && ch.num_stages == 1 && ch.sparse.nnz == 0 &&
         p.num_runs == 1 &&
         ch.stages[0].g == p.recurrent.chain.stages[0].g;
}

// The input product split by groups (InputByGroups): each thread makes the
// z values of the groups its step loop runs, for every step, so they stay
// in its core's cache and each thread reads only its groups' weights.
void InputPhaseByGroups(const RnnPlan& p, int tid, int nt) {
  const Stage& s = p.input.stages[0];
  const int64_t rows = p.batch * p.steps, zw = p.z_width;
  const int64_t g0 = s.g * tid / nt, g1 = s.g * (tid + 1) / nt;
  for (int64_t r = 0; r < rows; r += kPanelRows) {
    const int64_t rc = Min(kPanelRows, rows - r);
    const float* x = p.x + r * s.g * s.a;
    float* y = p.x_proj + r * zw;
    if (s.packed != nullptr)
      PanelStage(s, x, s.g * s.a, rc, g0, g1, y, zw);
    else
      StageColumns(s, x, s.g * s.a, rc, g0 * s.b, g1 * s.b, y + g0 * s.b,
                   zw, p.scratch + tid * p.scratch_stride + p.off_pack);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* z = p.x_proj + r * zw + g0 * s.b;
    AddRow(z, p.bias_slots + g0 * s.b, (g1 - g0) * s.b, z);
  }
}

// The input product of `rows` consecutive rows of x (its sparse term
// included) into as many rows of x_proj from `y`, then the gather into the
// slot layout with the bias folded in.
void InputRows(const RnnPlan& p, int tid, const float* x, int64_t rows,
               float* y) {
  const Chain& ch = p.input;
  const int64_t zw = p.z_width;
  float* thread_scratch = p.scratch + tid * p.scratch_stride;
  float* stage_buf[2] = {thread_scratch + p.off_stage[0],
                         thread_scratch + p.off_stage[1]};
  float* row_copy = thread_scratch + p.off_row_copy;
  float* pack = thread_scratch + p.off_pack;
  float* unshuffled = thread_scratch + p.off_shuffle;
  // One stage and no sparse term need no buffer sized by kRowChunk: more
  // rows then pass over each panel of W at once.
  const int64_t chunk =
      ch.num_stages == 1 && ch.sparse.nnz == 0 ? kPanelRows : kRowChunk;
  for (int64_t r = 0; r < rows; r += chunk) {
    const int64_t rc = Min(chunk, rows - r);
    const float* in = x + r * ch.n;
    int64_t ldx = ch.n;
    for (int s = 0; s < ch.num_stages; ++s) {
      const Stage& stage = ch.stages[s];
      const int64_t ms = stage.g * stage.b;
      const bool last = s == ch.num_stages - 1;
      float* out = last ? y + r * zw : stage_buf[s & 1];
      const int64_t ldy = last ? zw : ms;
      // The last stage's shuffle is folded into the gather below.
      if (stage.packed != nullptr) {  // unshuffled output (PackLayoutFor)
        PanelStage(stage, in, ldx, rc, 0, stage.g, out, ldy);
      } else if (!last && stage.shuffle) {
        StageColumns(stage, in, ldx, rc, 0, ms, unshuffled, ms, pack);
        ShuffleColumns(stage, unshuffled, ms, rc, 0, ms, out, ldy);
      } else {
        StageColumns(stage, in, ldx, rc, 0, ms, out, ldy, pack);
      }
      in = out;
      ldx = ldy;
    }
    SparseRowsAdd(ch.sparse, ch.n, ch.m, ch.stages[ch.num_stages - 1],
                  x + r * ch.n, ch.n, rc, thread_scratch + p.off_sparse_x,
                  y + r * zw, zw);
    for (int64_t i = 0; i < rc; ++i) {
      float* z = y + (r + i) * zw;
      const float* src = z;  // one run is the identity: in place
      if (p.num_runs != 1) {  // a permutation: read it from a copy
        for (int64_t k = 0; k < zw; ++k) row_copy[k] = z[k];
        src = row_copy;
      }
      if (p.num_runs == 0) {  // short runs: one column at a time
        for (int64_t k = 0; k < zw; ++k)
          z[k] = src[p.gather[k]] + p.bias_slots[k];
        continue;
      }
      for (int64_t j = 0; j < p.num_runs; ++j) {
        const int64_t* run = p.runs + 3 * j;  // source, slot, length
        AddRow(src + run[0], p.bias_slots + run[1], run[2], z + run[1]);
      }
    }
  }
}

// The input product for every (batch, step) row at once.
void InputPhase(const RnnPlan& p, int tid, int nt) {
  if (InputByGroups(p)) {
    InputPhaseByGroups(p, tid, nt);
    return;
  }
  int64_t r0, r1;
  Split(p.batch * p.steps, tid, nt, 1, &r0, &r1);
  InputRows(p, tid, p.x + r0 * p.input.n, r1 - r0, p.x_proj + r0 * p.z_width);
}

// Where a step's z values are in x_proj: row b * steps + (t - t0) holds
// row b of time t. The whole sequence's (InputPhase) has t0 = 0 and
// `steps` steps; a window's (InputWindow) has t0 its first time and the
// window's length.
struct XProjRows {
  int64_t t0, steps;
};

// Batch > 1: the input product runs on windows of steps, each just before
// its steps, into the first rows of x_proj, so that a step's z values are
// still in cache when its gate math reads them: the whole sequence's x_proj
// (20 MB for LGP-Shuffle g=10 at d = 400, batch 32) went out to memory and
// back, and windows took that case from 17.3 to 12.6 ms (Zen 4, 1 thread,
// thread CPU time). A window's z values take at most
// kWindowFloats (its steps: WindowSteps), and its rows of x are copied
// after them (x_proj's next rows, unused), so that the input product runs
// all rows of the window in one pass over each panel of its weights.
// Each window passes over the input weights again: above kMaxWindowWeights
// floats that cost more than it saved (LowRank-LGP g=10 r=2 at d = 1600,
// 1.28 M floats, batch 8 and 32: 0-17% slower; LGP-Shuffle g=10 at
// d = 1600, 1.02 M floats: 3-7% faster).
constexpr int64_t kWindowFloats = int64_t{1} << 18;
constexpr int64_t kMaxWindow = 32;
constexpr int64_t kMaxWindowWeights = int64_t{1} << 20;

// Steps per input window, 0: none (batch 1, too few steps, or large input
// weights).
int64_t WindowSteps(const RnnPlan& p) {
  if (p.batch <= 1 || InputByGroups(p)) return 0;
  int64_t weights = 0;
  for (int s = 0; s < p.input.num_stages; ++s) {
    const Stage& st = p.input.stages[s];
    weights += (st.shared ? 1 : st.g) * st.a * st.b;
  }
  if (weights > kMaxWindowWeights) return 0;
  int64_t w = Max(2, Min(kMaxWindow, kWindowFloats / (p.batch * p.z_width)));
  // The window's z rows and x rows within x_proj.
  w = Min(w, p.steps * p.z_width / (p.z_width + p.input.n));
  return w >= 2 && w < p.steps ? w : 0;
}

// The input product of the steps at processing positions [s0, s1); threads
// split the batch rows (each copies its rows' steps of x and multiplies
// them).
XProjRows InputWindow(const RnnPlan& p, int tid, int nt, int64_t s0,
                      int64_t s1) {
  const int64_t n = s1 - s0, t0 = p.go_backwards ? p.steps - s1 : s0;
  const int64_t f = p.input.n;
  float* x_rows = p.x_proj + p.batch * n * p.z_width;
  int64_t b0, b1;
  Split(p.batch, tid, nt, 1, &b0, &b1);
  for (int64_t b = b0; b < b1; ++b) {
    const float* src = p.x + (b * p.steps + t0) * f;
    float* dst = x_rows + b * n * f;
    for (int64_t k = 0; k < n * f; k += V)
      StoreN(dst + k, LoadN(src + k, Min(V, n * f - k)), Min(V, n * f - k));
  }
  InputRows(p, tid, x_rows + b0 * n * f, (b1 - b0) * n,
            p.x_proj + b0 * n * p.z_width);
  return XProjRows{t0, n};
}

// Intermediate stages of a recurrent product, columns split over threads,
// a barrier after each. Returns the last stage's input and its stride. A
// shuffling stage's columns are computed into the thread's `unshuffled`
// buffer and scattered to their shuffled places.
const float* Intermediate(const Product& pr, const float* in, int64_t batch,
                          int tid, int nt, Sync& sync, float* unshuffled,
                          int64_t* ldx_out) {
  int64_t ldx = pr.chain.n;
  for (int s = 0; s + 1 < pr.chain.num_stages; ++s) {
    const Stage& stage = pr.chain.stages[s];
    const int64_t ms = stage.g * stage.b;
    float* out = pr.stage_out[s & 1];
    int64_t c0, c1;
    Split(ms, tid, nt, 2 * V, &c0, &c1);
    if (c0 < c1 && stage.packed != nullptr) {  // batch 1 (PackLayoutFor)
      float* y = stage.shuffle ? unshuffled : out + c0;
      PackedColumns(stage, in, c0, c1, y);
      if (stage.shuffle)
        ShuffleColumns(stage, unshuffled, c1 - c0, batch, c0, c1, out, ms);
    } else if (c0 < c1 && stage.shuffle) {
      StageColumns(stage, in, ldx, batch, c0, c1, unshuffled, c1 - c0);
      ShuffleColumns(stage, unshuffled, c1 - c0, batch, c0, c1, out, ms);
    } else if (c0 < c1) {
      StageColumns(stage, in, ldx, batch, c0, c1, out + c0, ms);
    }
    sync.Wait();
    in = out;
    ldx = ms;
  }
  *ldx_out = ldx;
  return in;
}

// The last stage of a recurrent product, split in tasks that each own all
// gates of some units; `gate(task, v, ldv)` gets the product for those
// units, computed into `task_product`, as v[b * ldv + q * task.len + l]
// (gate q, l-th unit of the task).
// On odd steps (`rev`) the tasks run in reverse order ("zig-zag"), so the
// weights used last are used first again while still in cache.
template <class GateFn>
void LastStage(const Product& pr, const float* in, int64_t ldx, int64_t batch,
               int64_t units, int tid, int nt, bool rev, float* task_product,
               GateFn&& gate) {
  const Stage& s = pr.chain.stages[pr.chain.num_stages - 1];
  const int64_t gates = pr.gates;
  if (pr.mode == kGroupOwned) {
    // Group i's block product, unshuffled, is gate-major over the units
    // u = i + g * l: exactly the task layout, so it is written in place.
    const int64_t g0 = s.g * tid / nt, g1 = s.g * (tid + 1) / nt;
    const int64_t len = units / s.g;
    if (s.shared) {  // the thread's groups as rows of one GEMM per row
      const int64_t ldv = (g1 - g0) * s.b;
      for (int64_t r = 0; r < batch; ++r)
        Gemm(in + r * ldx + g0 * s.a, s.a, g1 - g0, s.w, s.b, s.a, s.b,
             task_product + r * ldv, s.b);
      if (gate.GroupRows(g0, g1, s.g, len, task_product)) return;
      for (int64_t i = g0; i < g1; ++i)
        gate(Task{i, s.g, len, i * len}, task_product + (i - g0) * s.b, ldv);
      return;
    }
    const int64_t nvec = s.b / V, panels = Panels(nvec, kGroupNv);
    auto product = [&](int64_t i, float* y) {
      if (s.packed == nullptr) {
        Gemm(in + i * s.a, ldx, batch, s.w + i * s.a * s.b, s.b, s.a, s.b, y,
             s.b);
      } else {  // batch 1, the kRecurrentChunks copy: one stream per panel
        for (int64_t cj = 0; cj < panels; ++cj) {
          const int64_t c = rev ? panels - 1 - cj : cj;
          const int64_t nv = PanelVectors(nvec, kGroupNv, c);
          const int64_t c0 = PanelStart(nvec, kGroupNv, c) * V;
          PickKern<1, kGroupNv>(nv)(in + i * s.a, ldx,
                                    s.packed + i * s.a * s.b + c0 * s.a,
                                    nv * V, s.a, y + c0, s.b);
        }
      }
    };
    if (batch == 1 && len % V != 0 && pr.max_task_units == units) {
      // Units of a group end mid-vector (GRU g = 10 at d = 400: 40 units,
      // 16 + 16 + 8 lanes): every group's product first, then the gate
      // math over all of them in whole vectors (GroupRows), whose passes
      // are independent; group by group, each pass waited on the last
      // one's exp and divides (the GRU's gate math was 43% of its step).
      for (int64_t i = g0; i < g1; ++i)
        product(i, task_product + (i - g0) * s.b);
      if (gate.GroupRows(g0, g1, s.g, len, task_product)) return;
      for (int64_t i = g0; i < g1; ++i)
        gate(Task{i, s.g, len, i * len}, task_product + (i - g0) * s.b, s.b);
      return;
    }
    for (int64_t j = 0; j < g1 - g0; ++j) {
      const int64_t i = rev ? g1 - 1 - j : g0 + j;
      product(i, task_product);
      gate(Task{i, s.g, len, i * len}, task_product, s.b);
    }
    return;
  }
  // kUnitColumns: this thread's units [unit_begin, unit_end).
  int64_t unit_begin, unit_end;
  Split(units, tid, nt, V, &unit_begin, &unit_end);
  if (s.packed != nullptr) {  // batch 1, the kRecurrentChunks copy
    const int64_t len = unit_end - unit_begin, ldv = gates * len;
    if (len <= 0) return;
    for (int64_t q = 0; q < gates; ++q)
      PackedColumns(s, in, q * units + unit_begin, q * units + unit_end,
                    task_product + q * len);
    gate(Task{unit_begin, 1, len, unit_begin}, task_product, ldv);
    return;
  }
  if (batch <= kStreamRows && s.g == 1 &&
      s.a * gates * (unit_end - unit_begin) >= (int64_t{1} << 18)) {
    const int64_t len = unit_end - unit_begin, ldv = gates * len;
    if (len <= 0) return;
    if (batch == 1)
      GemvGates<1>(in, ldx, s.w, s.b, s.a, units, gates, unit_begin, len,
                   task_product, ldv);
    else
      GemvGates<2>(in, ldx, s.w, s.b, s.a, units, gates, unit_begin, len,
                   task_product, ldv);
    gate(Task{unit_begin, 1, len, unit_begin}, task_product, ldv);
    return;
  }
  if (batch <= kStreamRows) {
    // One or two rows: the thread's whole unit range per gate (its
    // products are small and stay in L1), a few long column ranges
    // instead of many kUnitChunk pieces of a few multiply-adds each
    // (LowRank-LGP's last stage: blocks of 20 rows).
    const int64_t len = unit_end - unit_begin, ldv = gates * len;
    if (len <= 0) return;
    for (int64_t q = 0; q < gates; ++q)
      StageColumns(s, in, ldx, batch, q * units + unit_begin,
                   q * units + unit_end, task_product + q * len, ldv);
    gate(Task{unit_begin, 1, len, unit_begin}, task_product, ldv);
    return;
  }
  const int64_t chunks = (unit_end - unit_begin + kUnitChunk - 1) / kUnitChunk;
  for (int64_t j = 0; j < chunks; ++j) {
    const int64_t u0 = unit_begin + (rev ? chunks - 1 - j : j) * kUnitChunk;
    const int64_t len = Min(kUnitChunk, unit_end - u0);
    const int64_t ldv = gates * len;
    for (int64_t q = 0; q < gates; ++q)
      StageColumns(s, in, ldx, batch, q * units + u0, q * units + u0 + len,
                   task_product + q * len, ldv);
    gate(Task{u0, 1, len, u0}, task_product, ldv);
  }
}

// Per-thread vectors of one task's units for the gate math, each of
// max_task_units floats.
struct TaskVectors {
  float* h;         // the new h, before it is scattered to natural order
  float* h_prev;    // GRU: h_prev gathered into task order
  float* z;         // GRU without reset_after: the update gate
  float* r_h_prev;  // GRU without reset_after: r * h_prev
  float* rows;      // LSTM, whole groups (LstmGates::GroupRows): z [4, slots]
};

// One step as the gate functors see it.
struct StepView {
  const RnnPlan* p;
  int64_t s;  // position in processing order: the row of `out`
  int64_t t;  // time index of x (reversed with go_backwards)
  // [batch, units], natural layout, or the slot layout where h_slots
  // (HSlots: batch 1, groups that own their units).
  const float* h_prev;
  float* h_next;
  TaskVectors v;
  XProjRows xr;  // where x_proj holds this step's rows
  bool h_slots;

  // Where a group-owned task's units are in h: with h_slots, the task's
  // slots (contiguous); else its units in natural order.
  Task HUnits(const Task& tk) const {
    return h_slots ? Task{tk.first_slot, 1, tk.len, tk.first_slot} : tk;
  }
};

// Row b of x_proj at this step, from the task's first slot.
inline const float* XProjRow(const StepView& st, int64_t b, const Task& tk) {
  const RnnPlan& p = *st.p;
  return p.x_proj + (b * st.xr.steps + st.t - st.xr.t0) * p.z_width +
         tk.first_slot * p.x_task_mult;
}

// Writes the task's new h (in v.h, or `h`) to the state and the output
// sequence.
inline void EmitH(const StepView& st, const Task& tk, int64_t b,
                  const float* h = nullptr) {
  const RnnPlan& p = *st.p;
  if (h == nullptr) h = st.v.h;
  ScatterUnits(h, tk, st.h_next + b * p.units);
  if (p.out != nullptr)
    ScatterUnits(h, tk, p.out + (b * p.steps + st.s) * p.units);
}

// Gate functors: called by LastStage with the recurrent product of a
// task's units, rec[b * ldv + q * task.len + l] (gate q, l-th unit), they
// run the cell's equations for those units. Gate order and equations are
// those of keras.layers.LSTM / GRU.

// LSTM (i, f, c, o): c' = f * c + i * tanh(g), h' = o * tanh(c').
struct LstmGates {
  static constexpr bool kGroupRows = true;
  const StepView& st;

  // A shared last stage's groups [g0, g1) (of g, len units each) at once,
  // at batch 1 with task-major x_proj: `prod` holds group i's product for
  // gate q, unit l at (i - g0) * 4 * len + q * len + l, the layout of
  // x_proj's row. z is copied gate-major over the groups' slots into
  // v.rows, so that the gate math runs whole vectors: with len not a
  // multiple of V it took ceil(len / V) passes per group (20 units: two,
  // one of them 4 lanes). Only where GroupRowsApply.
  bool GroupRowsApply(int64_t len) const {
    return st.p->batch == 1 && st.p->x_task_mult == 4 && len % V != 0;
  }
  void GroupRows(int64_t g0, int64_t g1, int64_t g, int64_t len,
                 float* prod) const {
    const RnnPlan& p = *st.p;
    const int64_t slots = (g1 - g0) * len;
    const float* x_row = XProjRow(st, 0, Task{g0, g, len, g0 * len});
    float* z = st.v.rows;
    for (int64_t i = 0; i < g1 - g0; ++i)
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t from = (4 * i + q) * len;
        float* to = z + q * slots + i * len;
        for (int64_t l = 0; l < len; l += V) {
          const int64_t n = Min(V, len - l);
          StoreN(to + l, LoadN(prod + from + l, n) + LoadN(x_row + from + l, n),
                 n);
        }
      }
    float* c = p.c + g0 * len;
    for (int64_t k = 0; k < slots; k += V) {
      const int64_t n = Min(V, slots - k);
      const CellOut out =
          LstmCell(LoadN(z + k, n), LoadN(z + slots + k, n),
                   LoadN(z + 2 * slots + k, n), LoadN(z + 3 * slots + k, n),
                   LoadN(c + k, n));
      StoreN(c + k, out.c, n);
      StoreN(st.v.h + k, out.h, n);
    }
    for (int64_t i = g0; i < g1; ++i)
      EmitH(st, Task{i, g, len, i * len}, 0, st.v.h + (i - g0) * len);
  }

  void operator()(const Task& tk, const float* rec, int64_t ldv) const {
    const RnnPlan& p = *st.p;
    const int64_t units = p.units, len = tk.len, xs = p.x_gate_stride;
    float* task_h = st.v.h;
    for (int64_t b = 0; b < p.batch; ++b) {
      const float* rec_row = rec + b * ldv;
      const float* x_row = XProjRow(st, b, tk);
      float* c = p.c + b * units + tk.first_slot;
      for (int64_t l = 0; l < len; l += V) {
        const int64_t n = Min(V, len - l);
        const vf zi = LoadN(rec_row + l, n) + LoadN(x_row + l, n);
        const vf zf = LoadN(rec_row + len + l, n) + LoadN(x_row + xs + l, n);
        const vf zg =
            LoadN(rec_row + 2 * len + l, n) + LoadN(x_row + 2 * xs + l, n);
        const vf zo =
            LoadN(rec_row + 3 * len + l, n) + LoadN(x_row + 3 * xs + l, n);
        const CellOut out = LstmCell(zi, zf, zg, zo, LoadN(c + l, n));
        StoreN(c + l, out.c, n);
        StoreN(task_h + l, out.h, n);
      }
      EmitH(st, tk, b);
    }
  }
};

// ---------------------------------------------------------------------------
// The batch-1 LSTM step of ../shared/limit for one shuffled block-diagonal
// recurrent stage (LGP-Shuffle): each group's accumulators start from its
// z values in x_proj (task-major, bias folded in), so its product ends as
// z = x_proj + h_prev @ W_i; and the gate math of the group before runs
// one vector at a time between segments of this group's product, which
// waits on its weights (from L2) while the gate math keeps the
// floating-point units busy.

// A group whose z is complete, its gate math still to run.
struct LstmPending {
  const StepView* st;
  const float* z;  // [4][len], null: none
  int64_t group, len;

  int64_t Vectors() const { return z == nullptr ? 0 : (len + V - 1) / V; }

  // Units [j * V, + V) of the group, h (and the output row) in the slot
  // layout (HSlots).
  [[gnu::always_inline]] void Vector(int64_t j) const {
    const RnnPlan& p = *st->p;
    const int64_t l = j * V, n = Min(V, len - l);
    float* c = p.c + group * len + l;
    const vf zi = LoadN(z + l, n), zf = LoadN(z + len + l, n);
    const vf zg = LoadN(z + 2 * len + l, n), zo = LoadN(z + 3 * len + l, n);
    const CellOut out = LstmCell(zi, zf, zg, zo, LoadN(c, n));
    StoreN(c, out.c, n);
    StoreN(st->h_next + group * len + l, out.h, n);
    if (p.out != nullptr)
      StoreN(p.out + st->s * p.units + group * len + l, out.h, n);
  }
};

// out[0, NV * V) = init + h[slot[0, k_len)] @ w (rows of stride ldw), with
// the pending group's gate math in between; REV walks the rows backwards.
template <int NV, bool REV>
void GemvFrom(const float* __restrict h, const int32_t* __restrict slot,
              const float* __restrict w, int64_t ldw, int64_t k_len,
              const float* __restrict init, float* __restrict out,
              const LstmPending& pending) {
  vf acc[NV];
#pragma GCC unroll 32
  for (int j = 0; j < NV; ++j) acc[j] = LoadU(init + j * V);
  const int64_t vectors = pending.Vectors();
  const int64_t seg = (k_len + vectors) / (vectors + 1);
  int64_t done = 0;
  for (int64_t i0 = 0; i0 < k_len; i0 += seg) {
    const int64_t i1 = Min(k_len, i0 + seg);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = REV ? k_len - 1 - i : i;
      const vf hk = Splat(h[slot[k]]);
      const float* wk = w + k * ldw;
#pragma GCC unroll 32
      for (int j = 0; j < NV; ++j) acc[j] += hk * LoadU(wk + j * V);
    }
    if (done < vectors) pending.Vector(done++);
  }
  for (; done < vectors; ++done) pending.Vector(done);
#pragma GCC unroll 32
  for (int j = 0; j < NV; ++j) StoreU(out + j * V, acc[j]);
}

typedef void (*GemvFromFn)(const float*, const int32_t*, const float*,
                           int64_t, int64_t, const float*, float*,
                           const LstmPending&);

template <int NV>
GemvFromFn PickGemvFrom(int64_t nv, bool rev) {
  if constexpr (NV == 0) {
    return nullptr;
  } else {
    if (nv == NV) return rev ? &GemvFrom<NV, true> : &GemvFrom<NV, false>;
    return PickGemvFrom<NV - 1>(nv, rev);
  }
}

// Whether LstmGroupStep runs the plan's steps: batch 1, one stage of
// unshared blocks whose groups own their units (shuffle), whole vectors
// per block, no sparse term, task-major x_proj.
bool GroupStepFits(const RnnPlan& p) {
  const Product& pr = p.recurrent;
  if (p.cell != kLstm || p.batch != 1 || pr.chain.num_stages != 1 ||
      pr.mode != kGroupOwned || HasSlices(pr) || p.x_task_mult != 4)
    return false;
  const Stage& s = pr.chain.stages[0];
  return !s.shared && s.b % V == 0;
}

// Whether the steps keep h (and the output rows) in the slot layout: batch
// 1, one stage of blocks whose groups own their units, for LstmGroupStep
// and the GRU with reset_after. Each thread then writes only its own
// groups' slots; in the natural layout both threads wrote every cache line
// of h at every step (0.3 us of a 2.6 us LSTM step at d = 400 on a 2-core
// Zen 4). RunRnn moves the state in and out of that layout.
bool HSlots(const RnnPlan& p) {
  if (GroupStepFits(p)) return true;
  const Product& pr = p.recurrent;
  if (p.cell != kGru || !p.reset_after || p.batch != 1 ||
      pr.chain.num_stages != 1 || pr.mode != kGroupOwned || HasSlices(pr))
    return false;
  const Stage& s = pr.chain.stages[0];
  return !s.shared && s.b % V == 0;
}

// The inputs of this thread's groups of a one-stage recurrent product
// (LastStage's split), gathered from h in the slot layout into `dst` at
// their natural positions: the GRU's LastStage runs the shared GEMM
// kernels, which read contiguous rows (LstmGroupStep's own GEMV reads
// through the slot table instead).
const float* GroupInputs(const RnnPlan& p, const float* h, int tid, int nt,
                         float* dst) {
  const Stage& s = p.recurrent.chain.stages[0];
  const int64_t g0 = s.g * tid / nt, g1 = s.g * (tid + 1) / nt;
  for (int64_t k = g0 * s.a; k < g1 * s.a; ++k) dst[k] = h[p.slot_of_unit[k]];
  return dst;
}

// One step of this thread's groups: each group's block product in panels
// of at most kGroupNv vectors (the pending gate math in the first), the
// groups walked backwards on odd steps (`rev`, and the rows and panels of
// each block too), so a step starts on the weights the last one used last.
// With the kRecurrentChunks copy each panel is one contiguous stream.
// h_prev and h_next are in the slot layout (RunRnn).
void LstmGroupStep(const StepView& st, int tid, int nt, bool rev,
                   float* z_buffers[2]) {
  const RnnPlan& p = *st.p;
  const Stage& s = p.recurrent.chain.stages[0];
  const int64_t g0 = s.g * tid / nt, g1 = s.g * (tid + 1) / nt;
  const int64_t len = p.units / s.g, nvec = s.b / V;
  const int64_t chunks = Panels(nvec, kGroupNv);
  const float* x_row = p.x_proj + st.t * p.z_width;
  LstmPending pending{&st, nullptr, 0, len};
  for (int64_t j = 0; j < g1 - g0; ++j) {
    const int64_t i = rev ? g1 - 1 - j : g0 + j;
    float* z = z_buffers[j & 1];
    const float* init = x_row + i * s.b;
    for (int64_t cj = 0; cj < chunks; ++cj) {
      const int64_t c = rev ? chunks - 1 - cj : cj;
      const int64_t nv = PanelVectors(nvec, kGroupNv, c);
      const int64_t c0 = PanelStart(nvec, kGroupNv, c) * V;
      const float* w = s.packed != nullptr
                           ? s.packed + i * s.a * s.b + c0 * s.a
                           : s.w + i * s.a * s.b + c0;
      const int64_t ldw = s.packed != nullptr ? nv * V : s.b;
      PickGemvFrom<kGroupNv>(nv, rev)(st.h_prev, p.slot_of_unit + i * s.a,
                                      w, ldw, s.a,
                                      init + c0, z + c0,
                                      cj == 0 ? pending : LstmPending{});
    }
    pending = LstmPending{&st, z, i, len};
  }
  for (int64_t v = 0; v < pending.Vectors(); ++v) pending.Vector(v);
}

// GRU with reset_after (z, r, h): the reset gate multiplies the recurrent
// term including its bias, h~ = tanh(x_h + r * (rec_h + b_rec_h)).
struct GruResetAfterGates {
  static constexpr bool kGroupRows = true;
  const StepView& st;

  // The groups [g0, g1) (of g, len units each) at once, at batch 1 with
  // task-major x_proj: `prod` holds group i's product for gate q, unit l
  // at (i - g0) * 3 * len + q * len + l, the layout of x_proj's row and
  // of the recurrent bias. The pre-activations are summed gate-major over
  // the groups' slots (z and r in v.rows, the h gate's recurrent part
  // after them, its input part in v.z) and h_prev gathered into slot
  // order (v.h_prev), so that the gate math runs whole vectors.
  bool GroupRowsApply(int64_t len) const {
    return st.p->batch == 1 && st.p->x_task_mult == 3 && len % V != 0;
  }
  void GroupRows(int64_t g0, int64_t g1, int64_t g, int64_t len,
                 float* prod) const {
    const RnnPlan& p = *st.p;
    const int64_t slots = (g1 - g0) * len;
    const float* x_row = XProjRow(st, 0, Task{g0, g, len, g0 * len});
    const float* bias = p.recurrent_bias_slots + g0 * len * 3;
    float* zs = st.v.rows;
    float* rs = zs + slots;
    float* hr = rs + slots;
    float* hx = st.v.z;
    float* hp = st.v.h_prev;
    for (int64_t i = 0; i < g1 - g0; ++i) {
      const int64_t from = 3 * i * len, to = i * len;
      for (int64_t l = 0; l < len; l += V) {
        const int64_t n = Min(V, len - l), z = from + l, r = z + len,
                      h = r + len;
        StoreN(zs + to + l,
               LoadN(x_row + z, n) + LoadN(prod + z, n) + LoadN(bias + z, n),
               n);
        StoreN(rs + to + l,
               LoadN(x_row + r, n) + LoadN(prod + r, n) + LoadN(bias + r, n),
               n);
        StoreN(hr + to + l, LoadN(prod + h, n) + LoadN(bias + h, n), n);
        StoreN(hx + to + l, LoadN(x_row + h, n), n);
      }
      const Task tk{g0 + i, g, len, (g0 + i) * len};
      GatherUnits(st.h_prev, st.HUnits(tk), hp + to);
    }
    for (int64_t k = 0; k < slots; k += V) {
      const int64_t n = Min(V, slots - k);
      const vf z = Sigmoid(LoadN(zs + k, n));
      const vf r = Sigmoid(LoadN(rs + k, n));
      const vf hh = Tanh(LoadN(hx + k, n) + r * LoadN(hr + k, n));
      StoreN(st.v.h + k, z * LoadN(hp + k, n) + (1.0f - z) * hh, n);
    }
    for (int64_t i = g0; i < g1; ++i)
      EmitH(st, st.HUnits(Task{i, g, len, i * len}), 0,
            st.v.h + (i - g0) * len);
  }

  void operator()(const Task& tk, const float* rec, int64_t ldv) const {
    const RnnPlan& p = *st.p;
    const int64_t units = p.units, len = tk.len, xs = p.x_gate_stride;
    const float* rec_bias =
        p.recurrent_bias_slots + tk.first_slot * p.x_task_mult;
    float* task_h = st.v.h;
    float* task_h_prev = st.v.h_prev;
    for (int64_t b = 0; b < p.batch; ++b) {
      const float* rec_row = rec + b * ldv;
      const float* x_row = XProjRow(st, b, tk);
      GatherUnits(st.h_prev + b * units, st.HUnits(tk), task_h_prev);
      for (int64_t l = 0; l < len; l += V) {
        const int64_t n = Min(V, len - l);
        const vf z = Sigmoid(LoadN(x_row + l, n) + LoadN(rec_row + l, n) +
                             LoadN(rec_bias + l, n));
        const vf r = Sigmoid(LoadN(x_row + xs + l, n) +
                             LoadN(rec_row + len + l, n) +
                             LoadN(rec_bias + xs + l, n));
        const vf hh = Tanh(LoadN(x_row + 2 * xs + l, n) +
                           r * (LoadN(rec_row + 2 * len + l, n) +
                                LoadN(rec_bias + 2 * xs + l, n)));
        const vf hp = LoadN(task_h_prev + l, n);
        StoreN(task_h + l, z * hp + (1.0f - z) * hh, n);
      }
      EmitH(st, st.HUnits(tk), b);
    }
  }
};

// GRU without reset_after, product A (z, r): stores z and r * h_prev for
// every unit; the candidate product needs all of r * h_prev first.
struct GruGatesA {
  static constexpr bool kGroupRows = false;
  const StepView& st;
  void operator()(const Task& tk, const float* rec, int64_t ldv) const {
    const RnnPlan& p = *st.p;
    const int64_t units = p.units, len = tk.len;
    float* task_h_prev = st.v.h_prev;
    float* task_z = st.v.z;
    float* task_r_h_prev = st.v.r_h_prev;
    for (int64_t b = 0; b < p.batch; ++b) {
      const float* rec_row = rec + b * ldv;
      const float* x_row = XProjRow(st, b, tk);
      GatherUnits(st.h_prev + b * units, tk, task_h_prev);
      for (int64_t l = 0; l < len; l += V) {
        const int64_t n = Min(V, len - l);
        const vf z = Sigmoid(LoadN(x_row + l, n) + LoadN(rec_row + l, n));
        const vf r = Sigmoid(LoadN(x_row + p.x_gate_stride + l, n) +
                             LoadN(rec_row + len + l, n));
        StoreN(task_z + l, z, n);
        StoreN(task_r_h_prev + l, r * LoadN(task_h_prev + l, n), n);
      }
      ScatterUnits(task_z, tk, p.update_gate + b * units);
      ScatterUnits(task_r_h_prev, tk, p.reset_h_prev + b * units);
    }
  }
};

// GRU without reset_after, product B: h~ = tanh(x_h + (r * h_prev) @ B),
// h' = z * h_prev + (1 - z) * h~.
struct GruCandidate {
  static constexpr bool kPresent = true;
  static constexpr bool kGroupRows = false;
  const StepView& st;
  void operator()(const Task& tk, const float* rec, int64_t ldv) const {
    const RnnPlan& p = *st.p;
    const int64_t units = p.units, len = tk.len;
    float* task_h = st.v.h;
    float* task_h_prev = st.v.h_prev;
    float* task_z = st.v.z;
    for (int64_t b = 0; b < p.batch; ++b) {
      const float* rec_row = rec + b * ldv;
      const float* x_row = XProjRow(st, b, tk) + 2 * p.x_gate_stride;
      GatherUnits(st.h_prev + b * units, tk, task_h_prev);
      GatherUnits(p.update_gate + b * units, tk, task_z);
      for (int64_t l = 0; l < len; l += V) {
        const int64_t n = Min(V, len - l);
        const vf hh = Tanh(LoadN(x_row + l, n) + LoadN(rec_row + l, n));
        const vf z = LoadN(task_z + l, n);
        StoreN(task_h + l, z * LoadN(task_h_prev + l, n) + (1.0f - z) * hh,
               n);
      }
      EmitH(st, tk, b);
    }
  }
};

// For cells whose recurrent product produces every gate.
struct NoCandidate {
  static constexpr bool kPresent = false;
  static constexpr bool kGroupRows = false;
};

// The step loop of every cell: the recurrent product's intermediate
// stages, its last stage fused with `Gates`, and for the GRU without
// reset_after the candidate product fused with `Candidate`.
// `group_step`: LstmGroupStep runs the steps instead (GroupStepFits).
template <class Gates, class Candidate>
void RecurrentPhase(const RnnPlan& p, int tid, int nt, Sync& sync,
                    bool group_step, int64_t s0, int64_t s1, XProjRows xr) {
  const int64_t batch = p.batch, units = p.units;
  float* thread_scratch = p.scratch + tid * p.scratch_stride;
  float* task_product = thread_scratch + p.off_task_product;
  float* unshuffled = thread_scratch + p.off_shuffle;
  const int64_t max_units =
      Max(p.recurrent.max_task_units, p.candidate.max_task_units);
  TaskVectors v;
  v.h = thread_scratch + p.off_task_vectors;
  v.h_prev = v.h + max_units;
  v.z = v.h_prev + max_units;
  v.r_h_prev = v.z + max_units;
  // Free outside LstmGroupStep; [4 * max_units] at batch 1.
  v.rows = thread_scratch + p.off_task_product_alt;

  float* z_buffers[2] = {task_product,
                         thread_scratch + p.off_task_product_alt};
  const bool h_slots = HSlots(p);

  for (int64_t s = s0; s < s1; ++s) {
    const StepView st{&p, s, p.go_backwards ? p.steps - 1 - s : s,
                      p.h[s & 1], p.h[(s + 1) & 1], v, xr, h_slots};
    const bool rev = (s & 1) != 0;
    if (group_step) {
      LstmGroupStep(st, tid, nt, rev, z_buffers);
      sync.Wait();
      continue;
    }
    int64_t ldx = units;
    // A sparse term's outputs are all computed before the last stage; a
    // chain of 2+ stages has a barrier in Intermediate in between.
    if (HasSlices(p.recurrent)) {
      SparseSlices(p.recurrent.chain.sparse, st.h_prev, units, batch,
                   p.recurrent.gates * units, tid, nt);
      if (p.recurrent.chain.num_stages == 1) sync.Wait();
    }
    const float* in =
        h_slots ? GroupInputs(p, st.h_prev, tid, nt, v.r_h_prev)
                : Intermediate(p.recurrent, st.h_prev, batch, tid, nt, sync,
                               unshuffled, &ldx);
    LastStage(p.recurrent, in, ldx, batch, units, tid, nt, rev, task_product,
              PlusSparse<Gates>{p.recurrent.chain.sparse, batch, units,
                                p.recurrent.gates, Gates{st}});
    if constexpr (Candidate::kPresent) {
      sync.Wait();  // every unit's r * h_prev is written
      if (HasSlices(p.candidate)) {
        SparseSlices(p.candidate.chain.sparse, p.reset_h_prev, units, batch,
                     units, tid, nt);
        if (p.candidate.chain.num_stages == 1) sync.Wait();
      }
      in = Intermediate(p.candidate, p.reset_h_prev, batch, tid, nt, sync,
                        unshuffled, &ldx);
      LastStage(p.candidate, in, ldx, batch, units, tid, nt, rev,
                task_product,
                PlusSparse<Candidate>{p.candidate.chain.sparse, batch, units,
                                      1, Candidate{st}});
    }
    sync.Wait();
  }
}

void Recurrent(const RnnPlan& p, int tid, int nt, Sync& sync, int64_t s0,
               int64_t s1, XProjRows xr) {
  if (p.cell == kLstm)
    RecurrentPhase<LstmGates, NoCandidate>(p, tid, nt, sync,
                                           GroupStepFits(p), s0, s1, xr);
  else if (p.reset_after)
    RecurrentPhase<GruResetAfterGates, NoCandidate>(p, tid, nt, sync, false,
                                                    s0, s1, xr);
  else
    RecurrentPhase<GruGatesA, GruCandidate>(p, tid, nt, sync, false, s0, s1,
                                            xr);
}

// A state row in the slot layout, in place, to the natural one; `copy`
// holds units floats.
void SlotsToNatural(const RnnPlan& p, float* row, float* copy) {
  for (int64_t u = 0; u < p.units; ++u) copy[u] = row[u];
  for (int64_t u = 0; u < p.units; ++u) row[u] = copy[p.slot_of_unit[u]];
}

// The output rows, written in the slot layout (HSlots), back to the
// natural one, the rows split over the threads (after the last step's
// barrier). Each thread's row copy is in x_proj, free by then ([steps,
// z_width] at batch 1: room for 3 * steps threads at least).
void OutputToNatural(const RnnPlan& p, int tid, int nt) {
  const int64_t units = p.units,
                copies = Min(nt, p.steps * p.z_width / units);
  if (tid >= copies) return;
  float* copy = p.x_proj + tid * units;
  for (int64_t s = p.steps * tid / copies; s < p.steps * (tid + 1) / copies;
       ++s)
    SlotsToNatural(p, p.out + s * units, copy);
}

void RnnBody(const RnnPlan& p, int tid, int nt) {
  Sync sync{p.barrier_arrivals, nt, 0};
  const int64_t window = WindowSteps(p);
  if (window > 0) {
    for (int64_t s0 = 0; s0 < p.steps; s0 += window) {
      const int64_t s1 = Min(p.steps, s0 + window);
      const XProjRows xr = InputWindow(p, tid, nt, s0, s1);
      sync.Wait();
      Recurrent(p, tid, nt, sync, s0, s1, xr);
    }
    return;
  }
  InputPhase(p, tid, nt);
  sync.Wait();
  Recurrent(p, tid, nt, sync, 0, p.steps, XProjRows{0, p.steps});
  if (HSlots(p) && p.out != nullptr) OutputToNatural(p, tid, nt);
}

void BlockDiagBody(const BlockDiagPlan& p, int tid, int nt) {
  const int64_t n = p.g * p.a, m = p.g * p.b;
  const int64_t chunks = (p.rows + kRowChunk - 1) / kRowChunk;
  const int64_t items = chunks * p.g;  // (row chunk, group), chunk-major
  const int64_t i0 = items * tid / nt, i1 = items * (tid + 1) / nt;
  // Shuffle: one chunk's unshuffled block product, at most kRowChunk rows.
  float* tmp = p.scratch + tid * Min(kRowChunk, p.rows) * p.b;
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t r = (it / p.g) * kRowChunk, gi = it % p.g;
    const int64_t rc = Min(kRowChunk, p.rows - r);
    const float* x = p.x + r * n + gi * p.a;
    const float* w = p.w + gi * p.a * p.b;
    if (!p.shuffle) {
      Gemm(x, n, rc, w, p.b, p.a, p.b, p.y + r * m + gi * p.b, m);
      continue;
    }
    Gemm(x, n, rc, w, p.b, p.a, p.b, tmp, p.b);
    for (int64_t i = 0; i < rc; ++i) {
      float* y = p.y + (r + i) * m + gi;
      const float* v = tmp + i * p.b;
      for (int64_t j = 0; j < p.b; ++j) y[j * p.g] = v[j];
    }
  }
}

}  // namespace

void RunRnn(const RnnPlan& plan) {
  // With HSlots the steps keep h in the slot layout: the initial state
  // goes in (through the other buffer, free until the first step) and the
  // last one comes back to the natural layout.
  const bool slots = HSlots(plan) && plan.steps > 0;
  if (slots) {
    float* tmp = plan.h[1];
    for (int64_t u = 0; u < plan.units; ++u)
      tmp[plan.slot_of_unit[u]] = plan.h[0][u];
    for (int64_t u = 0; u < plan.units; ++u) plan.h[0][u] = tmp[u];
  }
  if (plan.num_threads <= 1) {
    RnnBody(plan, 0, 1);
  } else {
    // One parallel region for the whole sequence, a barrier per step:
    // thread start-up per region costs more than a small step.
#pragma omp parallel num_threads(plan.num_threads)
    RnnBody(plan, omp_get_thread_num(), omp_get_num_threads());
  }
  if (slots)
    SlotsToNatural(plan, plan.h[plan.steps & 1],
                   plan.h[(plan.steps + 1) & 1]);
}

// The largest dense (g = 1) input stage that is packed: a copy doubles
// the matrix (the Dense scheme's 1600 x 6400 is left to Gemm).
constexpr int64_t kMaxDensePack = int64_t{1} << 20;

// Whether LastStage runs a batch-1 recurrent product of one stage of
// unshared blocks in whole vectors, group-owned (the GRU's; the LSTM's
// when not GroupStepFits), from the kRecurrentChunks copy.
bool GroupGemvFits(const RnnPlan& p) {
  const Product& pr = p.recurrent;
  if (p.batch != 1 || pr.chain.num_stages != 1 || pr.mode != kGroupOwned ||
      HasSlices(pr))
    return false;
  const Stage& s = pr.chain.stages[0];
  return !s.shared && s.b % V == 0;
}

// Whether stage `stage` of the recurrent product of a batch-1 chain of 2+
// stages (not a group-owned last stage) is read from a kRecurrentChunks
// copy (PackedColumns): unshared blocks of whole vectors, a dense stage
// only up to kMaxDensePack floats.
bool ChainGemvFits(const RnnPlan& p, int stage) {
  const Product& pr = p.recurrent;
  const Stage& s = pr.chain.stages[stage];
  const bool last = stage == pr.chain.num_stages - 1;
  return p.batch == 1 && pr.chain.num_stages > 1 &&
         !(last && pr.mode == kGroupOwned) && !s.shared && s.b % V == 0 &&
         (s.g > 1 || s.a * s.b <= kMaxDensePack);
}

int PackLayoutFor(const RnnPlan& plan, int product, int stage) {
  // A recurrent block of one panel is its own packed copy (rows of
  // b = panel width floats, one after the other): a copy would only cost
  // (a caller passing NumPy arrays gets a new tensor, and a packing, per
  // call).
  if (product == 1) {
    const Stage& s = plan.recurrent.chain.stages[stage];
    if (Panels(s.b / V, kGroupNv) <= 1) return kNoPack;
    if (stage == 0 && (GroupStepFits(plan) || GroupGemvFits(plan)))
      return kRecurrentChunks;
    return ChainGemvFits(plan, stage) ? kRecurrentChunks : kNoPack;
  }
  // Input stages of whole vectors whose output is written unshuffled (the
  // last stage's shuffle is folded into the gather).
  const Chain& ch = plan.input;
  const Stage& s = ch.stages[stage];
  const bool last = stage == ch.num_stages - 1;
  return !s.shared && s.b % V == 0 && (last || !s.shuffle) &&
                 (s.g > 1 || s.a * s.b <= kMaxDensePack)
             ? kInputPanels
             : kNoPack;
}

void PackStage(const Stage& s, int layout, float* dst) {
  const int64_t nvec = s.b / V;
  const int64_t max_nv = layout == kInputPanels ? kInputNv : kGroupNv;
  for (int64_t i = 0; i < s.g; ++i) {
    const float* block = s.w + i * s.a * s.b;
    float* out = dst + i * s.a * s.b;
    for (int64_t c = 0; c < Panels(nvec, max_nv); ++c) {
      const int64_t width = PanelVectors(nvec, max_nv, c) * V;
      const int64_t c0 = PanelStart(nvec, max_nv, c) * V;
      float* panel = out + c0 * s.a;
      for (int64_t k = 0; k < s.a; ++k)
        for (int64_t j = 0; j < width; ++j)
          panel[k * width + j] = block[k * s.b + c0 + j];
    }
  }
}

void RunBlockDiag(const BlockDiagPlan& plan) {
  if (plan.num_threads <= 1) {
    BlockDiagBody(plan, 0, 1);
    return;
  }
#pragma omp parallel num_threads(plan.num_threads)
  BlockDiagBody(plan, omp_get_thread_num(), omp_get_num_threads());
}
