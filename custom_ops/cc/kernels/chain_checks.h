// Checks of a stage chain (one product of the structured RNN ops), shared
// by the shape functions (custom_ops/cc/ops/antman_ops.cc, at graph
// construction, where some dims may be unknown) and the kernels
// (antman_kernels.cc, at run time: eager calls run no shape function), so
// that both report a bad chain with the same message.
//
// A chain is 1 to kMaxStages arrays [g, a, b] (a dense matrix is [1, n, m])
// with one shuffle flag each. It is valid when the first stage's input
// g * a is the product's input size, each stage's output g * b is the next
// stage's input and the last output is the product's width; any stage may
// shuffle. A shuffling last stage of a recurrent product needs g dividing
// units, so that each group owns every gate of its units
// (kGroupOwned in rnn_engine.h).
//
// Unlike rnn_engine.h, this header uses TensorFlow's status types; it is
// never included by the per-instruction-set engine files.
#ifndef KERAS_ANTMAN_CHAIN_CHECKS_H_
#define KERAS_ANTMAN_CHAIN_CHECKS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "custom_ops/cc/kernels/rnn_engine.h"
#include "tensorflow/core/platform/errors.h"

namespace keras_antman {

// One product's chain as the op sees it, for checks and messages.
struct ChainSpec {
  std::string list;          // the input list, e.g. "recurrent_stages"
  std::string shuffle_attr;  // its flags, e.g. "recurrent_shuffle"
  std::string what;          // e.g. "the recurrent product, units -> 4 * units"
  int64_t n = -1, m = -1;    // input size and width; -1: unknown
  // Recurrent and candidate products: a shuffling last stage needs its
  // groups to divide `units` (-1: unknown, not checked).
  bool groups_own_units = false;
  int64_t units = -1;
};

// The three kinds of product. `width` is gates * units.
inline ChainSpec InputChainSpec(int gates, int64_t features, int64_t width) {
  ChainSpec spec;
  spec.list = "input_stages";
  spec.shuffle_attr = "input_shuffle";
  spec.what = "the input product, features -> " + std::to_string(gates) +
              " * units";
  spec.n = features;
  spec.m = width;
  return spec;
}

// With a candidate product (GRU without reset_after) this is product A.
inline ChainSpec RecurrentChainSpec(int gates, bool has_candidate,
                                    int64_t units, int64_t width) {
  ChainSpec spec;
  spec.list = "recurrent_stages";
  spec.shuffle_attr = "recurrent_shuffle";
  spec.what = has_candidate
                  ? "the recurrent product A, units -> 2 * units (gates z "
                    "and r)"
                  : "the recurrent product, units -> " +
                        std::to_string(gates) + " * units";
  spec.n = units;
  spec.m = width;
  spec.groups_own_units = true;
  spec.units = units;
  return spec;
}

inline ChainSpec CandidateChainSpec(int64_t units) {
  ChainSpec spec;
  spec.list = "candidate_stages";
  spec.shuffle_attr = "candidate_shuffle";
  spec.what = "the candidate product B, units -> units (applied to r * h)";
  spec.n = units;
  spec.m = units;
  spec.groups_own_units = true;
  spec.units = units;
  return spec;
}

// Dims of one stage; -1: unknown (graph construction only).
struct StageDims {
  int64_t g = -1, a = -1, b = -1;
};

inline std::string StageName(const ChainSpec& spec, int64_t i) {
  return spec.list + "[" + std::to_string(i) + "]";
}

inline std::string FlagsText(const std::vector<bool>& flags) {
  std::string s = "[";
  for (size_t i = 0; i < flags.size(); ++i)
    s += std::string(i ? ", " : "") + (flags[i] ? "true" : "false");
  return s + "]";
}

inline absl::Status StageRankError(const ChainSpec& spec, int64_t i,
                                   const std::string& received) {
  return ::tensorflow::errors::InvalidArgument(
      StageName(spec, i), " must be a rank-3 array [g, a, b] (a dense ",
      "matrix is [1, n, m]); received shape ", received);
}

// What needs no tensor: the number of stages and the shuffle flags.
inline absl::Status CheckChainAttrs(const ChainSpec& spec, int64_t num_stages,
                                    const std::vector<bool>& shuffle) {
  using ::tensorflow::errors::InvalidArgument;
  if (num_stages < 1 || num_stages > kMaxStages)
    return InvalidArgument(spec.list, " must hold 1 to ", kMaxStages,
                           " stages (kMaxStages) for ", spec.what,
                           "; received ", num_stages);
  if (static_cast<int64_t>(shuffle.size()) != num_stages)
    return InvalidArgument(spec.shuffle_attr, " must hold one flag per stage ",
                           "of ", spec.list, " (", num_stages,
                           "); received ", shuffle.size(), " flags ",
                           FlagsText(shuffle));
  return absl::OkStatus();
}

inline absl::Status CheckCandidateAttrs(bool reset_after, int64_t num_stages,
                                        const std::vector<bool>& shuffle) {
  using ::tensorflow::errors::InvalidArgument;
  if (reset_after && num_stages != 0)
    return InvalidArgument(
        "candidate_stages must be empty with reset_after=True (then ",
        "recurrent_stages produce all three gates, units -> 3 * units); ",
        "received ", num_stages, " stages");
  if (!reset_after && num_stages == 0)
    return InvalidArgument(
        "candidate_stages must hold the candidate product B (units -> ",
        "units, applied to r * h) with reset_after=False, where ",
        "recurrent_stages are product A (units -> 2 * units, gates z and r); ",
        "received none");
  if (num_stages == 0 && !shuffle.empty())
    return InvalidArgument("candidate_shuffle must be empty when ",
                           "candidate_stages is; received ",
                           FlagsText(shuffle));
  return absl::OkStatus();
}

// The dims of every stage; `received[i]` is stage i's shape as text. Known
// dims only: an unknown one skips the checks it takes part in.
inline absl::Status CheckChainDims(const ChainSpec& spec,
                                   const std::vector<StageDims>& dims,
                                   const std::vector<bool>& shuffle,
                                   const std::vector<std::string>& received) {
  using ::tensorflow::errors::InvalidArgument;
  const int64_t num = static_cast<int64_t>(dims.size());
  int64_t width = spec.n;  // the input size of stage i
  std::string from = "the input size of " + spec.what;
  for (int64_t i = 0; i < num; ++i) {
    const StageDims& d = dims[i];
    const std::string name = StageName(spec, i);
    if ((d.g >= 0 && d.g < 1) || (d.a >= 0 && d.a < 1) || (d.b >= 0 && d.b < 1))
      return InvalidArgument(name, " must have shape [g, a, b] with g, a, b ",
                             ">= 1; received ", received[i]);
    // Division, not g * a: graph-time dims are not bounded by a tensor.
    if (width >= 0 && d.g >= 1 && d.a >= 1 &&
        (width % d.g != 0 || width / d.g != d.a))
      return InvalidArgument(name, " must have shape [g, a, b] with g * a = ",
                             width, " (", from, "); received ", received[i]);
    width = d.g >= 1 && d.b >= 1 && d.b <= INT64_MAX / d.g ? d.g * d.b : -1;
    from = "the output of " + name;
  }
  if (num == 0) return absl::OkStatus();
  const StageDims& last = dims[num - 1];
  const std::string name = StageName(spec, num - 1);
  if (width >= 0 && spec.m >= 0 && width != spec.m)
    return InvalidArgument(name, " must have shape [g, a, b] with g * b = ",
                           spec.m, " (the output size of ", spec.what,
                           "); received ", received[num - 1]);
  if (spec.groups_own_units && shuffle[num - 1] && spec.units >= 1 &&
      last.g >= 1 && spec.units % last.g != 0)
    return InvalidArgument(
        name, " ends the chain with a shuffle (", spec.shuffle_attr, "[",
        num - 1, "] = true), so its groups g = ", last.g, " must divide ",
        "units = ", spec.units, ": each group then owns every gate of ",
        "units / g units; received ", received[num - 1]);
  return absl::OkStatus();
}

}  // namespace keras_antman

#endif  // KERAS_ANTMAN_CHAIN_CHECKS_H_
