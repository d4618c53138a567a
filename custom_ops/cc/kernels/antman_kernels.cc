// CPU kernels of the keras-antman ops: input checks, the plan (layouts,
// thread count, scratch memory), and dispatch to the engine compiled for
// the best instruction set this CPU has.
//
// Every input is checked before anything is allocated or read; a bad input
// is an InvalidArgument naming the argument, the expected and the received
// shape. The engine itself (rnn_engine_impl.h) trusts the plan.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "custom_ops/cc/kernels/rnn_engine.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace keras_antman {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpInputList;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;

// ---------------------------------------------------------------------------
// Process-wide settings (set from Python through the C functions below).

enum Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

int BestIsa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return kAvx2;
#endif
  return kGeneric;
}

int IsaFromName(const char* name) {
  for (int i = 0; i < 3; ++i)
    if (name != nullptr && std::strcmp(name, kIsaNames[i]) == 0) return i;
  return -1;
}

// KERAS_ANTMAN_ISA may lower (never raise) the instruction set.
int InitialIsa() {
  const int best = BestIsa();
  const int asked = IsaFromName(std::getenv("KERAS_ANTMAN_ISA"));
  return asked >= 0 && asked <= best ? asked : best;
}

// One thread unless KERAS_ANTMAN_NUM_THREADS or set_num_threads says
// otherwise: TF runs independent ops concurrently on its own pools, and a
// second OpenMP team per op would fight them.
int InitialThreads() {
  const char* env = std::getenv("KERAS_ANTMAN_NUM_THREADS");
  if (env == nullptr) return 1;
  const int n = std::atoi(env);
  return n >= 1 ? std::min(n, 1024) : 1;
}

std::atomic<int>& IsaSetting() {
  static std::atomic<int> isa{InitialIsa()};
  return isa;
}

std::atomic<int>& ThreadSetting() {
  static std::atomic<int> threads{InitialThreads()};
  return threads;
}

// Below this many multiply-adds per step (summed over the batch), one
// thread is faster than two: the per-step barrier and the team's start-up
// cost more than the work saved. Measured on a 2-core AMD EPYC (see
// bench/); conservative on bigger machines.
// Tests lower both to 0 to run the parallel paths on small shapes.
std::atomic<int64_t> min_parallel_macs_per_step{128 * 1024};
// The same for one block-diagonal product (a region per call, no barrier).
std::atomic<int64_t> min_parallel_macs_block_diag{512 * 1024};

int ThreadsFor(int64_t attr, int64_t work,
               const std::atomic<int64_t>& threshold) {
  int64_t n = attr > 0 ? attr : ThreadSetting().load();
  if (work < threshold.load()) n = 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, 1024)));
}

std::string Shape(const Tensor& t) { return t.shape().DebugString(); }

int64_t RoundUp16(int64_t n) { return (n + 15) / 16 * 16; }

// ---------------------------------------------------------------------------
// Scheme checks: the arrays of one scheme, in the order of its
// `weight_shapes` in keras_antman/schemes.py, turned into a chain of
// block-diagonal stages.

const char* const kSchemeNames[] = {"dense", "low_rank", "lgp_shuffle",
                                    "lgp_dense", "low_rank_lgp"};
const int kSchemeArrays[] = {1, 2, 1, 2, 3};

int SchemeIndex(const std::string& kind) {
  for (int i = 0; i < 5; ++i)
    if (kind == kSchemeNames[i]) return i;
  return -1;
}

struct ArrayRef {
  const Tensor* t;
  std::string name;  // e.g. "recurrent_weights[1] ('mix' of lgp_dense)"
};

// blocks [g, n/g, m/g]: g >= 1 dividing n and m.
absl::Status BlockStage(const ArrayRef& r, int64_t n, int64_t m,
                        const std::string& where, Stage* st) {
  const Tensor& t = *r.t;
  const bool ok = t.dims() == 3 && t.dim_size(0) >= 1 &&
                  t.dim_size(0) * t.dim_size(1) == n &&
                  t.dim_size(0) * t.dim_size(2) == m;
  if (!ok)
    return InvalidArgument(
        r.name, " must have shape [g, n/g, m/g] with n = ", n, ", m = ", m,
        " and groups g dividing both (", where, "); received ", Shape(t));
  *st = Stage{t.flat<float>().data(), t.dim_size(0), t.dim_size(1),
              t.dim_size(2), false};
  return absl::OkStatus();
}

