// The sparse additive term of a product (SparseTerm in rnn_engine.h):
// y += x @ S with S given as CSR of S^T, so each output column j is one
// sparse dot product over the input row. Included by rnn_engine_impl.h
// inside its anonymous namespace (it uses vf, V, LoadU, Splat, Task); like
// that file it includes nothing. The gathers are intrinsics, chosen by
// KA_VBYTES: rnn_engine_avx2.cc and rnn_engine_avx512.cc include
// <immintrin.h> for them; the generic build loops.
//
// Two shapes of work:
// - the input product of all steps (many rows): a chunk of rows is
//   transposed once, so that every non-zero (i, j) becomes a vector
//   multiply-add of x^T's row i over the chunk's rows;
// - a recurrent step (the batch): the sliced form (SparseTerm), 16
//   outputs per vector, slices split between threads, into a [batch, m]
//   buffer that each task then reads its outputs from. The AVX-512 engine
//   runs the windowed form where it is cheaper (a permute of two
//   registers holding two 16-float blocks of x per vector: WindowDot),
//   the others the gathered one (a vector gather per entry: SliceDot).

// Up to NB vectors of rows (NB * V rows of x^T) of output column j. No
// software prefetch of the rows of later entries: x^T is in L2, and
// fetching each entry's rows 8 ahead (NB more loads per entry) made the
// input product 1.5-3% slower per op call (Zen 4, AVX-512, doped KP at
// 25x to 1% dense S, d = 800).
template <int NB>
inline void SparseColumnRows(const SparseTerm& sp, int64_t j, const float* xt,
                             int64_t ldt, float* acc_out) {
  vf acc[NB];
#pragma GCC unroll 4
  for (int v = 0; v < NB; ++v) acc[v] = Splat(0.0f);
  const int64_t k1 = sp.row_ptr[j + 1];
  for (int64_t k = sp.row_ptr[j]; k < k1; ++k) {
    const vf w = Splat(sp.values[k]);
    const float* xr = xt + sp.col_idx[k] * ldt;
#pragma GCC unroll 4
    for (int v = 0; v < NB; ++v) acc[v] += w * LoadU(xr + v * V);
  }
#pragma GCC unroll 4
  for (int v = 0; v < NB; ++v) StoreU(acc_out + v * V, acc[v]);
}

// Rows [0, rows) of x (rows <= kRowChunk, stride ldx, n inputs) times S,
// added to y: output column j lands at column dest(j) of y (the unshuffled
// place of j when the product's last stage shuffles, so that the sum goes
// through the same gather as the stages' output). `xt` holds n * kRowChunk
// floats.
void SparseRowsAdd(const SparseTerm& sp, int64_t n, int64_t m,
                   const Stage& last, const float* x, int64_t ldx,
                   int64_t rows, float* xt, float* y, int64_t ldy) {
  if (sp.row_ptr == nullptr || sp.nnz == 0 || rows <= 0) return;
  const int64_t ldt = (rows + V - 1) / V * V;  // padded with zero rows
  for (int64_t i = 0; i < n; ++i) {
    float* t = xt + i * ldt;
    for (int64_t r = 0; r < rows; ++r) t[r] = x[r * ldx + i];
    for (int64_t r = rows; r < ldt; ++r) t[r] = 0.0f;
  }
  // Destinations (columns of y) in blocks of kDestBlock, so that the adds
  // to each row of y touch one run of columns: dest p holds output j =
  // (p % b) * g + p / b under the last stage's shuffle, else j = p.
  constexpr int64_t kDestBlock = 8;
  float acc[kDestBlock][kRowChunk + V];
  for (int64_t p0 = 0; p0 < m; p0 += kDestBlock) {
    const int64_t pn = Min(kDestBlock, m - p0);
    for (int64_t q = 0; q < pn; ++q) {
      const int64_t p = p0 + q;
      const int64_t j = last.shuffle ? (p % last.b) * last.g + p / last.b : p;
      float* a = acc[q];
      if (sp.row_ptr[j] == sp.row_ptr[j + 1]) {
        for (int64_t r = 0; r < rows; ++r) a[r] = 0.0f;
        continue;
      }
      for (int64_t v0 = 0; v0 < ldt; v0 += 4 * V) {
        const float* xv = xt + v0;
        switch (Min(4, (ldt - v0) / V)) {
          case 4:
            SparseColumnRows<4>(sp, j, xv, ldt, a + v0);
            break;
          case 3:
            SparseColumnRows<3>(sp, j, xv, ldt, a + v0);
            break;
          case 2:
            SparseColumnRows<2>(sp, j, xv, ldt, a + v0);
            break;
          default:
            SparseColumnRows<1>(sp, j, xv, ldt, a + v0);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* yr = y + r * ldy + p0;
      for (int64_t q = 0; q < pn; ++q) yr[q] += acc[q][r];
    }
  }
}

// The 16 lanes of a slice of `len` entries: acc[l] = sum over entries k of
// val[16 k + l] * x[col[16 k + l]], accumulated in registers (two chains,
// so that a gather's latency overlaps the previous multiply-add).
inline void SliceDot(const int32_t* col, const float* val, int64_t len,
                     const float* x, float* acc) {
#if KA_VBYTES == 64
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= len; k += 2) {
    const int32_t* c = col + 16 * k;
    const float* v = val + 16 * k;
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v),
                         _mm512_i32gather_ps(_mm512_loadu_si512(c), x, 4),
                         a0);
    a1 = _mm512_fmadd_ps(
        _mm512_loadu_ps(v + 16),
        _mm512_i32gather_ps(_mm512_loadu_si512(c + 16), x, 4), a1);
  }
  if (k < len)
    a0 = _mm512_fmadd_ps(
        _mm512_loadu_ps(val + 16 * k),
        _mm512_i32gather_ps(_mm512_loadu_si512(col + 16 * k), x, 4), a0);
  _mm512_storeu_ps(acc, _mm512_add_ps(a0, a1));
