// The sliced form of a recurrent product's sparse term (SparseTerm in
// rnn_engine.h), packed from its CSR arrays, and a cache of it per op
// kernel: a call whose CSR arrays equal (bit for bit) those of the last
// packed call reuses that packing and skips the content checks it already
// passed. Included by antman_kernels.cc only.
#ifndef KERAS_ANTMAN_SPARSE_PACK_H_
#define KERAS_ANTMAN_SPARSE_PACK_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

#include "custom_ops/cc/kernels/rnn_engine.h"

namespace keras_antman {

// Which sliced form the AVX-512 engine takes (keras_antman_set_sparse_form;
// tests force each): by estimated cost, or always one.
enum SparseForm { kFormAuto = 0, kFormGathered = 1, kFormWindowed = 2 };

inline std::atomic<int>& SparseFormSetting() {
  static std::atomic<int> form{kFormAuto};
  return form;
}

// What a term is packed for: 0, the gathered form (the generic and AVX2
// engines); 1 + SparseFormSetting(), the AVX-512 engine under that setting,
// or any engine when the windowed form is forced (the others then run it
// with a plain loop: for tests).
inline int PackKind(bool avx512) {
  const int form = SparseFormSetting().load();
  return avx512 || form == kFormWindowed ? 1 + form : 0;
}

// A sliced term (either form) and the CSR arrays it was packed from.
struct PackedSparse {
  int kind = 0;           // PackKind it was packed for
  bool windowed = false;  // the form chosen
  int64_t n = 0, m = 0;
  std::vector<int32_t> row_ptr, col_idx;
  std::vector<float> values;
  int64_t num_slices = 0;
  std::vector<int64_t> slice_ptr;
  std::vector<int32_t> slice_out;
  std::vector<int32_t> slice_col;  // gathered form
  std::vector<float> slice_val;
  std::vector<int64_t> slice_idx0;  // windowed form
  std::vector<uint16_t> vec_col;
  std::vector<uint16_t> vec_mask;
  std::vector<uint8_t> vec_idx;
  std::vector<float> vec_val;  // from vec_val_skip: 64-byte aligned
  int64_t vec_val_skip = 0;

  // Whether this was packed, in this form, from exactly these arrays.
  bool Matches(int for_kind, int64_t rows_in, int64_t outputs,
               const int32_t* ptr, const int32_t* col, const float* val,
               int64_t nnz) const {
    return for_kind == kind && rows_in == n && outputs == m &&
           nnz == static_cast<int64_t>(col_idx.size()) &&
           std::memcmp(ptr, row_ptr.data(), (m + 1) * sizeof(int32_t)) == 0 &&
           std::memcmp(col, col_idx.data(), nnz * sizeof(int32_t)) == 0 &&
           std::memcmp(val, values.data(), nnz * sizeof(float)) == 0;
  }