// A dense [rows, cols] matrix; cols < 0: any cols >= 1.
absl::Status DenseStage(const ArrayRef& r, int64_t rows, int64_t cols,
                        const std::string& expected, const std::string& where,
                        Stage* st) {
  const Tensor& t = *r.t;
  const bool ok = t.dims() == 2 && t.dim_size(0) == rows &&
                  (cols < 0 ? t.dim_size(1) >= 1 : t.dim_size(1) == cols);
  if (!ok)
    return InvalidArgument(r.name, " must have shape ", expected, " (", where,
                           "); received ", Shape(t));
  *st = Stage{t.flat<float>().data(), 1, t.dim_size(0), t.dim_size(1), false};
  return absl::OkStatus();
}

std::string Dims(int64_t a, int64_t b) {
  return "[" + std::to_string(a) + ", " + std::to_string(b) + "]";
}

// `product` names the product in messages ("input product, 32 -> 256").
absl::Status BuildChain(int kind, const std::vector<ArrayRef>& w, int64_t n,
                        int64_t m, const std::string& product, Chain* ch) {
  ch->n = n;
  ch->m = m;
  Stage* s = ch->stages;
  switch (kind) {
    case 0:  // dense: kernel [n, m]
      ch->num_stages = 1;
      return DenseStage(w[0], n, m, Dims(n, m), product, &s[0]);
    case 1: {  // low_rank: u [n, k], v [k, m]
      ch->num_stages = 2;
      TF_RETURN_IF_ERROR(
          DenseStage(w[0], n, -1, "[n, k] = [" + std::to_string(n) + ", k]",
                     product, &s[0]));
      const int64_t k = s[0].b;
      return DenseStage(w[1], k, m, Dims(k, m) + " with k = u.shape[1]",
                        product, &s[1]);
    }
    case 2:  // lgp_shuffle: blocks [g, n/g, m/g]
      ch->num_stages = 1;
      TF_RETURN_IF_ERROR(BlockStage(w[0], n, m, product, &s[0]));
      s[0].shuffle = true;
      return absl::OkStatus();
    case 3:  // lgp_dense: mix [min(n, m)]^2, blocks [g, n/g, m/g]
      ch->num_stages = 2;
      if (n < m) {  // mix first: D_g (M x)
        TF_RETURN_IF_ERROR(
            DenseStage(w[0], n, n, Dims(n, n) + " (mix first, n < m)",
                       product, &s[0]));
        return BlockStage(w[1], n, m, product, &s[1]);
      }
      TF_RETURN_IF_ERROR(BlockStage(w[1], n, m, product, &s[0]));
      return DenseStage(w[0], m, m, Dims(m, m) + " (mix after, m <= n)",
                        product, &s[1]);
    case 4: {  // low_rank_lgp: in_blocks, mix [k, k], out_blocks
      ch->num_stages = 3;
      const Tensor& mix = *w[1].t;
      if (mix.dims() != 2 || mix.dim_size(0) < 1 ||
          mix.dim_size(0) != mix.dim_size(1))
        return InvalidArgument(w[1].name, " must be a square [k, k] matrix (",
                               product, "); received ", Shape(mix));
      const int64_t k = mix.dim_size(0);
      TF_RETURN_IF_ERROR(BlockStage(
          w[0], n, k, product + ", k = mix.shape[0] = " + std::to_string(k),
          &s[0]));
      TF_RETURN_IF_ERROR(DenseStage(w[1], k, k, Dims(k, k), product, &s[1]));
      return BlockStage(
          w[2], k, m, product + ", k = mix.shape[0] = " + std::to_string(k),
          &s[2]);
    }
  }
  return InvalidArgument("unknown scheme");
}

const char* const kArrayNames[5][3] = {{"kernel"},
                                       {"u", "v"},
                                       {"blocks"},
                                       {"mix", "blocks"},
                                       {"in_blocks", "mix", "out_blocks"}};

