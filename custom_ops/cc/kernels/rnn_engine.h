// The structured RNN engine: plain C++ with no TensorFlow headers, so that
// it can be compiled once per instruction set (rnn_engine_generic.cc,
// rnn_engine_avx2.cc, rnn_engine_avx512.cc) and chosen at run time.
//
// Every product (input, recurrent, GRU candidate) is a chain of 1 to
// kMaxStages "stages", described by the op's inputs; the engine knows no
// scheme names. Each stage is a block-diagonal matrix with g blocks of
// a x b (a dense matrix is g = 1), and the last stage alone may be
// followed by the shuffle mix (output j of group i goes to position
// j * g + i): a shuffle between stages would need a permutation pass per
// stage, which no lowering needs.
//
// This header holds plain data only (no inline functions), so that the
// per-ISA translation units cannot leak differently-compiled copies of a
// shared inline function into each other through the linker.
#ifndef KERAS_ANTMAN_RNN_ENGINE_H_
#define KERAS_ANTMAN_RNN_ENGINE_H_

#include <cstddef>
#include <cstdint>

namespace keras_antman {

struct Stage {
  const float* w;  // [g, a, b], row-major
  int64_t g, a, b;  // input n = g * a, output m = g * b
  bool shuffle;
  // All g blocks are equal (the kernel compares them; a Kronecker factor
  // is a tiled block): the groups of a row are then rows of one GEMM with
  // block 0 instead of g GEMVs.
  bool shared;
  // Null, or the blocks in the layout PackLayoutFor names for this stage
  // (PackStage, g * a * b floats, 64-byte aligned), which the engine then
  // reads instead of w. The kernel keeps it across calls.
  const float* packed;
};

// Packed layouts of a stage's blocks, each block packed in place of its
// g-th part of the buffer, column panels one after the other, each panel
// [a, panel width] row-major, so that a product streams it linearly:
// - kInputPanels: a stage of the input product, panels of the register
//   tile's width (the input GEMM's micro-kernel reads a panel for every
//   tile of rows);
// - kRecurrentChunks: the recurrent stage of the batch-1 LSTM group step,
//   panels of the GEMV's accumulator chunks (what ../shared/limit does).
enum PackLayout { kNoPack = 0, kInputPanels = 1, kRecurrentChunks = 2 };

// An additive sparse term of a product, y += x @ S with S [n, m] given as
// CSR of S^T: one CSR row per output column j of S, holding the input
// indices col_idx[k] in [0, n) and values[k] for k in
// [row_ptr[j], row_ptr[j + 1]). Each output is then one sparse dot product
// over x, so tasks that own outputs share nothing (sparse_term_impl.h).
// nnz = 0 (or no term: row_ptr null) adds nothing.
//
// A recurrent product also gets the term in sliced form, made by the
// kernel (sparse_pack.h): the outputs taken 16 at a time, one per vector
// lane, so that a step runs 16 outputs per vector with no horizontal sum;
// lane l of slice s is output slice_out[16 s + l] (-1: none), the outputs
// sorted by their number of entries in the gathered form and in order
// (16 s + l) in the windowed one. A step writes x @ S into `result`
// [batch, m] first (threads split the slices by slice_ptr, a count of
// vectors), and each task adds its outputs from there. Two forms:
// - gathered ("SELL-16", the generic and AVX2 engines): slice s holds
//   entries [slice_ptr[s], slice_ptr[s + 1]) of 16 lanes each (lane
//   padding: column 0, value 0), one vector gather of x per entry;
// - windowed (the AVX-512 engine): each vector reads two 16-column blocks
//   of x into two registers and picks each lane's column from them with a
//   permute instead of a gather (the packing chooses the blocks so that
//   many lanes have an entry there). Slice s is vectors [slice_ptr[s],
//   slice_ptr[s + 1]); vector k's blocks start at columns vec_col[2 k]
//   and vec_col[2 k + 1] (16-bit, both <= n - 16 when n >= 16; n above
//   65536 takes the gathered form); it has the lanes
//   vec_mask[k] (bit l: lane l has an entry), their values at
//   vec_val[16 k + l] (0 in the other lanes: one aligned load per vector,
//   no expansion), and their columns in vec_idx as bytes (< 16 in the
//   first block, 16 + c in the second), four vectors interleaved: the
//   t-th vector of slice s has lane l's byte at 64 (slice_idx0[s] + t / 4)
//   + 4 l + t % 4, so that one 64-byte load holds the lanes of four
//   vectors as 32-bit permute indices (shifted by 8 (t % 4)).
constexpr int64_t kSliceLanes = 16;
constexpr int64_t kBlockColumns = 16;

struct SparseTerm {
  const int32_t* row_ptr;  // [m + 1], null: no sparse term
  const int32_t* col_idx;  // [nnz]
  const float* values;     // [nnz]
  int64_t nnz;
  // Sliced form (recurrent products only; num_slices = 0 otherwise).
  int64_t num_slices;
  bool windowed;             // which form below
  const int64_t* slice_ptr;  // [num_slices + 1] vectors before slice s
  const int32_t* slice_out;  // [num_slices * kSliceLanes]
  // Gathered form.
  const int32_t* slice_col;  // [slice_ptr[num_slices] * kSliceLanes]
  const float* slice_val;    // same
  // Windowed form.
  const int64_t* slice_idx0;  // [num_slices]
  const uint16_t* vec_col;    // [2 * vectors]
  const uint16_t* vec_mask;   // [vectors]
  const uint8_t* vec_idx;     // [64 * 4-vector groups]
  const float* vec_val;       // [16 * vectors], 64-byte aligned
  float* result;              // [batch, m]
};

// Intermediate stage outputs alternate between two buffers, so the engine
// runs chains of any length; the bound only sizes Chain.
constexpr int kMaxStages = 4;

struct Chain {
  int num_stages;  // 1..kMaxStages
  Stage stages[kMaxStages];
  int64_t n, m;
  SparseTerm sparse;  // added to the chain's product (row_ptr null: none)
};

// How the last stage of a recurrent product is split into tasks; each task
// produces every gate of a set of units and runs the gate math right away.
enum LastStageMode {
  // Shuffle: g divides the units, so group i owns all gates of units
  // u = i (mod g) (gate q's column q * units + u lands in group u mod g).
  // Its block product is written in place, no permutation pass.
  kGroupOwned = 0,
  // No shuffle: a task owns a unit range and computes the columns
  // q * units + [u0, u1) of every gate q.
  kUnitColumns = 1,
};

// Tunables shared by the planner (which sizes the scratch memory) and the
// kernels.
constexpr int64_t kUnitChunk = 128;  // units per task in kUnitColumns mode
constexpr int64_t kRowChunk = 64;    // rows per block of the input product
// Floats of one column block of W that many rows pass over (256 KiB, in
// L2); the input phase copies a strided block into a contiguous buffer of
// this size per thread.
constexpr int64_t kBlockFloats = 65536;
// Batch sizes up to which a large W is streamed row by row (GemvStream,
// GemvGates) instead of walked in column tasks.
constexpr int64_t kStreamRows = 2;

// A recurrent product (or the GRU candidate product) planned for the step
// loop: its chain, how its last stage is split into tasks, and buffers for
// its intermediate stage outputs.
struct Product {
  Chain chain;
  int gates;  // G: gates this product produces (its width is G * units)
  int mode;   // LastStageMode
  int64_t max_task_units;  // the most units one task of the last stage owns
  float* stage_out[2];     // [batch, g * b] outputs of intermediate stages
};

enum Cell { kLstm = 0, kGru = 1 };

// Everything the engine needs for one op call; the kernel
// (antman_kernels.cc) fills it after checking every input, and the engine
// trusts it.
//
// "Slot layout": the arrays the gate math reads per task (the input
// projection x_proj, the biases, the LSTM cell state c) are ordered so
// that each task's units are contiguous: unit slot k holds unit
// UnitOfSlot(k) of the product making the gate (the identity except in
// kGroupOwned mode), c is [units] in slot order, and a row of x_proj or
// of the biases holds gate q of a task's l-th unit at
// first_slot * x_task_mult + q * x_gate_stride + l. That is gate-major
// (x_task_mult 1, x_gate_stride units) except where the recurrent
// product's tasks are its g groups and make every gate (kGroupOwned, no
// candidate product) at batch 1: then task-major (x_task_mult G, x_gate_stride
// units / g), so a group's z values are its block's G * units / g
// outputs in order. An input product ending in the same shuffled stage
// then writes them in place (the gather is the identity), and at batch 1
// a recurrent block's accumulators start from them (LstmGroupStep). h and
// the outputs stay in natural unit order.
struct RnnPlan {
  int cell;
  bool reset_after;  // GRU only
  int64_t batch, steps, features, units;
  int64_t z_width;  // gate pre-activations per row: 4 * units or 3 * units
  bool go_backwards, return_sequences;
  int num_threads;
  // The threads' barrier counter (rnn_engine_impl.h, Sync): zero, on a
  // cache line of its own.
  int64_t* barrier_arrivals;

