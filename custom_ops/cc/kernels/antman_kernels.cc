// CPU kernels of the keras-antman ops: input checks, the plan (layouts,
// thread count, scratch memory), and dispatch to the engine compiled for
// the best instruction set this CPU has.
//
// Every input is checked before anything is allocated or read; a bad input
// is an InvalidArgument naming the argument, the expected and the received
// shape. The engine itself (rnn_engine_impl.h) trusts the plan.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "custom_ops/cc/kernels/chain_checks.h"
#include "custom_ops/cc/kernels/rnn_engine.h"
#include "custom_ops/cc/kernels/sparse_checks.h"
#include "custom_ops/cc/kernels/sparse_pack.h"
#include "custom_ops/cc/kernels/thread_choice.h"
#include "tensorflow/core/common_runtime/dma_helper.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/overflow.h"

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
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("popcnt"))
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
// thread is faster than two on any machine we know: the per-step barrier
// and the team's start-up cost more than the work saved (2-core AMD EPYC,
// Zen 4: two threads start to pay between 25K and 50K). Above it the
// choice is measured (thread_choice.h).
// Tests lower both to 0 to run the parallel paths on small shapes (0 also
// turns the measuring off: every call uses the threads asked).
std::atomic<int64_t> min_parallel_macs_per_step{16 * 1024};
// The same for one block-diagonal product (a region per call, no barrier).
std::atomic<int64_t> min_parallel_macs_block_diag{512 * 1024};

// More OpenMP threads than cores only adds barrier waits, and a huge count
// asked by mistake would start that many OS threads.
int64_t CoreCount() {
  static const int64_t cores =
      std::max<int64_t>(1, std::thread::hardware_concurrency());
  return cores;
}

// Threads for one call: the attr (> 0) or the process-wide setting, one
// below the work threshold, never more than the cores or than `max_tasks`.
int ThreadsFor(int64_t attr, int64_t work,
               const std::atomic<int64_t>& threshold,
               int64_t max_tasks = INT64_MAX) {
  int64_t n = attr > 0 ? attr : ThreadSetting().load();
  if (work < threshold.load()) n = 1;
  n = std::min({n, CoreCount(), max_tasks});
  return static_cast<int>(std::max<int64_t>(1, n));
}

// Threads by measurement (thread_choice.h), above the threshold and when
// more than one thread is asked. Never destroyed: an op may run while the
// process exits.
ThreadChoices& Choices() {
  static ThreadChoices* choices = new ThreadChoices;
  return *choices;
}

bool Measured(int asked) {
  return asked > 1 && min_parallel_macs_per_step.load() != 0;
}

// The choice as it stands for a call with `asked` threads (already capped)
// and `work` multiply-adds per step, without counting a call.
int ThreadsChosen(int asked, int64_t work) {
  return Measured(asked) ? Choices().Current(work, asked) : asked;
}

// Every tensor the ops allocate is capped far above any machine's memory
// (32 Ti floats), so that sizes are exact int64 arithmetic and an absurd
// shape gets a clear error instead of an overflowed size.
constexpr int64_t kMaxFloats = int64_t{1} << 45;

// The element count of `dims`, or -1 if it overflows or exceeds kMaxFloats.
int64_t CheckedCount(std::initializer_list<int64_t> dims) {
  int64_t n = 1;
  for (int64_t d : dims) {
    n = tensorflow::MultiplyWithoutOverflow(n, d);
    if (n < 0 || n > kMaxFloats) return -1;
  }
  return n;
}

std::string DimsText(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  for (int64_t d : dims) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + "]";
}

absl::Status CheckSize(const char* what, std::initializer_list<int64_t> dims) {
  if (CheckedCount(dims) < 0)
    return InvalidArgument(what, " would have shape ", DimsText(dims),
                           ": more than 2^45 elements (or an int64 overflow)");
  return absl::OkStatus();
}

std::string Shape(const Tensor& t) { return t.shape().DebugString(); }

int64_t RoundUp16(int64_t n) { return (n + 15) / 16 * 16; }

// ---------------------------------------------------------------------------
// Stage chains: a product's arrays [g, a, b] and shuffle flags, checked
// (chain_checks.h) and turned into the engine's Chain.

absl::Status BuildChain(const OpInputList& arrays,
                        const std::vector<bool>& shuffle,
                        const ChainSpec& spec, Chain* chain) {
  const int num = arrays.size();
  TF_RETURN_IF_ERROR(CheckChainAttrs(spec, num, shuffle));
  std::vector<StageDims> dims(num);
  std::vector<std::string> received(num);
  for (int i = 0; i < num; ++i) {
    const Tensor& t = arrays[i];
    received[i] = Shape(t);
    if (t.dims() != 3) return StageRankError(spec, i, received[i]);
    dims[i] = StageDims{t.dim_size(0), t.dim_size(1), t.dim_size(2)};
  }
  TF_RETURN_IF_ERROR(CheckChainDims(spec, dims, shuffle, received));
  chain->num_stages = num;
  chain->n = spec.n;
  chain->m = spec.m;
  for (int i = 0; i < num; ++i) {
    const float* w = arrays[i].flat<float>().data();
    const int64_t block = dims[i].a * dims[i].b;
    bool shared = dims[i].g > 1;
    for (int64_t k = 1; shared && k < dims[i].g; ++k)
      shared = std::memcmp(w, w + k * block, block * sizeof(float)) == 0;
    chain->stages[i] = Stage{w,          dims[i].g, dims[i].a, dims[i].b,
                             shuffle[i], shared,    nullptr};
  }
  return absl::OkStatus();
}

