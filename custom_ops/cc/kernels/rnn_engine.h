// The structured RNN engine: plain C++ with no TensorFlow headers, so that
// it can be compiled once per instruction set (rnn_engine_generic.cc,
// rnn_engine_avx2.cc, rnn_engine_avx512.cc) and chosen at run time.
//
// Every AntMan product (paper section 3) is a chain of at most three
// "stages"; each stage is a block-diagonal matrix with g blocks of a x b
// (a dense matrix is g = 1) and the last stage may be followed by the
// shuffle mix (output j of group i goes to position j * g + i).
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
};

struct Chain {
  int num_stages;  // 1..3
  Stage stages[3];
  int64_t n, m;
};

// How the last stage of a recurrent product is split into tasks; each task
// produces every gate of a set of units and runs the gate math right away.
enum LastStageMode {
  // Shuffle: g divides the product's input size, which is the units, so
  // group i owns all gates of units u = i (mod g). Its block product is
  // written in place, no permutation pass.
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

struct Product {
  Chain chain;
  int gates;           // G: gates produced by this product
  int mode;            // LastStageMode
  int64_t max_task_units;
  float* stage_out[2];  // [batch, m_s] outputs of intermediate stages
};

enum Cell { kLstm = 0, kGru = 1 };

struct RnnPlan {
  int cell;
  bool reset_after;  // GRU only
  int64_t batch, steps, features, units, z_width;  // z_width: 4H or 3H
  bool go_backwards, return_sequences;
  int num_threads;

  const float* x;  // [batch, steps, features]
  Chain input;     // features -> z_width
  // For internal position k of a z row: source column of the input
  // product's last stage output and the bias folded into it.
  const int64_t* gather;  // [z_width]
  // The same map as runs of consecutive columns, (source, slot, length)
  // each, moved a vector at a time; num_runs = 0: use `gather` instead
  // (runs too short). One run (0, 0, z_width) is the identity.
  const int64_t* runs;
  int64_t num_runs;
  const float* bias_int;  // [z_width]
  const float* rbias_int;  // GRU reset_after: recurrent bias, internal

  Product rec;   // LSTM: H -> 4H; GRU reset_after: H -> 3H; GRU: H -> 2H
  Product rec2;  // GRU without reset_after: (r * h) -> H

  float* xz;       // [batch * steps, z_width], internal layout
  float* h[2];     // [batch, units] double buffer, natural layout
  float* c;        // LSTM [batch, units], slot layout
  float* gz;       // GRU without reset_after: z gate, [batch, units]
  float* rh;       // GRU without reset_after: r * h_prev, [batch, units]
  float* out;      // [batch, steps, units] or null

  float* scratch;  // per-thread scratch, scratch_stride floats each
  int64_t scratch_stride;
  int64_t off_stage[2];  // input phase: chunk stage outputs [kRowChunk, m]
  int64_t off_row;       // input phase: one row of z_width
  int64_t off_pack;      // input phase: kBlockFloats, a packed W block
  int64_t off_vbuf;      // recurrent phase: [batch, G * max_task_units]
  int64_t off_tmp;       // recurrent phase: 4 arrays of max_task_units
};

struct BlockDiagPlan {
  const float* x;  // [rows, g * a]
  const float* w;  // [g, a, b]
  float* y;        // [rows, g * b]
  int64_t rows, g, a, b;
  bool shuffle;
  int num_threads;
  float* scratch;  // shuffle: num_threads * kRowChunk * b floats
};

// One entry point per instruction set.
#define KERAS_ANTMAN_DECLARE_ISA(isa)         \
  namespace isa {                             \
  void RunRnn(const RnnPlan& plan);           \
  void RunBlockDiag(const BlockDiagPlan& plan); \
  }
KERAS_ANTMAN_DECLARE_ISA(generic)
KERAS_ANTMAN_DECLARE_ISA(avx2)
KERAS_ANTMAN_DECLARE_ISA(avx512)
#undef KERAS_ANTMAN_DECLARE_ISA

}  // namespace keras_antman

#endif  // KERAS_ANTMAN_RNN_ENGINE_H_