  const float* x;  // [batch, steps, features]
  Chain input;     // features -> z_width
  // For slot k of a z row: the column of the input product's last stage
  // output that lands there ...
  const int64_t* gather;  // [z_width]
  // ... the same map as runs of consecutive columns, (source, slot,
  // length) each, moved a vector at a time; num_runs = 0: use `gather`
  // instead (runs too short). One run (0, 0, z_width) is the identity.
  const int64_t* runs;
  int64_t num_runs;
  int64_t x_task_mult, x_gate_stride;  // see "Slot layout" above
  const float* bias_slots;  // [z_width] input-side bias, folded into x_proj
  // GRU reset_after: the recurrent bias (added inside r * (...)), slots.
  const float* recurrent_bias_slots;

  // LSTM: units -> 4 * units; GRU reset_after: units -> 3 * units; GRU
  // without: units -> 2 * units (gates z and r).
  Product recurrent;
  // GRU without reset_after: units -> units, applied to r * h_prev (the
  // candidate's recurrent term); chain.num_stages = 0 otherwise.
  Product candidate;

  // [batch * steps, z_width]: x @ K_in + bias, slot layout; at batch > 1
  // the engine may use it for windows of steps instead (rnn_engine_impl.h,
  // InputWindow).
  float* x_proj;
  // [batch, units] double buffer, natural layout; the slot layout (that of
  // c) between the steps where HSlots (rnn_engine_impl.h, RunRnn).
  float* h[2];
  float* c;       // LSTM: cell state [batch, units], slot layout
  float* update_gate;   // GRU without reset_after: z, [batch, units]
  float* reset_h_prev;  // GRU without reset_after: r * h_prev, [batch, units]
  float* out;     // [batch, steps, units], or null without return_sequences
  // [units]: the slot of each unit in the slot layout (the inverse of
  // LayoutMaps::unit_of_slot).
  const int32_t* slot_of_unit;