#elif KA_VBYTES == 32
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t k = 0; k < len; ++k) {
    const int32_t* c = col + 16 * k;
    const float* v = val + 16 * k;
    a0 = _mm256_fmadd_ps(
        _mm256_loadu_ps(v),
        _mm256_i32gather_ps(
            x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)), 4),
        a0);
    a1 = _mm256_fmadd_ps(
        _mm256_loadu_ps(v + 8),
        _mm256_i32gather_ps(
            x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 8)),
            4),
        a1);
  }
  _mm256_storeu_ps(acc, a0);
  _mm256_storeu_ps(acc + 8, a1);
#else
  for (int l = 0; l < 16; ++l) acc[l] = 0.0f;
  for (int64_t k = 0; k < len; ++k)
    for (int l = 0; l < 16; ++l)
      acc[l] += val[16 * k + l] * x[col[16 * k + l]];
#endif
}

// Whether x[0, n) holds no inf or NaN: no float with its exponent field
// all ones (an integer max, which the compiler vectorizes).
inline bool AllFinite(const float* x, int64_t n) {
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    __builtin_memcpy(&bits, x + i, 4);
    bits &= 0x7F800000u;
    top = bits > top ? bits : top;
  }
  return top != 0x7F800000u;
}

// Slice s's outputs of x @ S from the CSR arrays, one sparse dot product
// each, into y [m]: the sliced forms' padded lanes hold value 0 but read
// some column of x, so on an x holding inf or NaN (0 * inf is NaN) they
// would put NaN where S has no entry.
inline void CsrSlice(const SparseTerm& sp, int64_t s, int64_t m,
                     const float* x, float* y) {
  for (int64_t l = 0; l < kSliceLanes; ++l) {
    const int64_t j = sp.windowed ? s * kSliceLanes + l
                                  : sp.slice_out[s * kSliceLanes + l];
    if (j < 0 || j >= m) continue;
    float sum = 0.0f;
    for (int64_t k = sp.row_ptr[j]; k < sp.row_ptr[j + 1]; ++k)
      sum += sp.values[k] * x[sp.col_idx[k]];
    y[j] = sum;
  }
}