// The arrays [first, first + count) of `list` as named references.
std::vector<ArrayRef> Arrays(const OpInputList& list, const char* list_name,
                             int kind, int first) {
  std::vector<ArrayRef> refs;
  for (int i = 0; i < kSchemeArrays[kind]; ++i) {
    refs.push_back(ArrayRef{
        &list[first + i], std::string(list_name) + "[" +
                              std::to_string(first + i) + "] ('" +
                              kArrayNames[kind][i] + "' of " +
                              kSchemeNames[kind] + ")"});
  }
  return refs;
}

// ---------------------------------------------------------------------------
// Layout of a recurrent product's output: which unit each slot holds.

void PlanProduct(Product* pr, int gates, int64_t units, int64_t batch) {
  const Stage& last = pr->chain.stages[pr->chain.num_stages - 1];
  pr->gates = gates;
  // BuildChain checked that g divides the input size, which is `units`.
  pr->mode = last.shuffle ? kGroupOwned : kUnitColumns;
  // kUnitColumns: a task is kUnitChunk units, or at small batch a thread's
  // whole unit range when a large single block is streamed (LastStage).
  pr->max_task_units =
      pr->mode == kGroupOwned ? units / last.g
      : batch <= kStreamRows  ? units
                              : std::min<int64_t>(units, kUnitChunk);
}

int64_t UnitOfSlot(const Product& pr, int64_t units, int64_t k) {
  if (pr.mode != kGroupOwned) return k;
  const int64_t g = pr.chain.stages[pr.chain.num_stages - 1].g;
  const int64_t len = units / g;  // slot k = i * len + l holds u = i + g * l
  return (k % len) * g + k / len;
}

// `gather` as runs (source, slot, length) of consecutive source columns,
// or nothing when a run is shorter than 8 (then the engine gathers column
// by column). The identity is one run; LGP-Shuffle with g groups on both
// products is 4 g runs of units / g.
std::vector<int64_t> GatherRuns(const std::vector<int64_t>& gather) {
  constexpr int64_t kMinRun = 8;
  std::vector<int64_t> runs;
  const int64_t n = static_cast<int64_t>(gather.size());
  for (int64_t k = 0; k < n;) {
    int64_t e = k + 1;
    while (e < n && gather[e] == gather[e - 1] + 1) ++e;
    if (e - k < kMinRun) return {};
    runs.insert(runs.end(), {gather[k], k, e - k});
    k = e;
  }
  return runs;
}

int64_t MaxIntermediateWidth(const Chain& ch) {
  int64_t w = 0;
  for (int s = 0; s + 1 < ch.num_stages; ++s)
    w = std::max(w, ch.stages[s].g * ch.stages[s].b);
  return w;
}

int64_t ProductMacs(const Chain& ch) {
  int64_t macs = 0;
  for (int s = 0; s < ch.num_stages; ++s)
    macs += ch.stages[s].g * ch.stages[s].a * ch.stages[s].b;
  return macs;
}

void RunRnnOnBestIsa(const RnnPlan& plan) {
  switch (IsaSetting().load()) {
    case kAvx512:
      avx512::RunRnn(plan);
      return;
    case kAvx2:
      avx2::RunRnn(plan);
      return;
    default:
      generic::RunRnn(plan);
  }
}

void RunBlockDiagOnBestIsa(const BlockDiagPlan& plan) {
  switch (IsaSetting().load()) {
    case kAvx512:
      avx512::RunBlockDiag(plan);
      return;
    case kAvx2:
      avx2::RunBlockDiag(plan);
      return;
    default:
      generic::RunBlockDiag(plan);
  }
}

// ---------------------------------------------------------------------------