// A product's optional sparse term (lists of 0 or 1 tensors), checked
// (sparse_checks.h: shapes, then every row pointer and column index) and
// set as the chain's SparseTerm. A recurrent product's term (`cache` not
// null) also gets its sliced form (sparse_pack.h) for `pack_kind`
// (PackKind), held by `*packed`: the cached
// one when the arrays equal those it was packed from (their contents were
// checked then), else packed now.
absl::Status BuildSparse(const OpInputList& row_ptr,
                         const OpInputList& col_idx,
                         const OpInputList& values, const ChainSpec& spec,
                         Chain* chain, SparsePackCache* cache = nullptr,
                         int pack_kind = 0,
                         std::shared_ptr<const PackedSparse>* packed =
                             nullptr) {
  chain->sparse = SparseTerm{};
  if (row_ptr.size() == 0) return absl::OkStatus();
  const Tensor& rp = row_ptr[0];
  const Tensor& ci = col_idx[0];
  const Tensor& va = values[0];
  SparseDims d;
  d.row_ptr_rank = rp.dims();
  d.col_idx_rank = ci.dims();
  d.values_rank = va.dims();
  d.row_ptr_size = rp.dims() == 1 ? rp.dim_size(0) : -1;
  d.col_idx_size = ci.dims() == 1 ? ci.dim_size(0) : -1;
  d.values_size = va.dims() == 1 ? va.dim_size(0) : -1;
  d.row_ptr_shape = Shape(rp);
  d.col_idx_shape = Shape(ci);
  d.values_shape = Shape(va);
  TF_RETURN_IF_ERROR(CheckSparseDims(spec, d));
  const int32_t* ptr = rp.flat<int32_t>().data();
  const int32_t* col = ci.flat<int32_t>().data();
  const float* val = va.flat<float>().data();
  const int64_t nnz = d.col_idx_size;
  if (cache != nullptr && nnz > 0) {
    *packed = cache->Find(pack_kind, spec.n, spec.m, ptr, col, val, nnz);
    if (*packed == nullptr) {
      TF_RETURN_IF_ERROR(CheckSparseContents(spec, ptr, col, nnz));
      *packed = PackSparse(pack_kind, spec.n, spec.m, ptr, col, val, nnz);
      cache->Put(*packed);
    }
  } else {
    TF_RETURN_IF_ERROR(CheckSparseContents(spec, ptr, col, nnz));
  }
  chain->sparse = SparseTerm{};
  chain->sparse.row_ptr = ptr;
  chain->sparse.col_idx = col;
  chain->sparse.values = val;
  chain->sparse.nnz = nnz;
  if (cache != nullptr && nnz > 0) (*packed)->Attach(&chain->sparse);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Layout of a recurrent product's output: which unit each slot holds.

void PlanProduct(Product* pr, int gates, int64_t units, int64_t batch) {
  const Stage& last = pr->chain.stages[pr->chain.num_stages - 1];
  pr->gates = gates;
  // BuildChain checked that a shuffling last stage's g divides `units`.
  pr->mode = last.shuffle ? kGroupOwned : kUnitColumns;
  // kUnitColumns: a task is kUnitChunk units, or at small batch a thread's
  // whole unit range when a large single block is streamed (LastStage).
  // Shared blocks, and at batch 1 unshared ones (where a group's units end
  // mid-vector, LastStage runs all of a thread's groups first): the task
  // product holds every unit.
  pr->max_task_units =
      pr->mode == kGroupOwned
          ? (last.shared || batch == 1 ? units : units / last.g)
      : batch <= kStreamRows  ? units
                              : std::min<int64_t>(units, kUnitChunk);
}

// `gather` as runs (source, slot, length) of consecutive source columns,
// or nothing when a run is shorter than 8 (then the engine gathers column
// by column). The identity is one run; one shuffled stage with the same g
// ending both the input and the recurrent chain is 4 g runs of units / g.
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

// The widest intermediate stage that shuffles (0 if none does).
int64_t MaxShufflingIntermediateWidth(const Chain& ch) {
  int64_t w = 0;
  for (int s = 0; s + 1 < ch.num_stages; ++s)
    if (ch.stages[s].shuffle)
      w = std::max(w, ch.stages[s].g * ch.stages[s].b);
  return w;
}

int64_t ProductMacs(const Chain& ch) {
  int64_t macs = 0;
  for (int s = 0; s < ch.num_stages; ++s)
    macs += ch.stages[s].g * ch.stages[s].a * ch.stages[s].b;
  return macs + ch.sparse.nnz;
}

// `isa`: IsaSetting() read once per call, so that the sparse term's sliced
// form (packed for AVX-512 or not) matches the engine.
void RunRnnOnIsa(const RnnPlan& plan, int isa) {
  switch (isa) {
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

int PackLayoutOnIsa(const RnnPlan& plan, int product, int stage, int isa) {
  switch (isa) {
    case kAvx512:
      return avx512::PackLayoutFor(plan, product, stage);
    case kAvx2:
      return avx2::PackLayoutFor(plan, product, stage);
    default:
      return generic::PackLayoutFor(plan, product, stage);
  }
}

void PackStageOnIsa(const Stage& stage, int layout, int isa, float* dst) {
  switch (isa) {
    case kAvx512:
      avx512::PackStage(stage, layout, dst);
      return;
    case kAvx2:
      avx2::PackStage(stage, layout, dst);
      return;
    default:
      generic::PackStage(stage, layout, dst);
  }
}

// ---------------------------------------------------------------------------
// Packed copies of stage weights (rnn_engine.h, PackLayout), kept across
// calls: at d = 1600 a packing reads and writes 4 MB, about what it saves
// in one call.
//
// An entry holds a reference to the tensor it was packed from, so that the
// buffer can be neither freed and reused for other weights nor written in
// place by TensorFlow (ops write in place only into a buffer that a single
// tensor holds; resource variables copy on write). The exception is a TF1
// reference variable, which `Assign` writes in place whoever holds its
// buffer: nothing here can tell, so such weights are not supported (the
// README says so; tests/test_sparse_term.py shows the sparse term's cache,
// which compares contents, is not affected). A hit, the same buffer
// (TensorBuffer, data pointer, shape) packed for the same layout and
// instruction set, is then the same weights. A buffer TensorFlow does not
// own (a NumPy array's memory wrapped without a copy) can change behind its
// back: it is not packed, and the engine reads it in place.
std::atomic<int64_t>& WeightPackCount() {
  static std::atomic<int64_t> count{0};
  return count;
}

// A few immutable, shared values (a kernel serves every layer whose op has
// the same attributes), the least recently used dropped first; a lookup is
// a scan of at most kMaxEntries. PackedWeights and LayoutCache hold theirs
// here.
template <typename V>
class SmallLru {
 public:
  // The first value `match` accepts, marked used; else null.
  template <typename Match>
  std::shared_ptr<const V> Find(Match match) {
    std::lock_guard<std::mutex> lock(mu_);
    for (Entry& e : entries_)
      if (match(*e.value)) {
        e.used = ++clock_;
        return e.value;
      }
    return nullptr;
  }

  void Put(std::shared_ptr<const V> value) {
    std::lock_guard<std::mutex> lock(mu_);
    if (entries_.size() >= kMaxEntries)
      entries_.erase(std::min_element(
          entries_.begin(), entries_.end(),
          [](const Entry& a, const Entry& b) { return a.used < b.used; }));
    entries_.push_back(Entry{std::move(value), ++clock_});
  }

 private:
  static constexpr size_t kMaxEntries = 8;
  struct Entry {
    std::shared_ptr<const V> value;
    uint64_t used;
  };
  std::mutex mu_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

class PackedWeights {
 public:
  // The packed copy of `stage` (whose weights are `src`) in `layout`, or
  // null (not TensorFlow's memory, or no memory for a copy).
  std::shared_ptr<const float> Get(const Tensor& src, const Stage& stage,
                                   int layout, int isa) {
    Tensor held = src;  // a reference; DMAHelper wants a non-const tensor
    tensorflow::TensorBuffer* buf = tensorflow::DMAHelper::buffer(&held);
    if (buf == nullptr || !buf->OwnsMemory() ||
        !buf->root_buffer()->OwnsMemory())
      return nullptr;
    const float* data = src.flat<float>().data();
    std::shared_ptr<const Packing> hit = cache_.Find([&](const Packing& e) {
      return e.layout == layout && e.isa == isa && e.data == data &&
             e.src.shape() == src.shape() && e.src.SharesBufferWith(src);
    });
    if (hit) return hit->packed;
    const int64_t floats = stage.g * stage.a * stage.b;
    const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    std::shared_ptr<float> packed(
        static_cast<float*>(std::aligned_alloc(64, bytes)), std::free);
    if (packed == nullptr) return nullptr;
    PackStageOnIsa(stage, layout, isa, packed.get());
    WeightPackCount().fetch_add(1);
    cache_.Put(std::make_shared<const Packing>(
        Packing{held, data, layout, isa, packed}));
    return packed;
  }

 private:
  struct Packing {
    Tensor src;  // holds the buffer (see above)
    const float* data;
    int layout, isa;
    std::shared_ptr<const float> packed;
  };
  SmallLru<Packing> cache_;
};

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
// The structured RNN ops. Compute runs the steps of XNNPACK's operator
// life: check (ValidateInputs), build the products (PlanProducts), plan the
// slot layout (PlanLayout) and the threads and scratch (SizeScratch), set
// the buffers up (SetupBuffers), run, and write the states back
// (WriteStates).

// What differs between the cells, decided once per kernel.
struct CellTraits {
  int cell;             // kLstm or kGru
  bool reset_after;     // GRU only
  int gates;            // gate pre-activations per unit: 4 (i, f, c, o) or
                        // 3 (z, r, h)
  int recurrent_gates;  // gates the recurrent product makes: 4, 3, or 2
                        // (z, r) when a candidate product makes h
  bool has_candidate;   // GRU without reset_after: candidate product B
  bool has_cell_state;  // LSTM: initial_c in, final_c out
  // GRU with reset_after: bias is [2, 3 * units]; its second row (the
  // recurrent bias) is added inside r * (...), not folded into x_proj.
  bool recurrent_bias;
};

CellTraits LstmTraits() { return {kLstm, false, 4, 4, false, true, false}; }

CellTraits GruTraits(bool reset_after) {
  return {kGru, reset_after, 3, reset_after ? 3 : 2, !reset_after, false,
          reset_after};
}

// The ops' sparse-term inputs: [product][row_ptr, col_idx, values].
const char* const kSparseInputs[3][3] = {
    {"input_sparse_row_ptr", "input_sparse_col_idx", "input_sparse_values"},
    {"recurrent_sparse_row_ptr", "recurrent_sparse_col_idx",
     "recurrent_sparse_values"},
    {"candidate_sparse_row_ptr", "candidate_sparse_col_idx",
     "candidate_sparse_values"}};

struct RnnInputs {
  const Tensor* x = nullptr;
  const Tensor* initial_h = nullptr;
  const Tensor* initial_c = nullptr;  // LSTM only
  const Tensor* bias = nullptr;
  OpInputList input_stages, recurrent_stages, candidate_stages;
  // Sparse terms: [product][row_ptr, col_idx, values], lists of 0 or 1.
  OpInputList sparse[3][3];
  int64_t batch = 0, steps = 0, features = 0, units = 0;
};

struct RnnOutputs {
  Tensor* output = nullptr;
  Tensor* final_h = nullptr;
  Tensor* final_c = nullptr;  // LSTM only
};

// The slot layout's maps that depend on shapes and the kernel's attrs
// only (never on data): which input-product column each slot gathers, as
// runs too, and which natural column (bias entry) it holds. Kept across
// calls, keyed by those shapes (LayoutKey).
struct LayoutMaps {
  std::vector<int64_t> key;
  std::vector<int64_t> gather, runs, column;
  // The unit each slot of a state (h and c) holds: slot k = i * len + l
  // holds unit l * g + i where the recurrent product's g groups own their
  // units, unit k otherwise.
  std::vector<int64_t> unit_of_slot;
  std::vector<int32_t> slot_of_unit;  // its inverse
  int64_t x_task_mult = 1, x_gate_stride = 0;
};

// A few layouts (a kernel serves every layer with its attrs), keyed by
// LayoutMaps::key.
using LayoutCache = SmallLru<LayoutMaps>;

std::atomic<int64_t>& LayoutBuildCount() {
  static std::atomic<int64_t> count{0};
  return count;
}

// The slot layout of one call (RnnPlan points into it during the run): the
// cached maps and this call's bias in slot order.
struct SlotLayout {
  std::shared_ptr<const LayoutMaps> maps;
  std::vector<float> bias_slots, recurrent_bias_slots;
};

class StructuredRnnOp : public OpKernel {
 public:
  StructuredRnnOp(OpKernelConstruction* ctx, bool lstm) : OpKernel(ctx) {
    bool reset_after = false;
    if (!lstm) OP_REQUIRES_OK(ctx, ctx->GetAttr("reset_after", &reset_after));
    traits_ = lstm ? LstmTraits() : GruTraits(reset_after);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("go_backwards", &go_backwards_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("return_sequences", &return_sequences_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_threads", &num_threads_));
    OP_REQUIRES(ctx, num_threads_ >= 0,
                InvalidArgument("num_threads must be >= 0 (0: the "
                                "process-wide setting); received ",
                                num_threads_));
    // The attrs of the chains, checked once here rather than per call
    // (eager calls run no shape function).
    int64_t num_input, num_recurrent;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_input_stages", &num_input));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_recurrent_stages", &num_recurrent));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("input_shuffle", &input_shuffle_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("recurrent_shuffle", &recurrent_shuffle_));
    OP_REQUIRES_OK(ctx, CheckChainAttrs(InputChainSpec(traits_.gates, -1, -1),
                                        num_input, input_shuffle_));
    OP_REQUIRES_OK(
        ctx, CheckChainAttrs(RecurrentChainSpec(traits_.recurrent_gates,
                                                traits_.has_candidate, -1, -1),
                             num_recurrent, recurrent_shuffle_));
    if (!lstm) {  // only the GRU op has candidate_stages
      int64_t num_candidate;
      OP_REQUIRES_OK(ctx,
                     ctx->GetAttr("num_candidate_stages", &num_candidate));
      OP_REQUIRES_OK(ctx,
                     ctx->GetAttr("candidate_shuffle", &candidate_shuffle_));
      OP_REQUIRES_OK(ctx, CheckCandidateAttrs(reset_after, num_candidate,
                                              candidate_shuffle_));
      if (traits_.has_candidate)
        OP_REQUIRES_OK(ctx, CheckChainAttrs(CandidateChainSpec(-1),
                                            num_candidate,
                                            candidate_shuffle_));
      int64_t num_sparse;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("num_candidate_sparse", &num_sparse));
      OP_REQUIRES_OK(ctx, CheckCandidateSparseAttr(reset_after, num_sparse));
    }
    for (const ChainSpec& spec :
         {InputChainSpec(traits_.gates, -1, -1),
          RecurrentChainSpec(traits_.recurrent_gates, traits_.has_candidate,
                             -1, -1)}) {
      int64_t num_sparse;
      OP_REQUIRES_OK(ctx, ctx->GetAttr(SparseCountAttr(spec), &num_sparse));
      OP_REQUIRES_OK(ctx, CheckSparseCount(spec, num_sparse));
    }
  }

  void Compute(OpKernelContext* ctx) override {
    RnnInputs in;
    OP_REQUIRES_OK(ctx, ValidateInputs(ctx, &in));
    RnnPlan plan{};
    const int isa = IsaSetting().load();
    std::shared_ptr<const PackedSparse> packed[2];  // held through the run
    OP_REQUIRES_OK(ctx,
                   PlanProducts(in, PackKind(isa == kAvx512), &plan, packed));
    RnnOutputs out;
    OP_REQUIRES_OK(ctx, AllocateOutputs(ctx, in, &out));
    if (in.batch == 0) return;
    if (in.steps == 0) {  // nothing to run: the states come back unchanged
      CopyInitialStates(in, out);
      return;
    }
    SlotLayout layout;
    PlanLayout(in, &layout, &plan);
    std::shared_ptr<const float> packs[2 * kMaxStages];  // held: the run
    AttachPacks(in, isa, &plan, packs);
    const int64_t work = StepMacs(in, plan);
    const int asked =
        ThreadsFor(num_threads_, work, min_parallel_macs_per_step);
    const bool measured = Measured(asked);
    const ThreadChoice::Call call = measured
                                        ? Choices().Begin(work, asked)
                                        : ThreadChoice::Call{asked, -1, 0};
    plan.num_threads = call.threads;
    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                            tensorflow::DT_FLOAT,
                            TensorShape({SizeScratch(in, &plan)}), &scratch));
    SetupBuffers(in, out, *layout.maps, &scratch, &plan);
    struct alignas(64) {
      int64_t arrivals = 0;
      char pad[56];
    } barrier;
    plan.barrier_arrivals = &barrier.arrivals;
    const auto start = std::chrono::steady_clock::now();
    RunRnnOnIsa(plan, isa);
    if (measured) {
      const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                             std::chrono::steady_clock::now() - start)
                             .count();
      Choices().End(work, asked, call, ns / in.steps);
    }
    WriteStates(in, plan, *layout.maps, out);
  }

 private:
  // Every input's rank, dims and sizes, before anything is allocated.
  absl::Status ValidateInputs(OpKernelContext* ctx, RnnInputs* in) const {
    TF_RETURN_IF_ERROR(ctx->input("x", &in->x));
    TF_RETURN_IF_ERROR(ctx->input("initial_h", &in->initial_h));
    TF_RETURN_IF_ERROR(ctx->input("bias", &in->bias));
    if (traits_.has_cell_state)
      TF_RETURN_IF_ERROR(ctx->input("initial_c", &in->initial_c));
    TF_RETURN_IF_ERROR(ctx->input_list("input_stages", &in->input_stages));
    TF_RETURN_IF_ERROR(
        ctx->input_list("recurrent_stages", &in->recurrent_stages));
    if (traits_.has_candidate)
      TF_RETURN_IF_ERROR(
          ctx->input_list("candidate_stages", &in->candidate_stages));
    for (int i = 0; i < (traits_.cell == kGru ? 3 : 2); ++i)
      for (int j = 0; j < 3; ++j)
        TF_RETURN_IF_ERROR(ctx->input_list(
            kSparseInputs[i][j], &in->sparse[i][j]));

    const Tensor& x = *in->x;
    if (x.dims() != 3)
      return InvalidArgument("x must be a rank-3 tensor [batch, timesteps, "
                             "features]; received shape ", Shape(x));
    in->batch = x.dim_size(0);
    in->steps = x.dim_size(1);
    in->features = x.dim_size(2);
    if (in->features < 1)
      return InvalidArgument("x must have at least one feature; received "
                             "shape ", Shape(x));
    const Tensor& h0 = *in->initial_h;
    if (h0.dims() != 2 || h0.dim_size(0) != in->batch || h0.dim_size(1) < 1)
      return InvalidArgument("initial_h must have shape [batch, units] with "
                             "batch = ", in->batch, " (from x) and units >= "
                             "1; received ", Shape(h0));
    in->units = h0.dim_size(1);
    if (traits_.has_cell_state && in->initial_c->shape() != h0.shape())
      return InvalidArgument("initial_c must have the shape of initial_h, ",
                             Shape(h0), "; received ",
                             Shape(*in->initial_c));
    const Tensor& bias = *in->bias;
    const int64_t width = traits_.gates * in->units;
    if (traits_.recurrent_bias) {
      if (bias.dims() != 2 || bias.dim_size(0) != 2 ||
          bias.dim_size(1) != width)
        return InvalidArgument("bias must have shape [2, 3 * units] = [2, ",
                               width, "] with reset_after; received ",
                               Shape(bias));
    } else if (bias.dims() != 1 || bias.dim_size(0) != width) {
      return InvalidArgument(
          "bias must have shape [", traits_.gates, " * units] = [", width,
          "]", traits_.cell == kGru ? " without reset_after" : "",
          "; received ", Shape(bias));
    }
    // The largest buffers, checked before any size arithmetic uses them.
    TF_RETURN_IF_ERROR(CheckSize(
        "output", {in->batch, return_sequences_ ? in->steps : 1, in->units}));
    TF_RETURN_IF_ERROR(CheckSize("the input projection of all steps (from x)",
                                 {in->batch, in->steps, width}));
    return absl::OkStatus();
  }

  // The engine's chains of every product, and how the recurrent ones are
  // split into tasks; `packed` gets the sliced forms of the recurrent and
  // candidate products' sparse terms (for `pack_kind`, PackKind).
  absl::Status PlanProducts(const RnnInputs& in, int pack_kind, RnnPlan* p,
                            std::shared_ptr<const PackedSparse>* packed) {
    const int64_t units = in.units;
    p->cell = traits_.cell;
    p->reset_after = traits_.reset_after;
    p->batch = in.batch;
    p->steps = in.steps;
    p->features = in.features;
    p->units = units;
    p->z_width = traits_.gates * units;
    p->go_backwards = go_backwards_;
    p->return_sequences = return_sequences_;
    const ChainSpec input_spec =
        InputChainSpec(traits_.gates, in.features, p->z_width);
    TF_RETURN_IF_ERROR(
        BuildChain(in.input_stages, input_shuffle_, input_spec, &p->input));
    TF_RETURN_IF_ERROR(BuildSparse(in.sparse[0][0], in.sparse[0][1],
                                   in.sparse[0][2], input_spec, &p->input));
    const int rec_gates = traits_.recurrent_gates;
    const ChainSpec recurrent_spec = RecurrentChainSpec(
        rec_gates, traits_.has_candidate, units, rec_gates * units);
    TF_RETURN_IF_ERROR(BuildChain(in.recurrent_stages, recurrent_shuffle_,
                                  recurrent_spec, &p->recurrent.chain));
    TF_RETURN_IF_ERROR(BuildSparse(in.sparse[1][0], in.sparse[1][1],
                                   in.sparse[1][2], recurrent_spec,
                                   &p->recurrent.chain, &pack_cache_[0],
                                   pack_kind, &packed[0]));
    PlanProduct(&p->recurrent, rec_gates, units, in.batch);
    if (traits_.has_candidate) {
      const ChainSpec candidate_spec = CandidateChainSpec(units);
      TF_RETURN_IF_ERROR(BuildChain(in.candidate_stages, candidate_shuffle_,
                                    candidate_spec, &p->candidate.chain));
      TF_RETURN_IF_ERROR(BuildSparse(in.sparse[2][0], in.sparse[2][1],
                                     in.sparse[2][2], candidate_spec,
                                     &p->candidate.chain, &pack_cache_[1],
                                     pack_kind, &packed[1]));
      PlanProduct(&p->candidate, 1, units, in.batch);
    }
    return absl::OkStatus();
  }

  absl::Status AllocateOutputs(OpKernelContext* ctx, const RnnInputs& in,
                               RnnOutputs* out) const {
    const TensorShape state_shape({in.batch, in.units});
    TF_RETURN_IF_ERROR(ctx->allocate_output(
        "output",
        return_sequences_ ? TensorShape({in.batch, in.steps, in.units})
                          : state_shape,
        &out->output));
    TF_RETURN_IF_ERROR(ctx->allocate_output("final_h", state_shape,
                                            &out->final_h));
    if (traits_.has_cell_state)
      TF_RETURN_IF_ERROR(ctx->allocate_output("final_c", state_shape,
                                              &out->final_c));
    return absl::OkStatus();
  }

  void CopyInitialStates(const RnnInputs& in, const RnnOutputs& out) const {
    const int64_t n = in.batch * in.units;
    const float* h0 = in.initial_h->flat<float>().data();
    std::copy_n(h0, n, out.final_h->flat<float>().data());
    if (!return_sequences_)
      std::copy_n(h0, n, out.output->flat<float>().data());
    if (traits_.has_cell_state)
      std::copy_n(in.initial_c->flat<float>().data(), n,
                  out.final_c->flat<float>().data());
  }

  // The slot layout (see RnnPlan): where each input-product column and
  // bias lands so that a task's units are contiguous. The maps come from
  // the cache when a call with the same shapes built them; the bias (data)
  // is put in slot order every call.
  void PlanLayout(const RnnInputs& in, SlotLayout* layout, RnnPlan* p) {
    const int64_t width = p->z_width;
    const std::vector<int64_t> key = LayoutKeyOf(in, *p);
    layout->maps = layout_cache_.Find(
        [&key](const LayoutMaps& m) { return m.key == key; });
    if (layout->maps == nullptr) {
      auto maps = std::make_shared<LayoutMaps>();
      maps->key = key;
      BuildLayoutMaps(in, *p, maps.get());
      LayoutBuildCount().fetch_add(1);
      layout_cache_.Put(maps);
      layout->maps = std::move(maps);
    }
    const LayoutMaps& maps = *layout->maps;
    const int64_t* column = maps.column.data();
    const float* bias = in.bias->flat<float>().data();
    layout->bias_slots.resize(width);
    for (int64_t k = 0; k < width; ++k)
      layout->bias_slots[k] = bias[column[k]];
    if (traits_.recurrent_bias) {
      layout->recurrent_bias_slots.resize(width);
      for (int64_t k = 0; k < width; ++k)
        layout->recurrent_bias_slots[k] = bias[width + column[k]];
    }
    p->x_task_mult = maps.x_task_mult;
    p->x_gate_stride = maps.x_gate_stride;
    p->gather = maps.gather.data();
    p->slot_of_unit = maps.slot_of_unit.data();
    p->runs = maps.runs.empty() ? nullptr : maps.runs.data();
    p->num_runs = static_cast<int64_t>(maps.runs.size() / 3);
    p->bias_slots = layout->bias_slots.data();
    p->recurrent_bias_slots = traits_.recurrent_bias
                                  ? layout->recurrent_bias_slots.data()
                                  : nullptr;
  }

  // Everything BuildLayoutMaps reads: units, batch 1 or not, the input
  // product's last stage, and how the products' groups own their units
  // (the cell and the gate counts are the kernel's).
  std::vector<int64_t> LayoutKeyOf(const RnnInputs& in,
                                   const RnnPlan& p) const {
    const Stage& in_last = p.input.stages[p.input.num_stages - 1];
    std::vector<int64_t> key = {in.units, in.batch == 1, in_last.g,
                                in_last.b, in_last.shuffle};
    for (const Product* pr : {&p.recurrent, &p.candidate})
      if (pr->chain.num_stages > 0)
        key.insert(key.end(),
                   {pr->mode, pr->chain.stages[pr->chain.num_stages - 1].g});
    return key;
  }

  void BuildLayoutMaps(const RnnInputs& in, const RnnPlan& pl,
                       LayoutMaps* maps) const {
    const RnnPlan* p = &pl;
    const int64_t units = in.units, width = p->z_width;
    const Stage& in_last = p->input.stages[p->input.num_stages - 1];
    maps->gather.resize(width);
    maps->column.resize(width);
    // Task-major where the recurrent product's groups make every gate, at
    // batch 1: with a batch, x_proj outgrows the caches (d = 800, batch 32:
    // 41 MB) and the gate math read it 1.4x slower task-major than
    // gate-major (four streams a group instead of one).
    const bool task_major = p->recurrent.mode == kGroupOwned &&
                            !traits_.has_candidate && in.batch == 1;
    const int64_t len =
        task_major
            ? units / p->recurrent.chain.stages[p->recurrent.chain.num_stages -
                                                1].g
            : units;
    maps->x_task_mult = task_major ? traits_.gates : 1;
    maps->x_gate_stride = len;
    // The unshuffled column of the input product's last stage for each
    // natural column (a shuffle puts output j of group i at j * g + i),
    // then each gate's slots; loops over (group, unit) instead of a
    // division or two per slot.
    std::vector<int64_t> source(width);
    if (in_last.shuffle) {
      for (int64_t i = 0; i < in_last.g; ++i)
        for (int64_t j = 0; j < in_last.b; ++j)
          source[j * in_last.g + i] = i * in_last.b + j;
    } else {
      for (int64_t c = 0; c < width; ++c) source[c] = c;
    }
    for (int q = 0; q < traits_.gates; ++q) {
      // Gates past the recurrent product's come from the candidate product.
      const Product& pr =
          q < traits_.recurrent_gates ? p->recurrent : p->candidate;
      // Slot k = i * ulen + l holds unit l * g + i where the product's g
      // groups own their units (UnitOfSlot), unit k otherwise; task-major,
      // task i's gate q starts at i * len * x_task_mult + q * len.
      const int64_t g = pr.mode == kGroupOwned
                            ? pr.chain.stages[pr.chain.num_stages - 1].g
                            : 1;
      const int64_t ulen = units / g;
      for (int64_t i = 0; i < g; ++i)
        for (int64_t l = 0; l < ulen; ++l) {
          const int64_t k = i * ulen + l;
          const int64_t slot = task_major
                                   ? i * len * maps->x_task_mult + q * len + l
                                   : q * units + k;
          const int64_t column = q * units + (g > 1 ? l * g + i : k);
          maps->gather[slot] = source[column];
          maps->column[slot] = column;
        }
    }
    maps->runs = GatherRuns(maps->gather);
    maps->unit_of_slot.resize(units);
    const Product& rec = p->recurrent;
    const int64_t g = rec.mode == kGroupOwned
                          ? rec.chain.stages[rec.chain.num_stages - 1].g
                          : 1;
    maps->slot_of_unit.resize(units);
    for (int64_t i = 0; i < g; ++i)
      for (int64_t l = 0; l < units / g; ++l) {
        const int64_t slot = i * (units / g) + l;
        maps->unit_of_slot[slot] = l * g + i;
        maps->slot_of_unit[l * g + i] = static_cast<int32_t>(slot);
      }
  }

  // The packed copies the engine reads (PackLayoutFor) for the input and
  // recurrent products' stages, from the cache; `held` has room for
  // 2 * kMaxStages.
  void AttachPacks(const RnnInputs& in, int isa, RnnPlan* p,
                   std::shared_ptr<const float>* held) {
    auto attach = [&](int product, int s, Stage* stage, const Tensor& src) {
      const int layout = PackLayoutOnIsa(*p, product, s, isa);
      if (layout == kNoPack) return;
      *held = packed_.Get(src, *stage, layout, isa);
      stage->packed = (held++)->get();
    };
    for (int s = 0; s < p->input.num_stages; ++s)
      attach(0, s, &p->input.stages[s], in.input_stages[s]);
    for (int s = 0; s < p->recurrent.chain.num_stages; ++s)
      attach(1, s, &p->recurrent.chain.stages[s], in.recurrent_stages[s]);
  }

  // Multiply-adds of the recurrent products of one step, the whole batch.
  int64_t StepMacs(const RnnInputs& in, const RnnPlan& p) const {
    return in.batch *
           (ProductMacs(p.recurrent.chain) +
            (traits_.has_candidate ? ProductMacs(p.candidate.chain) : 0));
  }

  // Sets the per-thread scratch layout for p->num_threads; returns the
  // floats to allocate: the shared buffers in SetupBuffers' order, then one
  // block per thread, which the input phase and the recurrent phase reuse.
  int64_t SizeScratch(const RnnInputs& in, RnnPlan* p) const {
    const int64_t batch = in.batch, width = p->z_width;

    const int64_t state = RoundUp16(batch * in.units);
    int64_t shared = RoundUp16(batch * in.steps * width) + 2 * state;
    if (traits_.has_cell_state) shared += state;
    if (traits_.has_candidate) shared += 2 * state;
    for (const Product* pr : {&p->recurrent, &p->candidate}) {
      if (pr->chain.num_stages > 0)
        shared += 2 * RoundUp16(batch * MaxIntermediateWidth(pr->chain));
      if (pr->chain.sparse.num_slices > 0)
        shared += RoundUp16(batch * pr->chain.m);
    }

    const int64_t stage_floats =
        RoundUp16(kRowChunk * MaxIntermediateWidth(p->input));
    const int64_t sparse_x_floats =
        p->input.sparse.nnz > 0 ? RoundUp16(in.features * kRowChunk) : 0;
    const int64_t input_need = 2 * stage_floats + RoundUp16(width) +
                               kBlockFloats + sparse_x_floats;
    const int64_t task_units =
        std::max(p->recurrent.max_task_units, p->candidate.max_task_units);
    const int64_t task_product =
        RoundUp16(batch * traits_.recurrent_gates * task_units);
    const int64_t recurrent_need =
        2 * task_product + 4 * RoundUp16(task_units);
    // A shuffling intermediate stage needs room for its unshuffled rows: a
    // row chunk in the input phase, the batch in the recurrent phase.
    int64_t shuffle_floats =
        kRowChunk * MaxShufflingIntermediateWidth(p->input);
    for (const Product* pr : {&p->recurrent, &p->candidate})
      shuffle_floats = std::max(
          shuffle_floats, batch * MaxShufflingIntermediateWidth(pr->chain));
    p->off_shuffle = std::max(input_need, recurrent_need);
    p->scratch_stride = p->off_shuffle + RoundUp16(shuffle_floats);
    p->off_stage[0] = 0;
    p->off_stage[1] = stage_floats;
    p->off_row_copy = 2 * stage_floats;
    p->off_pack = 2 * stage_floats + RoundUp16(width);
    p->off_sparse_x = p->off_pack + kBlockFloats;
    p->off_task_product = 0;
    p->off_task_product_alt = task_product;
    p->off_task_vectors = 2 * task_product;
    return shared + p->num_threads * p->scratch_stride;
  }

  // Points the plan at the inputs, outputs and scratch (in SizeScratch's
  // order) and loads the initial states.
  void SetupBuffers(const RnnInputs& in, const RnnOutputs& out,
                    const LayoutMaps& maps, Tensor* scratch,
                    RnnPlan* p) const {
    const int64_t batch = in.batch, units = in.units;
    const int64_t state = batch * units;
    float* cur = scratch->flat<float>().data();
    auto take = [&](int64_t n) {
      float* r = cur;
      cur += RoundUp16(n);
      return r;
    };
    p->x = in.x->flat<float>().data();
    p->x_proj = take(batch * in.steps * p->z_width);
    p->h[0] = take(state);
    p->h[1] = take(state);
    if (traits_.has_cell_state) p->c = take(state);
    if (traits_.has_candidate) {
      p->update_gate = take(state);
      p->reset_h_prev = take(state);
    }
    for (Product* pr : {&p->recurrent, &p->candidate}) {
      if (pr->chain.num_stages == 0) continue;
      const int64_t mid = batch * MaxIntermediateWidth(pr->chain);
      pr->stage_out[0] = take(mid);
      pr->stage_out[1] = take(mid);
      if (pr->chain.sparse.num_slices > 0) {
        pr->chain.sparse.result = take(batch * pr->chain.m);
        std::fill_n(pr->chain.sparse.result, batch * pr->chain.m, 0.0f);
      }
    }
    p->scratch = cur;
    p->out = return_sequences_ ? out.output->flat<float>().data() : nullptr;

    std::copy_n(in.initial_h->flat<float>().data(), state, p->h[0]);
    if (traits_.has_cell_state) {  // c is in slot layout
      const float* c0 = in.initial_c->flat<float>().data();
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t k = 0; k < units; ++k)
          p->c[b * units + k] =
              c0[b * units + maps.unit_of_slot[k]];
    }
  }

  void WriteStates(const RnnInputs& in, const RnnPlan& p,
                   const LayoutMaps& maps, const RnnOutputs& out) const {
    const int64_t batch = in.batch, units = in.units;
    const float* h_last = p.h[in.steps & 1];
    std::copy_n(h_last, batch * units, out.final_h->flat<float>().data());
    if (!return_sequences_)
      std::copy_n(h_last, batch * units, out.output->flat<float>().data());
    if (traits_.has_cell_state) {  // back from slot layout
      float* c = out.final_c->flat<float>().data();
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t k = 0; k < units; ++k)
          c[b * units + maps.unit_of_slot[k]] =
              p.c[b * units + k];
    }
  }

  CellTraits traits_;
  std::vector<bool> input_shuffle_, recurrent_shuffle_, candidate_shuffle_;
  bool go_backwards_ = false, return_sequences_ = false;
  int64_t num_threads_ = 0;
  // The sliced sparse terms of the recurrent and candidate products.
  SparsePackCache pack_cache_[2];
  PackedWeights packed_;
  LayoutCache layout_cache_;
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
    // Division, not g * a: the dims of an empty tensor are unbounded.
    OP_REQUIRES(ctx, n % g == 0 && n / g == a,
                InvalidArgument("blocks must have shape [g, n/g, m/g] with "
                                "n = x.shape[-1] = ", n, " and g dividing n; "
                                "received ", Shape(blocks)));
    const int64_t m = CheckedCount({g, b});
    int64_t rows = 1;  // x's elements over its last dim, overflow-checked
    for (int d = 0; d + 1 < x.dims(); ++d)
      rows = rows < 0 ? -1 : CheckedCount({rows, x.dim_size(d)});
    OP_REQUIRES(ctx, m >= 0 && rows >= 0 && CheckedCount({rows, m}) >= 0,
                InvalidArgument("y = x @ blockdiag(blocks) would have more "
                                "than 2^45 elements (or overflow int64): x ",
                                Shape(x), ", blocks ", Shape(blocks)));
    TensorShape out_shape = x.shape();
    out_shape.set_dim(x.dims() - 1, m);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &y));
    if (y->NumElements() == 0) return;
    if (n == 0) {  // an empty sum
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
    // Each thread takes (64-row chunk, group) items; more threads than
    // items would only hold scratch.
    const int64_t items = (rows + kRowChunk - 1) / kRowChunk * g;
    const int64_t macs = CheckedCount({rows, a, b, g});
    p.num_threads = ThreadsFor(num_threads_, macs < 0 ? INT64_MAX : macs,
                               min_parallel_macs_block_diag, items);
    Tensor ws;
    if (shuffle_) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                              tensorflow::DT_FLOAT,
                              TensorShape({p.num_threads *
                                           std::min(rows, kRowChunk) * b}),
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

// The threads a structured_lstm / structured_gru call with `asked` threads
// (0: the process-wide setting) and `work` multiply-adds per step would
// use now (ThreadsChosen), without counting as a call.
__attribute__((visibility("default"))) int keras_antman_rnn_threads(
    long long work, int asked) {
  return keras_antman::ThreadsChosen(
      keras_antman::ThreadsFor(asked, work,
                               keras_antman::min_parallel_macs_per_step),
      work);
}

// Replays `calls` calls of one class through a fresh ThreadChoice: call i
// takes ns_one[i] ns per step on one thread, ns_many[i] on `asked`;
// threads[i] receives the count it ran on. For the tests: the choice
// given injected timings, with no clock.
__attribute__((visibility("default"))) void keras_antman_replay_thread_choice(
    int asked, const long long* ns_one, const long long* ns_many, int calls,
    int* threads) {
  keras_antman::ThreadChoice choice(asked);
  for (int i = 0; i < calls; ++i) {
    const keras_antman::ThreadChoice::Call call = choice.Begin();
    threads[i] = call.threads;
    choice.End(call, call.threads > 1 ? ns_many[i] : ns_one[i]);
  }
}

// The sliced form the AVX-512 engine takes for a recurrent sparse term: 0
// by estimated cost, 1 gathered, 2 windowed; -1 for any other value. For
// tests.
__attribute__((visibility("default"))) int keras_antman_set_sparse_form(
    int form) {
  if (form < keras_antman::kFormAuto || form > keras_antman::kFormWindowed)
    return -1;
  keras_antman::SparseFormSetting().store(form);
  return 0;
}

// Sparse terms packed into their sliced form so far (the op's cache skips
// calls whose CSR arrays are unchanged). For tests.
__attribute__((visibility("default"))) long long keras_antman_sparse_packs() {
  return keras_antman::SparsePackCount().load();
}

// Stage weights packed for the engine so far (PackedWeights: the op's
// cache skips calls whose weight tensors it has packed). For tests.
__attribute__((visibility("default"))) long long keras_antman_weight_packs() {
  return keras_antman::WeightPackCount().load();
}

// Slot layouts built so far (LayoutCache: a call whose shapes match a
// cached layout's skips building it). For tests.
__attribute__((visibility("default"))) long long keras_antman_layout_builds() {
  return keras_antman::LayoutBuildCount().load();
}

__attribute__((visibility("default"))) const char* keras_antman_best_isa() {
  return keras_antman::kIsaNames[keras_antman::BestIsa()];
}

}  // extern "C"