// The windowed form's SliceDot: the 16 lanes of slice s over x (n
// floats). Per vector: x's two 16-float blocks (two loads from L1),
// vpermt2ps picks each lane's column from them, and the lanes' values
// (one aligned 64-byte load, zero off the mask) are multiply-added
// without a mask: the padded lanes add 0 * x, 0 as x is finite here
// (SparseSlices; 1.03-1.08x per op call at 10x-25x against the masked
// multiply-add, Zen 4). The values stored lane-padded, not packed, make
// the stream larger (1.25 MB per step at 10x instead of 0.82 MB, beyond
// the 1 MB L2) but drop the vexpandps, which shares the shuffle unit
// with the permute: 1.09-1.13x per op call at 25x-10x (Zen 4). The
// permute indices of four vectors come in one 64-byte load (a byte per
// lane each; vpermt2ps reads the low 5 bits of a 32-bit lane, so vector
// t % 4 = r takes them shifted right by 8 r). One loop over the slice's
// vectors, four chains.
#if KA_VBYTES == 64
// acc + vector k's lanes times x (lanes off the mask add 0), with
// `lanes` its permute indices in the low byte of each 32-bit lane. FULL:
// both blocks are whole 16-float loads (n >= 16: the packing keeps them
// inside x).
template <bool FULL>
inline __m512 WindowTerm(const uint16_t* col, __m512i lanes, int64_t k,
                         const float* x, int64_t n, const float* val,
                         __m512 acc) {
  uint32_t starts;  // both 16-bit block starts in one load
  __builtin_memcpy(&starts, col + 2 * k, 4);
  const int64_t ca = starts & 0xFFFFu, cb = starts >> 16;
  __m512 lo, hi;
  if (FULL) {
    lo = _mm512_loadu_ps(x + ca);
    hi = _mm512_loadu_ps(x + cb);
  } else {  // n < 16: one partial block
    const __mmask16 in = static_cast<__mmask16>((1u << n) - 1);
    lo = _mm512_maskz_loadu_ps(in, x + ca);
    hi = _mm512_maskz_loadu_ps(in, x + cb);
  }
  return _mm512_fmadd_ps(_mm512_load_ps(val + kSliceLanes * k),
                         _mm512_permutex2var_ps(lo, lanes, hi), acc);
}

// Not inlined, with the arrays in locals: inlined into SparseSlices, GCC
// ran out of registers and kept the value pointer in a vector register,
// which put two cross-domain moves on the loop's dependency chain.
template <bool FULL>
__attribute__((noinline)) void WindowDotAvx512(const SparseTerm& sp,
                                               int64_t s, const float* x,
                                               int64_t n, float* acc) {
  const float* val = sp.vec_val;
  const uint16_t* col = sp.vec_col;
  const uint8_t* idx = sp.vec_idx + 64 * sp.slice_idx0[s];
  int64_t k = sp.slice_ptr[s];
  const int64_t k1 = sp.slice_ptr[s + 1];
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; k + 4 <= k1; k += 4, idx += 64) {
    const __m512i g = _mm512_loadu_si512(idx);
    a0 = WindowTerm<FULL>(col, g, k, x, n, val, a0);
    a1 = WindowTerm<FULL>(col, _mm512_srli_epi32(g, 8), k + 1, x, n, val, a1);
    a2 = WindowTerm<FULL>(col, _mm512_srli_epi32(g, 16), k + 2, x, n, val,
                          a2);
    a3 = WindowTerm<FULL>(col, _mm512_srli_epi32(g, 24), k + 3, x, n, val,
                          a3);
  }
  if (k < k1) {  // 1 to 3 vectors left, in one group
    const __m512i g = _mm512_loadu_si512(idx);
    a0 = WindowTerm<FULL>(col, g, k, x, n, val, a0);
    if (k + 1 < k1)
      a1 = WindowTerm<FULL>(col, _mm512_srli_epi32(g, 8), k + 1, x, n, val,
                            a1);
    if (k + 2 < k1)
      a2 = WindowTerm<FULL>(col, _mm512_srli_epi32(g, 16), k + 2, x, n, val,
                            a2);
  }
  _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_add_ps(a0, a1),
                                      _mm512_add_ps(a2, a3)));
}
#endif

inline void WindowDot(const SparseTerm& sp, int64_t s, const float* x,
                      int64_t n, float* acc) {
#if KA_VBYTES == 64
  if (n >= kBlockColumns)
    WindowDotAvx512<true>(sp, s, x, n, acc);
  else
    WindowDotAvx512<false>(sp, s, x, n, acc);
#else
  const uint8_t* idx = sp.vec_idx + 64 * sp.slice_idx0[s];
  const int64_t k0 = sp.slice_ptr[s], k1 = sp.slice_ptr[s + 1];
  for (int l = 0; l < 16; ++l) acc[l] = 0.0f;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t t = k - k0;
    for (int l = 0; l < 16; ++l)
      if ((sp.vec_mask[k] >> l) & 1) {
        const int i = idx[64 * (t / 4) + 4 * l + t % 4];
        const int64_t c = sp.vec_col[2 * k + i / 16] + i % 16;  // < n
        acc[l] += sp.vec_val[kSliceLanes * k + l] * x[c];
      }
  }