class StructuredRnnOp : public OpKernel {
 public:
  StructuredRnnOp(OpKernelConstruction* ctx, bool lstm)
      : OpKernel(ctx), lstm_(lstm) {
    std::string in, rec;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("input_scheme", &in));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("recurrent_scheme", &rec));
    input_kind_ = SchemeIndex(in);
    recurrent_kind_ = SchemeIndex(rec);
    OP_REQUIRES(ctx, input_kind_ >= 0,
                InvalidArgument("input_scheme must be one of dense, low_rank, "
                                "lgp_shuffle, lgp_dense, low_rank_lgp; "
                                "received '", in, "'"));
    OP_REQUIRES(ctx, recurrent_kind_ >= 0,
                InvalidArgument("recurrent_scheme must be one of dense, "
                                "low_rank, lgp_shuffle, lgp_dense, "
                                "low_rank_lgp; received '", rec, "'"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("go_backwards", &go_backwards_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("return_sequences", &return_sequences_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_threads", &num_threads_));
    OP_REQUIRES(ctx, num_threads_ >= 0,
                InvalidArgument("num_threads must be >= 0 (0: the "
                                "process-wide setting); received ",
                                num_threads_));
    reset_after_ = false;
    if (!lstm_) OP_REQUIRES_OK(ctx, ctx->GetAttr("reset_after", &reset_after_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& h0 = ctx->input(1);
    const Tensor* c0 = lstm_ ? &ctx->input(2) : nullptr;
    const Tensor& bias = ctx->input(lstm_ ? 3 : 2);
    OpInputList in_list, rec_list;
    OP_REQUIRES_OK(ctx, ctx->input_list("input_weights", &in_list));
    OP_REQUIRES_OK(ctx, ctx->input_list("recurrent_weights", &rec_list));

    OP_REQUIRES(ctx, x.dims() == 3,
                InvalidArgument("x must be a rank-3 tensor [batch, "
                                "timesteps, features]; received shape ",
                                Shape(x)));
    const int64_t batch = x.dim_size(0), steps = x.dim_size(1);
    const int64_t features = x.dim_size(2);
    OP_REQUIRES(ctx, features >= 1,
                InvalidArgument("x must have at least one feature; received "
                                "shape ", Shape(x)));
    OP_REQUIRES(ctx, h0.dims() == 2 && h0.dim_size(0) == batch &&
                         h0.dim_size(1) >= 1,
                InvalidArgument("initial_h must have shape [batch, units] "
                                "with batch = ", batch, " (from x) and "
                                "units >= 1; received ", Shape(h0)));
    const int64_t units = h0.dim_size(1);
    if (lstm_)
      OP_REQUIRES(ctx, c0->shape() == h0.shape(),
                  InvalidArgument("initial_c must have the shape of "
                                  "initial_h, ", Shape(h0), "; received ",
                                  Shape(*c0)));
    const int gates = lstm_ ? 4 : 3;
    const int64_t width = gates * units;
    if (lstm_) {
      OP_REQUIRES(ctx, bias.dims() == 1 && bias.dim_size(0) == width,
                  InvalidArgument("bias must have shape [4 * units] = [",
                                  width, "]; received ", Shape(bias)));
    } else if (reset_after_) {
      OP_REQUIRES(ctx, bias.dims() == 2 && bias.dim_size(0) == 2 &&
                           bias.dim_size(1) == width,
                  InvalidArgument("bias must have shape [2, 3 * units] = "
                                  "[2, ", width, "] with reset_after; "
                                  "received ", Shape(bias)));
    } else {
      OP_REQUIRES(ctx, bias.dims() == 1 && bias.dim_size(0) == width,
                  InvalidArgument("bias must have shape [3 * units] = [",
                                  width, "] without reset_after; received ",
                                  Shape(bias)));
    }

    const int rec_copies = !lstm_ && !reset_after_ ? 2 : 1;
    OP_REQUIRES(ctx, in_list.size() == kSchemeArrays[input_kind_],
                InvalidArgument("input_weights must hold ",
                                kSchemeArrays[input_kind_], " arrays for "
                                "input_scheme='", kSchemeNames[input_kind_],
                                "'; received ", in_list.size()));
    OP_REQUIRES(ctx,
                rec_list.size() == rec_copies * kSchemeArrays[recurrent_kind_],
                InvalidArgument("recurrent_weights must hold ",
                                rec_copies * kSchemeArrays[recurrent_kind_],
                                " arrays for recurrent_scheme='",
                                kSchemeNames[recurrent_kind_], "'",
                                rec_copies == 2
                                    ? " (products A then B, reset_after=False)"
                                    : "",
                                "; received ", rec_list.size()));

    RnnPlan p{};
    p.cell = lstm_ ? kLstm : kGru;
    p.reset_after = reset_after_;
    p.batch = batch;
    p.steps = steps;
    p.features = features;
    p.units = units;
    p.z_width = width;
    p.go_backwards = go_backwards_;
    p.return_sequences = return_sequences_;

    auto dims = [](int64_t n, int64_t m) {
      return std::to_string(n) + " -> " + std::to_string(m);
    };
    OP_REQUIRES_OK(ctx, BuildChain(input_kind_,
                                   Arrays(in_list, "input_weights",
                                          input_kind_, 0),
                                   features, width,
                                   "input product, " + dims(features, width),
                                   &p.input));
    const int rec_gates = lstm_ ? 4 : (reset_after_ ? 3 : 2);
    OP_REQUIRES_OK(
        ctx, BuildChain(recurrent_kind_,
                        Arrays(rec_list, "recurrent_weights", recurrent_kind_,
                               0),
                        units, rec_gates * units,
                        std::string(rec_copies == 2 ? "recurrent product A, "
                                                    : "recurrent product, ") +
                            dims(units, rec_gates * units),
                        &p.rec.chain));
    PlanProduct(&p.rec, rec_gates, units, batch);
    if (rec_copies == 2) {
      OP_REQUIRES_OK(
          ctx, BuildChain(recurrent_kind_,
                          Arrays(rec_list, "recurrent_weights",
                                 recurrent_kind_,
                                 kSchemeArrays[recurrent_kind_]),
                          units, units,
                          "recurrent product B, " + dims(units, units),
                          &p.rec2.chain));
      PlanProduct(&p.rec2, 1, units, batch);
    }

    // Outputs.
    Tensor *out = nullptr, *h_out = nullptr, *c_out = nullptr;
    const TensorShape state_shape({batch, units});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0,
                            return_sequences_
                                ? TensorShape({batch, steps, units})
                                : state_shape,
                            &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, state_shape, &h_out));
    if (lstm_) OP_REQUIRES_OK(ctx, ctx->allocate_output(2, state_shape, &c_out));
    if (batch == 0) return;
    const float* h0p = h0.flat<float>().data();
    if (steps == 0) {  // nothing to run: the states come back unchanged
      std::copy_n(h0p, batch * units, h_out->flat<float>().data());
      if (!return_sequences_)
        std::copy_n(h0p, batch * units, out->flat<float>().data());
      if (lstm_)
        std::copy_n(c0->flat<float>().data(), batch * units,
                    c_out->flat<float>().data());
      return;
    }

    // Internal layout of z (and c): gate q's slot k sits at q * units + k
    // and holds unit UnitOfSlot(k) of the product making gate q.
    auto product_of_gate = [&](int q) -> const Product& {
      return rec_copies == 2 && q == 2 ? p.rec2 : p.rec;
    };
    const Stage& in_last = p.input.stages[p.input.num_stages - 1];
    const float* b = bias.flat<float>().data();
    std::vector<int64_t> gather(width);
    std::vector<float> bias_int(width), rbias_int;
    if (!lstm_ && reset_after_) rbias_int.resize(width);
    for (int q = 0; q < gates; ++q) {
      const Product& pr = product_of_gate(q);
      for (int64_t k = 0; k < units; ++k) {
        const int64_t j = q * units + k;
        const int64_t nat = q * units + UnitOfSlot(pr, units, k);
        gather[j] = in_last.shuffle
                        ? (nat % in_last.g) * in_last.b + nat / in_last.g
                        : nat;
        bias_int[j] = b[nat];
        if (!rbias_int.empty()) rbias_int[j] = b[width + nat];
      }
    }
    p.gather = gather.data();
    p.runs = nullptr;
    p.num_runs = 0;
    std::vector<int64_t> runs = GatherRuns(gather);
    if (!runs.empty()) {
      p.runs = runs.data();
      p.num_runs = static_cast<int64_t>(runs.size() / 3);
    }
    p.bias_int = bias_int.data();
    p.rbias_int = rbias_int.empty() ? nullptr : rbias_int.data();

    int64_t macs = ProductMacs(p.rec.chain);
    if (rec_copies == 2) macs += ProductMacs(p.rec2.chain);
    p.num_threads =
        ThreadsFor(num_threads_, batch * macs, min_parallel_macs_per_step);
    const int nt = p.num_threads;

    // Scratch: shared buffers, then one block per thread. The input phase
    // and the recurrent phase reuse the same per-thread block.
    const int64_t bu = RoundUp16(batch * units);
    int64_t total = RoundUp16(batch * steps * width) + 2 * bu;
    if (lstm_) total += bu;
    if (rec_copies == 2) total += 2 * bu;
    auto product_floats = [&](const Product& pr) {
      if (pr.chain.num_stages == 0) return int64_t{0};
      return 2 * RoundUp16(batch * MaxIntermediateWidth(pr.chain));
    };
    total += product_floats(p.rec) + product_floats(p.rec2);
    const int64_t in_mid = RoundUp16(kRowChunk * MaxIntermediateWidth(p.input));
    const int64_t in_need = 2 * in_mid + RoundUp16(width) + kBlockFloats;
    const int64_t task_units =
        std::max(p.rec.max_task_units, p.rec2.max_task_units);
    const int64_t vbuf = RoundUp16(batch * rec_gates * task_units);
    const int64_t rec_need = vbuf + 4 * RoundUp16(task_units);
    p.scratch_stride = std::max(in_need, rec_need);
    total += nt * p.scratch_stride;

    Tensor ws;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                           TensorShape({total}), &ws));
    float* cur = ws.flat<float>().data();
    auto take = [&](int64_t n) {
      float* r = cur;
      cur += RoundUp16(n);
      return r;
    };
    p.x = x.flat<float>().data();
    p.xz = take(batch * steps * width);
    p.h[0] = take(batch * units);
    p.h[1] = take(batch * units);
    if (lstm_) p.c = take(batch * units);
    if (rec_copies == 2) {
      p.gz = take(batch * units);
      p.rh = take(batch * units);
    }
    for (Product* pr : {&p.rec, &p.rec2}) {
      if (pr->chain.num_stages == 0) continue;
      const int64_t mid = batch * MaxIntermediateWidth(pr->chain);
      pr->stage_out[0] = take(mid);
      pr->stage_out[1] = take(mid);
    }
    p.scratch = cur;
    p.off_stage[0] = 0;
    p.off_stage[1] = in_mid;
    p.off_row = 2 * in_mid;
    p.off_pack = 2 * in_mid + RoundUp16(width);
    p.off_vbuf = 0;
    p.off_tmp = vbuf;
    p.out = return_sequences_ ? out->flat<float>().data() : nullptr;

    std::copy_n(h0p, batch * units, p.h[0]);
    if (lstm_) {
      const float* c0p = c0->flat<float>().data();
      for (int64_t bi = 0; bi < batch; ++bi)
        for (int64_t k = 0; k < units; ++k)
          p.c[bi * units + k] = c0p[bi * units + UnitOfSlot(p.rec, units, k)];
    }

    RunRnnOnBestIsa(p);

    const float* h_last = p.h[steps & 1];
    std::copy_n(h_last, batch * units, h_out->flat<float>().data());
    if (!return_sequences_)
      std::copy_n(h_last, batch * units, out->flat<float>().data());
    if (lstm_) {
      float* cp = c_out->flat<float>().data();
      for (int64_t bi = 0; bi < batch; ++bi)
        for (int64_t k = 0; k < units; ++k)
          cp[bi * units + UnitOfSlot(p.rec, units, k)] = p.c[bi * units + k];
    }
  }

 private:
  bool lstm_;
  int input_kind_ = 0, recurrent_kind_ = 0;
  bool go_backwards_ = false, return_sequences_ = false, reset_after_ = false;
  int64_t num_threads_ = 0;
};

