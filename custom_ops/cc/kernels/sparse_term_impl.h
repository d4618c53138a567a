// The sparse additive term of a product (SparseTerm in rnn_engine.h):
// y += x @ S with S given as CSR of S^T, so each output column j is one
// sparse dot product over the input row. Included by rnn_engine_impl.h
// inside its anonymous namespace (it uses vf, V, LoadU, Splat, Task); like
// that file it includes nothing.
//
// Two shapes of work:
// - the input product of all steps (many rows): a chunk of rows is
//   transposed once, so that every non-zero (i, j) becomes a vector
//   multiply-add of x^T's row i over the chunk's rows;
// - a recurrent task (one step, the batch): for each output the task owns,
//   a gathered dot product of the CSR row with h. Outputs are split between
//   tasks as the last stage splits them, so threads never write the same
//   place.

// Up to NB vectors of rows (NB * V rows of x^T) of output column j.
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
  float acc[kRowChunk + V];
  for (int64_t j = 0; j < m; ++j) {
    if (sp.row_ptr[j] == sp.row_ptr[j + 1]) continue;
    for (int64_t v0 = 0; v0 < ldt; v0 += 4 * V) {
      const float* xv = xt + v0;
      float* a = acc + v0;
      switch (Min(4, (ldt - v0) / V)) {
        case 4:
          SparseColumnRows<4>(sp, j, xv, ldt, a);
          break;
        case 3:
          SparseColumnRows<3>(sp, j, xv, ldt, a);
          break;
        case 2:
          SparseColumnRows<2>(sp, j, xv, ldt, a);
          break;
        default:
          SparseColumnRows<1>(sp, j, xv, ldt, a);
      }
    }
    const int64_t dest =
        last.shuffle ? (j % last.g) * last.b + j / last.g : j;
    for (int64_t r = 0; r < rows; ++r) y[r * ldy + dest] += acc[r];
  }
}

// sum_k values[k] * x[col_idx[k]] over k in [k0, k1).
inline float SparseDot(const SparseTerm& sp, int64_t k0, int64_t k1,
                       const float* x) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  const int32_t* col = sp.col_idx;
  const float* val = sp.values;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    s0 += val[k] * x[col[k]];
    s1 += val[k + 1] * x[col[k + 1]];
    s2 += val[k + 2] * x[col[k + 2]];
    s3 += val[k + 3] * x[col[k + 3]];
  }
  for (; k < k1; ++k) s0 += val[k] * x[col[k]];
  return (s0 + s1) + (s2 + s3);
}

// Adds S's part of a recurrent task's product: rec[b * ldv + q * tk.len +
// l] (gate q, l-th unit of the task) gets output column q * units + unit
// of x @ S for every row b of x [batch, ldx].
void SparseTaskAdd(const SparseTerm& sp, const float* x, int64_t ldx,
                   int64_t batch, int64_t units, int gates, const Task& tk,
                   float* rec, int64_t ldv) {
  if (sp.row_ptr == nullptr || sp.nnz == 0) return;
  for (int q = 0; q < gates; ++q)
    for (int64_t l = 0; l < tk.len; ++l) {
      const int64_t j = q * units + tk.first_unit + l * tk.unit_stride;
      const int64_t k0 = sp.row_ptr[j], k1 = sp.row_ptr[j + 1];
      if (k0 == k1) continue;
      for (int64_t b = 0; b < batch; ++b)
        rec[b * ldv + q * tk.len + l] += SparseDot(sp, k0, k1, x + b * ldx);
    }
}

// A gate functor (rnn_engine_impl.h) behind the sparse term: adds x @ S to
// the task's product, then runs the gate math on it.
template <class Gates>
struct PlusSparse {
  const SparseTerm& sp;
  const float* x;  // the product's input, [batch, units]
  int64_t batch, units;
  int gates;
  Gates next;
  void operator()(const Task& tk, float* rec, int64_t ldv) const {
    SparseTaskAdd(sp, x, units, batch, units, gates, tk, rec, ldv);
    next(tk, rec, ldv);
  }
};