#endif
}

// This thread's share of x @ S for a step (x [batch, ldx], ldx = n),
// written to sp.result [batch, m]: the slices are split between threads by
// vectors.
void SparseSlices(const SparseTerm& sp, const float* x, int64_t ldx,
                  int64_t batch, int64_t m, int tid, int nt) {
  static_assert(kSliceLanes == 16, "SliceDot works on 16 lanes");
  const int64_t total = sp.slice_ptr[sp.num_slices];
  const int64_t e0 = total * tid / nt, e1 = total * (tid + 1) / nt;
  int64_t s = 0;
  while (s < sp.num_slices && sp.slice_ptr[s] < e0) ++s;
  // A state holding inf or NaN takes the CSR arrays (CsrSlice).
  const bool finite = AllFinite(x, batch * ldx);
  for (; s < sp.num_slices && sp.slice_ptr[s] < e1; ++s) {
    const int32_t* out = sp.slice_out + s * kSliceLanes;
    for (int64_t b = 0; b < batch; ++b) {
      alignas(64) float acc[kSliceLanes];
      float* y = sp.result + b * m;
      if (!finite) {
        CsrSlice(sp, s, m, x + b * ldx, y);
        continue;
      }
      if (sp.windowed) {  // outputs in order: 16 s ..., stored as a vector
        const int64_t left = m - s * kSliceLanes;
        float* ys = y + s * kSliceLanes;
        WindowDot(sp, s, x + b * ldx, ldx, left >= kSliceLanes ? ys : acc);
        for (int64_t l = 0; l < left && left < kSliceLanes; ++l)
          ys[l] = acc[l];
        continue;
      }
      const int64_t k0 = sp.slice_ptr[s];
      SliceDot(sp.slice_col + k0 * kSliceLanes,
               sp.slice_val + k0 * kSliceLanes, sp.slice_ptr[s + 1] - k0,
               x + b * ldx, acc);
      for (int64_t l = 0; l < kSliceLanes; ++l)
        if (out[l] >= 0) y[out[l]] = acc[l];
    }
  }
  // Slice s runs on the thread whose entry range holds its first entry.
  // Empty slices at the end (in the gathered form, outputs without entries
  // are sorted last) never run: their results stay 0 from the setup.
}

// Whether a recurrent step must compute the sliced term.
inline bool HasSlices(const Product& pr) {
  return pr.chain.sparse.num_slices > 0;
}

// A gate functor (rnn_engine_impl.h) behind the sparse term: adds the
// task's outputs of x @ S (computed by SparseSlices this step) to its
// product, rec[b * ldv + q * tk.len + l] for gate q and the l-th unit,
// then runs the gate math on it.
template <class Gates>
struct PlusSparse {
  const SparseTerm& sp;
  int64_t batch, units;
  int gates;
  Gates next;
  void operator()(const Task& tk, float* rec, int64_t ldv) const {
    Add(tk, rec, ldv);
    next(tk, rec, ldv);
  }

  // Gates::GroupRows (LstmGates, one call for a shared last stage's
  // groups [g0, g1)) after the adds, group by group; false where it does
  // not apply (then nothing is done).
  bool GroupRows(int64_t g0, int64_t g1, int64_t g, int64_t len,
                 float* prod) const {
    if constexpr (Gates::kGroupRows) {
      if (!next.GroupRowsApply(len)) return false;
      const int64_t ldv = (g1 - g0) * gates * len;
      for (int64_t i = g0; i < g1; ++i)
        Add(Task{i, g, len, i * len}, prod + (i - g0) * gates * len, ldv);
      next.GroupRows(g0, g1, g, len, prod);
      return true;
    }
    return false;
  }

  // The task's outputs of x @ S into its product.
  void Add(const Task& tk, float* rec, int64_t ldv) const {
    if (sp.num_slices > 0) {
      const int64_t m = gates * units;
      for (int64_t b = 0; b < batch; ++b)
        for (int q = 0; q < gates; ++q) {
          const float* y = sp.result + b * m + q * units + tk.first_unit;
          float* r = rec + b * ldv + q * tk.len;
          for (int64_t l = 0; l < tk.len; ++l) r[l] += y[l * tk.unit_stride];
        }
    }
  }
};