class StructuredLstmOp : public StructuredRnnOp {
 public:
  explicit StructuredLstmOp(OpKernelConstruction* ctx)
      : StructuredRnnOp(ctx, true) {}
};

class StructuredGruOp : public StructuredRnnOp {
 public:
  explicit StructuredGruOp(OpKernelConstruction* ctx)
      : StructuredRnnOp(ctx, false) {}
};

class BlockDiagMatMulOp : public OpKernel {
 public:
  explicit BlockDiagMatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shuffle", &shuffle_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_threads", &num_threads_));
    OP_REQUIRES(ctx, num_threads_ >= 0,
                InvalidArgument("num_threads must be >= 0 (0: the "
                                "process-wide setting); received ",
                                num_threads_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& blocks = ctx->input(1);
    OP_REQUIRES(ctx, x.dims() >= 1,
                InvalidArgument("x must have rank >= 1 [..., n]; received "
                                "shape ", Shape(x)));
    OP_REQUIRES(ctx, blocks.dims() == 3 && blocks.dim_size(0) >= 1,
                InvalidArgument("blocks must have shape [g, n/g, m/g] with "
                                "g >= 1; received ", Shape(blocks)));
    const int64_t g = blocks.dim_size(0), a = blocks.dim_size(1);
    const int64_t b = blocks.dim_size(2);
    const int64_t n = x.dim_size(x.dims() - 1);
    OP_REQUIRES(ctx, g * a == n,
                InvalidArgument("blocks must have shape [g, n/g, m/g] with "
                                "n = x.shape[-1] = ", n, " and g dividing n; "
                                "received ", Shape(blocks)));
    TensorShape out_shape = x.shape();
    out_shape.set_dim(x.dims() - 1, g * b);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &y));
    const int64_t rows = n == 0 ? 0 : x.NumElements() / n;
    if (y->NumElements() == 0) return;
    if (rows == 0) {  // n == 0: an empty sum
      std::fill_n(y->flat<float>().data(), y->NumElements(), 0.0f);
      return;
    }
    BlockDiagPlan p{};
    p.x = x.flat<float>().data();
    p.w = blocks.flat<float>().data();
    p.y = y->flat<float>().data();
    p.rows = rows;
    p.g = g;
    p.a = a;
    p.b = b;
    p.shuffle = shuffle_;
    p.num_threads =
        ThreadsFor(num_threads_, rows * a * b * g,
                   min_parallel_macs_block_diag);
    Tensor ws;
    if (shuffle_) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                              tensorflow::DT_FLOAT,
                              TensorShape({p.num_threads * kRowChunk * b}),
                              &ws));
      p.scratch = ws.flat<float>().data();
    }
    RunBlockDiagOnBestIsa(p);
  }

 private:
  bool shuffle_ = false;
  int64_t num_threads_ = 0;
};