  // Points the sliced fields of `sp` (whose CSR fields are set) here.
  void Attach(SparseTerm* sp) const {
    sp->num_slices = num_slices;
    sp->windowed = windowed;
    sp->slice_ptr = slice_ptr.data();
    sp->slice_out = slice_out.data();
    sp->slice_col = slice_col.data();
    sp->slice_val = slice_val.data();
    sp->slice_idx0 = slice_idx0.data();
    sp->vec_col = vec_col.data();
    sp->vec_mask = vec_mask.data();
    sp->vec_idx = vec_idx.data();
    sp->vec_val = vec_val.data() + vec_val_skip;
  }
};

// Outputs sorted by entry count (longest first), 16 per slice, so that a
// slice's lanes have about as many entries each: slice_out.
inline void SliceOutputs(PackedSparse* p) {
  const int32_t* rp = p->row_ptr.data();
  std::vector<int32_t> order(p->m);
  for (int64_t j = 0; j < p->m; ++j) order[j] = static_cast<int32_t>(j);
  std::stable_sort(order.begin(), order.end(), [rp](int32_t a, int32_t b) {
    return rp[a + 1] - rp[a] > rp[b + 1] - rp[b];
  });
  p->num_slices = (p->m + kSliceLanes - 1) / kSliceLanes;
  p->slice_out.assign(p->num_slices * kSliceLanes, -1);
  std::copy(order.begin(), order.end(), p->slice_out.begin());
}

// Gathered form: each slice as long as its longest row (padding: column 0,
// value 0).
inline void PackGathered(PackedSparse* p) {
  const int32_t* rp = p->row_ptr.data();
  const int64_t slices = p->num_slices;
  p->slice_ptr.assign(slices + 1, 0);
  for (int64_t s = 0; s < slices; ++s) {
    const int32_t j = p->slice_out[s * kSliceLanes];
    p->slice_ptr[s + 1] = p->slice_ptr[s] + rp[j + 1] - rp[j];
  }
  p->slice_col.assign(p->slice_ptr[slices] * kSliceLanes, 0);
  p->slice_val.assign(p->slice_ptr[slices] * kSliceLanes, 0.0f);
  for (int64_t i = 0; i < p->m; ++i) {
    const int64_t s = i / kSliceLanes, lane = i % kSliceLanes;
    const int32_t j = p->slice_out[i];
    for (int32_t t = 0; t < rp[j + 1] - rp[j]; ++t) {
      const int64_t at = (p->slice_ptr[s] + t) * kSliceLanes + lane;
      p->slice_col[at] = p->col_idx[rp[j] + t];
      p->slice_val[at] = p->values[rp[j] + t];
    }
  }
}

// Set bits of a 16-bit mask (SWAR: this file is built without -mpopcnt,
// where __builtin_popcount is a library call).
inline uint32_t Popcount16(uint32_t x) {
  x = x - ((x >> 1) & 0x5555u);
  x = (x & 0x3333u) + ((x >> 2) & 0x3333u);
  x = (x + (x >> 4)) & 0x0F0Fu;
  return (x + (x >> 8)) & 0x1Fu;
}

// Windowed form, greedily: while a lane of the slice has entries left,
// one vector reads the 16-column block of x where most lanes have one (A),
// and the block where most of the other lanes have one (B); every lane
// with an entry in A or B takes one there. Each block keeps the lanes
// with entries left as a bit mask, so a choice is a popcount per block. About 1.4x fewer vectors than
// fixed 32-column windows on random 5% dense S (lanes used 54% instead of
// 39%).
inline void PackWindowed(PackedSparse* p) {
  struct Entry {
    int32_t block, col;
    float val;
  };
  constexpr int64_t L = kSliceLanes;
  const int32_t* rp = p->row_ptr.data();
  const int64_t blocks = (p->n + kBlockColumns - 1) / kBlockColumns;
  std::vector<int32_t> local(blocks, -1);  // block -> its index in `used`
  std::vector<int32_t> used, count, next;
  // Per block in `used`: the lanes with entries left, and a count.
  std::vector<uint32_t> has, cnt;
  std::vector<Entry> e;
  // Block u is read from column BlockStart(u): the last one is moved back
  // to end at n, so that every 16-float load stays inside x (n >= 16).
  const auto block_start = [p](int64_t u) {
    return static_cast<int32_t>(
        p->n >= kBlockColumns ? std::min(u * kBlockColumns,
                                         p->n - kBlockColumns)
                              : 0);
  };
  p->slice_ptr.assign(1, 0);
  p->slice_idx0.clear();
  std::vector<float> val;  // vec_val, before it is aligned
  int64_t groups = 0;  // 4-vector groups of vec_idx so far
  for (int64_t s = 0; s < p->num_slices; ++s) {
    // Each lane's entries, grouped by block: lane l's entries in block
    // used[u] are e[next[l * nu + u] ...] until count runs out.
    e.clear();
    used.clear();
    int64_t lane_start[L + 1] = {};
    for (int64_t l = 0; l < L; ++l) {
      const int32_t j = p->slice_out[s * L + l];
      const size_t first = e.size();
      if (j >= 0)
        for (int32_t k = rp[j]; k < rp[j + 1]; ++k) {
          const int32_t c = p->col_idx[k];
          const int32_t b = static_cast<int32_t>(c / kBlockColumns);
          if (local[b] < 0) {
            local[b] = static_cast<int32_t>(used.size());
            used.push_back(b);
          }
          e.push_back({b, c, p->values[k]});
        }
      std::sort(e.begin() + first, e.end(),
                [](const Entry& a, const Entry& b) { return a.block < b.block; });
      lane_start[l + 1] = static_cast<int64_t>(e.size());
    }
    const int64_t nu = static_cast<int64_t>(used.size());
    count.assign(L * nu, 0);
    next.assign(L * nu, 0);
    has.assign(nu, 0);
    cnt.assign(nu, 0);
    for (int64_t l = 0; l < L; ++l)
      for (int64_t k = lane_start[l + 1] - 1; k >= lane_start[l]; --k) {
        const int32_t u = local[e[k].block];
        if (count[l * nu + u]++ == 0) has[u] |= 1u << l;
        next[l * nu + u] = static_cast<int32_t>(k);
      }
    // The first block (lowest index) with the most lanes in `lanes`: the
    // counts in a loop of its own (vectorised), then the scan.
    const auto best = [&has, &cnt, nu](uint32_t lanes) {
      for (int64_t u = 0; u < nu; ++u) cnt[u] = Popcount16(has[u] & lanes);
      int64_t arg = 0;
      for (int64_t u = 1; u < nu; ++u)
        if (cnt[u] > cnt[arg]) arg = u;
      return std::make_pair(arg, cnt[arg]);
    };
    int64_t left = lane_start[L];
    p->slice_idx0.push_back(groups);
    int64_t t = 0;  // vectors of this slice so far
    while (left > 0) {
      const int64_t a = best(~0u).first;
      const auto [b, lanes_b] = best(~has[a] & 0xFFFFu);
      const bool has_b = lanes_b > 0;
      uint16_t mask = 0;
      if (t % 4 == 0) p->vec_idx.resize(p->vec_idx.size() + 4 * L, 0);
      uint8_t* idx = p->vec_idx.data() + (groups + t / 4) * 4 * L + t % 4;
      const int32_t sa = block_start(used[a]);
      const int32_t sb = block_start(has_b ? used[b] : used[a]);
      float* v = &*val.insert(val.end(), L, 0.0f);
      for (int64_t l = 0; l < L; ++l) {
        int64_t u = a;
        if (count[l * nu + a] == 0) {
          if (!has_b || count[l * nu + b] == 0) continue;
          u = b;
        }
        const Entry& x = e[next[l * nu + u]++];
        if (--count[l * nu + u] == 0) has[u] &= ~(1u << l);
        --left;
        mask |= static_cast<uint16_t>(1u << l);
        idx[4 * l] = static_cast<uint8_t>(
            u == a ? x.col - sa : kBlockColumns + x.col - sb);
        v[l] = x.val;
      }
      p->vec_col.push_back(static_cast<uint16_t>(sa));
      p->vec_col.push_back(static_cast<uint16_t>(sb));
      p->vec_mask.push_back(mask);
      ++t;
    }
    groups += (t + 3) / 4;
    for (int32_t b : used) local[b] = -1;
    p->slice_ptr.push_back(static_cast<int64_t>(p->vec_mask.size()));
  }
  // The values 64-byte aligned: each vector's are one aligned load.
  p->vec_val.assign(val.size() + kSliceLanes, 0.0f);
  p->vec_val_skip = static_cast<int64_t>(
      (64 - reinterpret_cast<uintptr_t>(p->vec_val.data()) % 64) % 64 /
      sizeof(float));
  std::copy(val.begin(), val.end(), p->vec_val.begin() + p->vec_val_skip);
}

// Packings made in this process (keras_antman_sparse_packs, for tests of
// the cache).
inline std::atomic<int64_t>& SparsePackCount() {
  static std::atomic<int64_t> count{0};
  return count;
}

// A windowed vector costs about 1/5 of a 16-lane gather (Zen 4, AVX-512,
// d = 800, x aligned as in the op, bench/sparse_step.cc: 1.27-1.35 ns
// against 6.5-7.9 ns per step-vector on 0.5% to 1.9% dense S; at 1% the
// windowed form takes 3.6 vectors per gather and ran an op call 1.14x
// faster than the gathered one). With the values packed (vexpandps,
// before lane-padded values) the ratio was 3.1. The windowed form wins on
// denser S, whose windows have more lanes set.
constexpr int64_t kGatherCostInWindowedVectors10 = 50;  // x 10

// The sliced form of S [n, m] (CSR of S^T, checked, nnz > 0) for `kind`
// (PackKind): for the AVX-512 engine by default windowed unless that takes
// more than 5 vectors per gathered one.
inline std::shared_ptr<const PackedSparse> PackSparse(
    int kind, int64_t n, int64_t m, const int32_t* row_ptr,
    const int32_t* col_idx, const float* values, int64_t nnz) {
  auto p = std::make_shared<PackedSparse>();
  p->kind = kind;
  p->n = n;
  p->m = m;
  p->row_ptr.assign(row_ptr, row_ptr + m + 1);
  p->col_idx.assign(col_idx, col_idx + nnz);
  p->values.assign(values, values + nnz);
  SparsePackCount().fetch_add(1);
  SliceOutputs(p.get());
  if (kind == 1 + kFormAuto || kind == 1 + kFormWindowed) {
    int64_t gathers = 0;  // the gathered form's vectors: longest rows
    for (int64_t s = 0; s < p->num_slices; ++s) {
      const int32_t j = p->slice_out[s * kSliceLanes];
      gathers += row_ptr[j + 1] - row_ptr[j];
    }
    // The windowed form takes the outputs in order (slice s: outputs
    // 16 s ...), so that a step stores a slice's 16 results as one vector:
    // on random 5% dense S that needs 2% more vectors than sorted slices,
    // and saves the scatter (a tenth of the step).
    std::iota(p->slice_out.begin(), p->slice_out.begin() + m, 0);
    PackWindowed(p.get());
    // Block starts are 16-bit: n - 16 < 2^16, else the gathered form.
    p->windowed = n <= 65536 && (kind == 1 + kFormWindowed ||
                                 10 * p->slice_ptr[p->num_slices] <=
                                     kGatherCostInWindowedVectors10 * gathers);
    if (p->windowed) return p;
    SliceOutputs(p.get());
    p->slice_ptr.clear();
    p->slice_idx0 = {};
    p->vec_col = {};
    p->vec_mask = {};
    p->vec_idx = {};
    p->vec_val = {};
  }
  PackGathered(p.get());
  return p;
}

// The last packing of one product's term in one op kernel. Entries are
// immutable and shared, so concurrent calls may hold an entry while another
// call replaces it.
class SparsePackCache {
 public:
  // The cached packing when it was made from exactly these arrays in this
  // form, else null. O(nnz): a comparison, no allocation.
  std::shared_ptr<const PackedSparse> Find(int kind, int64_t n,
                                           int64_t m, const int32_t* row_ptr,
                                           const int32_t* col_idx,
                                           const float* values,
                                           int64_t nnz) const {
    std::shared_ptr<const PackedSparse> e;
    {
      std::lock_guard<std::mutex> lock(mu_);
      e = entry_;
    }
    if (e && e->Matches(kind, n, m, row_ptr, col_idx, values, nnz))
      return e;
    return nullptr;
  }

  void Put(std::shared_ptr<const PackedSparse> e) {
    std::lock_guard<std::mutex> lock(mu_);
    entry_ = std::move(e);
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const PackedSparse> entry_;
};

}  // namespace keras_antman

#endif  // KERAS_ANTMAN_SPARSE_PACK_H_
