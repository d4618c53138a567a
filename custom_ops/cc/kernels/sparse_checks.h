// Checks of a product's sparse term (SparseTerm in rnn_engine.h), shared by
// the shape functions (graph construction, where dims may be unknown) and
// the kernels (run time, where the contents are checked too), as
// chain_checks.h does for the stages.
//
// A product's sparse term is three op inputs named after it, e.g. for the
// input product input_sparse_row_ptr (int32 [m + 1]), input_sparse_col_idx
// (int32 [nnz]) and input_sparse_values (float [nnz]): S [n, m] as CSR of
// S^T, one CSR row per output column. Each is a list of 0 (no sparse term)
// or 1 tensors, so graphs written before the term existed still load.
#ifndef KERAS_ANTMAN_SPARSE_CHECKS_H_
#define KERAS_ANTMAN_SPARSE_CHECKS_H_

#include <cstdint>
#include <string>

#include "custom_ops/cc/kernels/chain_checks.h"
#include "tensorflow/core/platform/errors.h"

namespace keras_antman {

// "input_stages" -> "input_sparse".
inline std::string SparsePrefix(const ChainSpec& spec) {
  return spec.list.substr(0, spec.list.size() - 7) + "_sparse";
}

inline std::string SparseCountAttr(const ChainSpec& spec) {
  return "num_" + SparsePrefix(spec);
}

inline absl::Status CheckSparseCount(const ChainSpec& spec, int64_t num) {
  if (num < 0 || num > 1)
    return ::tensorflow::errors::InvalidArgument(
        SparseCountAttr(spec), " must be 0 (no sparse term) or 1 (one ",
        "CSR term added to ", spec.what, "); received ", num);
  return absl::OkStatus();
}

// With reset_after the GRU has no candidate product to add a term to.
inline absl::Status CheckCandidateSparseAttr(bool reset_after, int64_t num) {
  if (reset_after && num != 0)
    return ::tensorflow::errors::InvalidArgument(
        "num_candidate_sparse must be 0 with reset_after=True (there is no ",
        "candidate product; a sparse term of the h gate belongs to the ",
        "recurrent product, units -> 3 * units); received ", num);
  return CheckSparseCount(CandidateChainSpec(-1), num);
}

// Ranks and sizes; -1 sizes are unknown (graph construction only) and skip
// the checks they take part in. `*_rank` are the tensors' ranks (-1:
// unknown), `*_size` their lengths.
struct SparseDims {
  int row_ptr_rank = -1, col_idx_rank = -1, values_rank = -1;
  int64_t row_ptr_size = -1, col_idx_size = -1, values_size = -1;
  std::string row_ptr_shape, col_idx_shape, values_shape;  // as text
};

inline absl::Status CheckSparseDims(const ChainSpec& spec,
                                    const SparseDims& d) {
  using ::tensorflow::errors::InvalidArgument;
  const std::string p = SparsePrefix(spec);
  const std::string csr =
      " (CSR of S^T, one row per output column of " + spec.what + ")";
  if (d.row_ptr_rank >= 0 && d.row_ptr_rank != 1)
    return InvalidArgument(p, "_row_ptr must be a rank-1 int32 array [m + ",
                           "1]", csr, "; received shape ", d.row_ptr_shape);
  if (d.col_idx_rank >= 0 && d.col_idx_rank != 1)
    return InvalidArgument(p, "_col_idx must be a rank-1 int32 array [nnz]",
                           csr, "; received shape ", d.col_idx_shape);
  if (d.values_rank >= 0 && d.values_rank != 1)
    return InvalidArgument(p, "_values must be a rank-1 float array [nnz]",
                           csr, "; received shape ", d.values_shape);
  if (spec.m >= 0 && d.row_ptr_size >= 0 && d.row_ptr_size != spec.m + 1)
    return InvalidArgument(p, "_row_ptr must have m + 1 = ", spec.m + 1,
                           " entries", csr, "; received shape ",
                           d.row_ptr_shape);
  if (d.col_idx_size >= 0 && d.values_size >= 0 &&
      d.col_idx_size != d.values_size)
    return InvalidArgument(p, "_col_idx and ", p, "_values must have the ",
                           "same length nnz; received shapes ",
                           d.col_idx_shape, " and ", d.values_shape);
  if (d.col_idx_size > INT32_MAX)
    return InvalidArgument(p, "_col_idx has more than 2^31 - 1 entries ",
                           "(int32 row pointers); received shape ",
                           d.col_idx_shape);
  return absl::OkStatus();
}

// Whether the CSR arrays are valid (CheckSparseContents' conditions), in
// one pass with no early exit, which the compiler vectorizes: a valid term
// (every call of a served model) costs a read of the arrays, not a branch
// per entry.
inline bool SparseContentsValid(int64_t n, int64_t m, const int32_t* row_ptr,
                                const int32_t* col_idx, int64_t nnz) {
  int bad = row_ptr[0] != 0 || row_ptr[m] != nnz;
  for (int64_t j = 0; j < m; ++j) bad |= row_ptr[j + 1] < row_ptr[j];
  // Negative indices wrap to >= 2^31 >= limit.
  const uint32_t limit =
      static_cast<uint32_t>(n < (int64_t{1} << 31) ? n : int64_t{1} << 31);
  for (int64_t k = 0; k < nnz; ++k)
    bad |= static_cast<uint32_t>(col_idx[k]) >= limit;
  return bad == 0;
}

// Run time: row_ptr starts at 0, never decreases and ends at nnz; every
// column index is an input in [0, n). O(m + nnz), before the engine reads
// any of it. A valid term takes the vectorized pass alone; the loops below
// find the first bad entry for the message.
inline absl::Status CheckSparseContents(const ChainSpec& spec,
                                        const int32_t* row_ptr,
                                        const int32_t* col_idx, int64_t nnz) {
  using ::tensorflow::errors::InvalidArgument;
  if (SparseContentsValid(spec.n, spec.m, row_ptr, col_idx, nnz))
    return absl::OkStatus();
  const std::string p = SparsePrefix(spec);
  if (row_ptr[0] != 0)
    return InvalidArgument(p, "_row_ptr[0] must be 0; received ",
                           row_ptr[0]);
  for (int64_t j = 0; j < spec.m; ++j)
    if (row_ptr[j + 1] < row_ptr[j])
      return InvalidArgument(p, "_row_ptr must not decrease; received ", p,
                             "_row_ptr[", j, "] = ", row_ptr[j], " > ", p,
                             "_row_ptr[", j + 1, "] = ", row_ptr[j + 1]);
  if (row_ptr[spec.m] != nnz)
    return InvalidArgument(p, "_row_ptr[m] = ", p, "_row_ptr[", spec.m,
                           "] must equal nnz = ", nnz, " (the length of ",
                           p, "_col_idx); received ", row_ptr[spec.m]);
  for (int64_t k = 0; k < nnz; ++k)
    if (col_idx[k] < 0 || col_idx[k] >= spec.n)
      return InvalidArgument(p, "_col_idx[", k, "] = ", col_idx[k],
                             " is not an input index in [0, ", spec.n,
                             ") of ", spec.what);
  return absl::OkStatus();
}

}  // namespace keras_antman

#endif  // KERAS_ANTMAN_SPARSE_CHECKS_H_