REGISTER_KERNEL_BUILDER(
    Name("KerasAntman>StructuredLstm").Device(DEVICE_CPU), StructuredLstmOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasAntman>StructuredGru").Device(DEVICE_CPU), StructuredGruOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasAntman>BlockDiagMatMul").Device(DEVICE_CPU), BlockDiagMatMulOp);

}  // namespace
}  // namespace keras_antman

// C entry points for keras_antman/ops.py (through ctypes on the same,
// already loaded library). They set process-wide defaults; an op's
// num_threads attr, when > 0, wins over them.
extern "C" {

__attribute__((visibility("default"))) int keras_antman_set_num_threads(
    int n) {
  if (n < 1) return -1;
  keras_antman::ThreadSetting().store(std::min(n, 1024));
  return 0;
}

__attribute__((visibility("default"))) int keras_antman_get_num_threads() {
  return keras_antman::ThreadSetting().load();
}

// Returns 0 on success, -1 for an unknown name, -2 if this CPU lacks it.
__attribute__((visibility("default"))) int keras_antman_set_isa(
    const char* name) {
  const int isa = keras_antman::IsaFromName(name);
  if (isa < 0) return -1;
  if (isa > keras_antman::BestIsa()) return -2;
  keras_antman::IsaSetting().store(isa);
  return 0;
}

__attribute__((visibility("default"))) const char* keras_antman_get_isa() {
  return keras_antman::kIsaNames[keras_antman::IsaSetting().load()];
}

// The work (multiply-adds) below which ops run on one thread; < 0 keeps
// the current value. For tests and threshold measurements.
__attribute__((visibility("default"))) void keras_antman_set_min_parallel_work(
    long long per_step, long long block_diag) {
  if (per_step >= 0) keras_antman::min_parallel_macs_per_step.store(per_step);
  if (block_diag >= 0)
    keras_antman::min_parallel_macs_block_diag.store(block_diag);
}

__attribute__((visibility("default"))) long long
keras_antman_min_parallel_macs_per_step() {
  return keras_antman::min_parallel_macs_per_step.load();
}

__attribute__((visibility("default"))) const char* keras_antman_best_isa() {
  return keras_antman::kIsaNames[keras_antman::BestIsa()];
}

}  // extern "C"
