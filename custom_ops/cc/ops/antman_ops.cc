// Registration of the keras-antman inference ops.
//
// The ops know stages, not schemes: each product is a list of
// block-diagonal arrays [g, a, b] with a shuffle flag per stage, and a
// scheme's lowering (keras_antman/schemes.py) produces that list. The shape
// functions check what graph construction can know (ranks, list and flag
// lengths, the shuffle position, agreeing batch and unit dims, chain dims
// that are static); the kernels (custom_ops/cc/kernels/antman_kernels.cc)
// check every dim again at run time, since eager execution does not run
// shape functions. Both use custom_ops/cc/kernels/chain_checks.h.
#include <string>
#include <vector>

#include "custom_ops/cc/kernels/chain_checks.h"
#include "custom_ops/cc/kernels/sparse_checks.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_antman {
namespace {

using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// One chain at graph construction: attrs, ranks, and the dims known now.
absl::Status CheckStages(InferenceContext* c, const ChainSpec& spec) {
  std::vector<ShapeHandle> shapes;
  TF_RETURN_IF_ERROR(c->input(spec.list, &shapes));
  std::vector<bool> shuffle;
  TF_RETURN_IF_ERROR(c->GetAttr(spec.shuffle_attr, &shuffle));
  TF_RETURN_IF_ERROR(CheckChainAttrs(spec, shapes.size(), shuffle));
  std::vector<StageDims> dims(shapes.size());
  std::vector<std::string> received(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    ShapeHandle stage;
    received[i] = c->DebugString(shapes[i]);
    if (!c->WithRank(shapes[i], 3, &stage).ok())
      return StageRankError(spec, i, received[i]);
    dims[i] = StageDims{c->Value(c->Dim(stage, 0)), c->Value(c->Dim(stage, 1)),
                        c->Value(c->Dim(stage, 2))};
  }
  return CheckChainDims(spec, dims, shuffle, received);
}

// A product's optional sparse term (sparse_checks.h): its count attr, and
// the ranks and lengths known now.
absl::Status CheckSparse(InferenceContext* c, const ChainSpec& spec) {
  int64_t num;
  TF_RETURN_IF_ERROR(c->GetAttr(SparseCountAttr(spec), &num));
  TF_RETURN_IF_ERROR(CheckSparseCount(spec, num));
  if (num == 0) return absl::OkStatus();
  const std::string p = SparsePrefix(spec);
  SparseDims d;
  auto read = [&](const char* suffix, int* rank, int64_t* size,
                  std::string* text) -> absl::Status {
    std::vector<ShapeHandle> list;
    TF_RETURN_IF_ERROR(c->input(p + suffix, &list));
    *text = c->DebugString(list[0]);
    *rank = c->RankKnown(list[0]) ? c->Rank(list[0]) : -1;
    *size = *rank == 1 ? c->Value(c->Dim(list[0], 0)) : -1;
    return absl::OkStatus();
  };
  TF_RETURN_IF_ERROR(
      read("_row_ptr", &d.row_ptr_rank, &d.row_ptr_size, &d.row_ptr_shape));
  TF_RETURN_IF_ERROR(
      read("_col_idx", &d.col_idx_rank, &d.col_idx_size, &d.col_idx_shape));
  TF_RETURN_IF_ERROR(
      read("_values", &d.values_rank, &d.values_size, &d.values_shape));
  return CheckSparseDims(spec, d);
}

absl::Status CheckRank(InferenceContext* c, int index, int rank,
                       const char* name, ShapeHandle* out) {
  absl::Status s = c->WithRank(c->input(index), rank, out);
  if (!s.ok()) return InvalidArgument(name, ": ", s.message());
  return absl::OkStatus();
}

absl::Status MergeDim(InferenceContext* c, DimensionHandle a,
                      DimensionHandle b, const char* what,
                      DimensionHandle* out) {
  absl::Status s = c->Merge(a, b, out);
  if (!s.ok()) return InvalidArgument(what, ": ", s.message());
  return absl::OkStatus();
}

// x [B, T, n_x], initial states [B, H], bias; sets the three or two outputs.
absl::Status RnnShape(InferenceContext* c, bool lstm) {
  ShapeHandle x, h, state, bias;
  TF_RETURN_IF_ERROR(CheckRank(c, 0, 3, "x", &x));
  TF_RETURN_IF_ERROR(CheckRank(c, 1, 2, "initial_h", &h));
  DimensionHandle batch, units = c->Dim(h, 1);
  TF_RETURN_IF_ERROR(MergeDim(c, c->Dim(x, 0), c->Dim(h, 0),
                              "initial_h batch must equal x batch", &batch));
  int bias_index = 2;
  if (lstm) {
    TF_RETURN_IF_ERROR(CheckRank(c, 2, 2, "initial_c", &state));
    ShapeHandle merged;
    absl::Status s = c->Merge(state, h, &merged);
    if (!s.ok())
      return InvalidArgument("initial_c must have the shape of initial_h: ",
                             s.message());
    bias_index = 3;
  }
  bool reset_after = false;
  if (!lstm) TF_RETURN_IF_ERROR(c->GetAttr("reset_after", &reset_after));
  const int gates = lstm ? 4 : 3;
  DimensionHandle width;
  TF_RETURN_IF_ERROR(c->Multiply(units, gates, &width));
  if (!lstm && reset_after) {
    TF_RETURN_IF_ERROR(CheckRank(c, bias_index, 2, "bias", &bias));
    DimensionHandle unused;
    TF_RETURN_IF_ERROR(MergeDim(c, c->Dim(bias, 0), c->MakeDim(2),
                                "bias must have shape [2, 3 * units]",
                                &unused));
    TF_RETURN_IF_ERROR(MergeDim(c, c->Dim(bias, 1), width,
                                "bias must have shape [2, 3 * units]",
                                &unused));
  } else {
    TF_RETURN_IF_ERROR(CheckRank(c, bias_index, 1, "bias", &bias));
    DimensionHandle unused;
    TF_RETURN_IF_ERROR(MergeDim(c, c->Dim(bias, 0), width,
                                lstm ? "bias must have shape [4 * units]"
                                     : "bias must have shape [3 * units]",
                                &unused));
  }
  const int64_t features = c->Value(c->Dim(x, 2));
  const int64_t n_units = c->Value(units);
  const int rec_gates = lstm ? 4 : (reset_after ? 3 : 2);
  auto times_units = [&](int k) {
    return n_units < 0 ? int64_t{-1} : k * n_units;
  };
  const ChainSpec input_spec =
      InputChainSpec(gates, features, times_units(gates));
  const ChainSpec recurrent_spec = RecurrentChainSpec(
      rec_gates, !lstm && !reset_after, n_units, times_units(rec_gates));
  TF_RETURN_IF_ERROR(CheckStages(c, input_spec));
  TF_RETURN_IF_ERROR(CheckStages(c, recurrent_spec));
  TF_RETURN_IF_ERROR(CheckSparse(c, input_spec));
  TF_RETURN_IF_ERROR(CheckSparse(c, recurrent_spec));
  if (!lstm) {
    std::vector<ShapeHandle> candidate;
    TF_RETURN_IF_ERROR(c->input("candidate_stages", &candidate));
    std::vector<bool> shuffle;
    TF_RETURN_IF_ERROR(c->GetAttr("candidate_shuffle", &shuffle));
    TF_RETURN_IF_ERROR(
        CheckCandidateAttrs(reset_after, candidate.size(), shuffle));
    int64_t num_sparse;
    TF_RETURN_IF_ERROR(c->GetAttr("num_candidate_sparse", &num_sparse));
    TF_RETURN_IF_ERROR(CheckCandidateSparseAttr(reset_after, num_sparse));
    if (!candidate.empty()) {
      TF_RETURN_IF_ERROR(CheckStages(c, CandidateChainSpec(n_units)));
      TF_RETURN_IF_ERROR(CheckSparse(c, CandidateChainSpec(n_units)));
    }
  }
  int64_t num_threads;
  TF_RETURN_IF_ERROR(c->GetAttr("num_threads", &num_threads));
  if (num_threads < 0)
    return InvalidArgument("num_threads must be >= 0 (0: the process-wide ",
                           "setting); received ", num_threads);

  bool return_sequences;
  TF_RETURN_IF_ERROR(c->GetAttr("return_sequences", &return_sequences));
  ShapeHandle state_shape = c->MakeShape({batch, units});
  c->set_output(0, return_sequences
                       ? c->MakeShape({batch, c->Dim(x, 1), units})
                       : state_shape);
  c->set_output(1, state_shape);
  if (lstm) c->set_output(2, state_shape);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("KerasAntman>StructuredLstm")
    .Input("x: float")
    .Input("initial_h: float")
    .Input("initial_c: float")
    .Input("bias: float")
    .Input("input_stages: num_input_stages * float")
    .Input("recurrent_stages: num_recurrent_stages * float")
    .Input("input_sparse_row_ptr: num_input_sparse * int32")
    .Input("input_sparse_col_idx: num_input_sparse * int32")
    .Input("input_sparse_values: num_input_sparse * float")
    .Input("recurrent_sparse_row_ptr: num_recurrent_sparse * int32")
    .Input("recurrent_sparse_col_idx: num_recurrent_sparse * int32")
    .Input("recurrent_sparse_values: num_recurrent_sparse * float")
    .Output("output: float")
    .Output("final_h: float")
    .Output("final_c: float")
    .Attr("num_input_stages: int >= 1")
    .Attr("num_recurrent_stages: int >= 1")
    .Attr("num_input_sparse: int >= 0 = 0")
    .Attr("num_recurrent_sparse: int >= 0 = 0")
    .Attr("input_shuffle: list(bool)")
    .Attr("recurrent_shuffle: list(bool)")
    .Attr("go_backwards: bool = false")
    .Attr("return_sequences: bool = false")
    .Attr("num_threads: int = 0")
    .SetShapeFn([](InferenceContext* c) { return RnnShape(c, true); })
    .Doc(R"doc(
Whole-sequence LSTM inference (float32, CPU) with structured products.

z_t = x_t @ K_in + h_{t-1} @ K_rec + bias, gates i, f, c, o as in
keras.layers.LSTM with sigmoid and tanh. K_in and K_rec are chains of
block-diagonal stages: K = blockdiag(S_0) @ ... @ blockdiag(S_last), each
S_i [g, a, b] (a dense matrix is [1, n, m]), the last optionally followed
by the shuffle mix (output j of group i goes to position j * g + i). At most
4 stages per chain. No masks: callers with a mask use stock TF ops.
Inference only; no gradient is registered.

x: [batch, timesteps, features].
initial_h: [batch, units].
initial_c: [batch, units].
bias: [4 * units].
input_stages: the stages of K_in (features -> 4 * units).
recurrent_stages: the stages of K_rec (units -> 4 * units).
output: [batch, timesteps, units] in processing order if return_sequences,
  else the last output [batch, units].
final_h: [batch, units].
final_c: [batch, units].
input_shuffle: one flag per input stage: shuffle-mix that stage's output.
recurrent_shuffle: one flag per recurrent stage; if the last is true, its
  groups must divide units.
input_sparse_row_ptr, input_sparse_col_idx, input_sparse_values: an
  optional sparse term S [features, 4 * units] added to the input product,
  K_in = chain + S, as CSR of S^T: row_ptr int32 [4 * units + 1] (one CSR
  row per output column j), col_idx int32 [nnz] (input indices), values
  [nnz]. Zero or one tensor each (num_input_sparse).
recurrent_sparse_row_ptr, recurrent_sparse_col_idx, recurrent_sparse_values:
  the same for the recurrent product (S [units, 4 * units]).
go_backwards: process the steps in reverse.
num_threads: OpenMP threads; 0 uses the process-wide setting. Small
  problems run on one thread whatever is asked.
)doc");

REGISTER_OP("KerasAntman>StructuredGru")
    .Input("x: float")
    .Input("initial_h: float")
    .Input("bias: float")
    .Input("input_stages: num_input_stages * float")
    .Input("recurrent_stages: num_recurrent_stages * float")
    .Input("candidate_stages: num_candidate_stages * float")
    .Input("input_sparse_row_ptr: num_input_sparse * int32")
    .Input("input_sparse_col_idx: num_input_sparse * int32")
    .Input("input_sparse_values: num_input_sparse * float")
    .Input("recurrent_sparse_row_ptr: num_recurrent_sparse * int32")
    .Input("recurrent_sparse_col_idx: num_recurrent_sparse * int32")
    .Input("recurrent_sparse_values: num_recurrent_sparse * float")
    .Input("candidate_sparse_row_ptr: num_candidate_sparse * int32")
    .Input("candidate_sparse_col_idx: num_candidate_sparse * int32")
    .Input("candidate_sparse_values: num_candidate_sparse * float")
    .Output("output: float")
    .Output("final_h: float")
    .Attr("num_input_stages: int >= 1")
    .Attr("num_recurrent_stages: int >= 1")
    .Attr("num_candidate_stages: int >= 0")
    .Attr("num_input_sparse: int >= 0 = 0")
    .Attr("num_recurrent_sparse: int >= 0 = 0")
    .Attr("num_candidate_sparse: int >= 0 = 0")
    .Attr("input_shuffle: list(bool)")
    .Attr("recurrent_shuffle: list(bool)")
    .Attr("candidate_shuffle: list(bool) = []")
    .Attr("reset_after: bool = true")
    .Attr("go_backwards: bool = false")
    .Attr("return_sequences: bool = false")
    .Attr("num_threads: int = 0")
    .SetShapeFn([](InferenceContext* c) { return RnnShape(c, false); })
    .Doc(R"doc(
Whole-sequence GRU inference (float32, CPU) with structured products.

Gates z, r, h as in keras.layers.GRU with sigmoid and tanh; chains of stages
as in StructuredLstm. With reset_after, bias is [2, 3 * units],
recurrent_stages map units -> 3 * units and candidate_stages is empty.
Without it, bias is [3 * units], recurrent_stages are product A (units ->
2 * units, gates z and r) and candidate_stages product B (units -> units,
applied to r * h). Each product may add a sparse term as in
StructuredLstm (candidate_sparse_*: only without reset_after, S
[units, units]).
)doc");

REGISTER_OP("KerasAntman>BlockDiagMatMul")
    .Input("x: float")
    .Input("blocks: float")
    .Output("y: float")
    .Attr("shuffle: bool = false")
    .Attr("num_threads: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, blocks;
      absl::Status s = c->WithRankAtLeast(c->input(0), 1, &x);
      if (!s.ok()) return InvalidArgument("x: ", s.message());
      s = c->WithRank(c->input(1), 3, &blocks);
      if (!s.ok()) return InvalidArgument("blocks: ", s.message());
      int64_t num_threads;
      TF_RETURN_IF_ERROR(c->GetAttr("num_threads", &num_threads));
      if (num_threads < 0)
        return InvalidArgument("num_threads must be >= 0; received ",
                               num_threads);
      DimensionHandle n, m, unused;
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(blocks, 0), c->Dim(blocks, 1), &n));
      TF_RETURN_IF_ERROR(MergeDim(
          c, c->Dim(x, -1), n,
          "x.shape[-1] must equal groups * blocks.shape[1]", &unused));
      TF_RETURN_IF_ERROR(c->Multiply(c->Dim(blocks, 0), c->Dim(blocks, 2), &m));
      ShapeHandle lead, out;
      TF_RETURN_IF_ERROR(c->Subshape(x, 0, -1, &lead));
      TF_RETURN_IF_ERROR(c->Concatenate(lead, c->Vector(m), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc(R"doc(
y = x @ blockdiag(blocks), optionally followed by the shuffle mix
(output j of group i goes to position j * g + i).

x: [..., g * a].
blocks: [g, a, b].
y: [..., g * b].
)doc");

}  // namespace keras_antman