  // Per-thread scratch, scratch_stride floats each; the input phase and
  // the recurrent phase reuse the same block, at these offsets.
  float* scratch;
  int64_t scratch_stride;
  int64_t off_stage[2];  // input phase: stage outputs of a row chunk
  int64_t off_row_copy;  // input phase: a copy of one z row (permutation)
  int64_t off_pack;      // input phase: kBlockFloats, a packed W block
  // Input phase with a sparse term: a row chunk of x transposed,
  // [features, kRowChunk] (0 floats without one).
  int64_t off_sparse_x;
  // Recurrent phase: a task's product, [batch, G * max_task_units], twice
  // (LstmGroupStep keeps one group's while the next one's is computed) ...
  int64_t off_task_product, off_task_product_alt;
  // ... and 4 vectors of max_task_units for its gate math.
  int64_t off_task_vectors;
  // Both phases: an intermediate stage that shuffles is computed here,
  // unshuffled, then scattered into its output ([kRowChunk or batch,
  // widest shuffling intermediate stage]; 0 floats without one).
  int64_t off_shuffle;
};

struct BlockDiagPlan {
  const float* x;  // [rows, g * a]
  const float* w;  // [g, a, b]
  float* y;        // [rows, g * b]
  int64_t rows, g, a, b;
  bool shuffle;
  int num_threads;
  float* scratch;  // shuffle: num_threads * min(rows, kRowChunk) * b floats
};

// One entry point per instruction set.
// PackLayoutFor: the layout the engine would read for stage `stage` of the
// input product (product = 0) or the recurrent product (product = 1) of
// `plan`, kNoPack if none; PackStage writes it.
#define KERAS_ANTMAN_DECLARE_ISA(isa)                       \
  namespace isa {                                           \
  void RunRnn(const RnnPlan& plan);                         \
  void RunBlockDiag(const BlockDiagPlan& plan);             \
  int PackLayoutFor(const RnnPlan& plan, int product, int stage); \
  void PackStage(const Stage& stage, int layout, float* dst); \
  }
KERAS_ANTMAN_DECLARE_ISA(generic)
KERAS_ANTMAN_DECLARE_ISA(avx2)
KERAS_ANTMAN_DECLARE_ISA(avx512)
#undef KERAS_ANTMAN_DECLARE_ISA

}  // namespace keras_antman

#endif  // KERAS_ANTMAN_RNN_ENGINE_H_
