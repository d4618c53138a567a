// Registration of the keras-antman inference ops.
//
// The shape functions check what graph construction can know (ranks, the
// number of weight arrays per scheme, agreeing batch and unit dims); the
// kernels (custom_ops/cc/kernels/antman_kernels.cc) check every dim again
// at run time, since eager execution does not run shape functions.
#include <string>
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_antman {
namespace {

using ::tensorflow::errors::InvalidArgument;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Ranks of the weight arrays of each scheme, in the order of the scheme's
// `weight_shapes` in keras_antman/schemes.py (also documented in ops.py).
std::vector<int> SchemeRanks(const std::string& kind) {
  if (kind == "dense") return {2};           // kernel [n, m]
  if (kind == "low_rank") return {2, 2};     // u [n, k], v [k, m]
  if (kind == "lgp_shuffle") return {3};     // blocks [g, n/g, m/g]
  if (kind == "lgp_dense") return {2, 3};    // mix, blocks
  if (kind == "low_rank_lgp") return {3, 2, 3};  // in_blocks, mix, out_blocks
  return {};
}

absl::Status CheckWeights(InferenceContext* c, const char* list_name,
                          const char* scheme_attr, int copies) {
  std::string kind;
  TF_RETURN_IF_ERROR(c->GetAttr(scheme_attr, &kind));
  std::vector<ShapeHandle> shapes;
  TF_RETURN_IF_ERROR(c->input(list_name, &shapes));
  const std::vector<int> ranks = SchemeRanks(kind);
  if (ranks.empty())
    return InvalidArgument(scheme_attr, " must be one of dense, low_rank, ",
                           "lgp_shuffle, lgp_dense, low_rank_lgp; received '",
                           kind, "'");
  if (shapes.size() != ranks.size() * copies)
    return InvalidArgument(list_name, " must hold ", ranks.size() * copies,
                           " arrays for ", scheme_attr, "='", kind,
                           "'; received ", shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    ShapeHandle unused;
    absl::Status s = c->WithRank(shapes[i], ranks[i % ranks.size()], &unused);
    if (!s.ok())
      return InvalidArgument(list_name, "[", i, "] of ", kind, ": ",
                             s.message());
  }
  return absl::OkStatus();
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
  TF_RETURN_IF_ERROR(CheckWeights(c, "input_weights", "input_scheme", 1));
  TF_RETURN_IF_ERROR(CheckWeights(c, "recurrent_weights", "recurrent_scheme",
                                  !lstm && !reset_after ? 2 : 1));
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

constexpr char kSchemes[] =
    "{'dense', 'low_rank', 'lgp_shuffle', 'lgp_dense', 'low_rank_lgp'}";

}  // namespace

REGISTER_OP("KerasAntman>StructuredLstm")
    .Input("x: float")
    .Input("initial_h: float")
    .Input("initial_c: float")
    .Input("bias: float")
    .Input("input_weights: num_input_weights * float")
    .Input("recurrent_weights: num_recurrent_weights * float")
    .Output("output: float")
    .Output("final_h: float")
    .Output("final_c: float")
    .Attr(std::string("input_scheme: ") + kSchemes)
    .Attr(std::string("recurrent_scheme: ") + kSchemes)
    .Attr("num_input_weights: int >= 1")
    .Attr("num_recurrent_weights: int >= 1")
    .Attr("go_backwards: bool = false")
    .Attr("return_sequences: bool = false")
    .Attr("num_threads: int = 0")
    .SetShapeFn([](InferenceContext* c) { return RnnShape(c, true); })
    .Doc(R"doc(
Whole-sequence LSTM inference (float32, CPU) with structured products.

z_t = x_t @ K_in + h_{t-1} @ K_rec + bias, gates i, f, c, o as in
keras.layers.LSTM with sigmoid and tanh. K_in and K_rec are AntMan schemes
given by kind and weight arrays. No masks: callers with a mask use stock
TF ops. Inference only; no gradient is registered.

x: [batch, timesteps, features].
initial_h: [batch, units].
initial_c: [batch, units].
bias: [4 * units].
input_weights: the input scheme's arrays (features -> 4 * units).
recurrent_weights: the recurrent scheme's arrays (units -> 4 * units).
output: [batch, timesteps, units] in processing order if return_sequences,
  else the last output [batch, units].
final_h: [batch, units].
final_c: [batch, units].
go_backwards: process the steps in reverse.
num_threads: OpenMP threads; 0 uses the process-wide setting. Small
  problems run on one thread whatever is asked.
)doc");

REGISTER_OP("KerasAntman>StructuredGru")
    .Input("x: float")
    .Input("initial_h: float")
    .Input("bias: float")
    .Input("input_weights: num_input_weights * float")
    .Input("recurrent_weights: num_recurrent_weights * float")
    .Output("output: float")
    .Output("final_h: float")
    .Attr(std::string("input_scheme: ") + kSchemes)
    .Attr(std::string("recurrent_scheme: ") + kSchemes)
    .Attr("num_input_weights: int >= 1")
    .Attr("num_recurrent_weights: int >= 1")
    .Attr("reset_after: bool = true")
    .Attr("go_backwards: bool = false")
    .Attr("return_sequences: bool = false")
    .Attr("num_threads: int = 0")
    .SetShapeFn([](InferenceContext* c) { return RnnShape(c, false); })
    .Doc(R"doc(
Whole-sequence GRU inference (float32, CPU) with structured products.

Gates z, r, h as in keras.layers.GRU with sigmoid and tanh. With
reset_after, bias is [2, 3 * units] and the recurrent scheme maps
units -> 3 * units. Without it, bias is [3 * units] and recurrent_weights
holds the arrays of product A (units -> 2 * units, gates z and r) followed
by those of product B (units -> units, applied to r * h), both of the
recurrent scheme's kind.
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
