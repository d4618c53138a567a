// Threads by measurement: whether more threads than one pay for a class of
// structured_lstm / structured_gru calls (the same multiply-adds per step
// and the same thread count asked) depends on the machine (barrier cost,
// caches) and on what else runs, so the op measures it. Plain C++ with no
// clock: the op times each call and reports it (antman_kernels.cc), and
// the tests replay injected timings through the same code
// (keras_antman_replay_thread_choice).
//
// A probe runs kProbeRun calls on one thread, then kProbeRun on the count
// asked. The first call of each run is not counted: it pays for what the
// other count left behind (the weights in the other core's cache, a
// sleeping OpenMP team to wake, fresh scratch pages). The class keeps the
// count asked only if its median ns per step over the rest is at least
// 1/kMarginDiv below one thread's: two threads must not be slower than one,
// and a tie goes to one thread, which leaves a core free.
//
// A probe can catch a moment of load (a second thread loses badly when
// another process holds a core, since every step waits for both), so it
// runs again after kFirstRecheck calls, and after twice as many each time it
// confirms the choice (at most kMaxRecheck). On more threads, kSlowCalls
// calls in a row that run a step kSlowNum / kSlowDen slower than one
// thread's median start a probe at once; a single slow call (an interrupt,
// a page fault) does not.
#ifndef KERAS_ANTMAN_THREAD_CHOICE_H_
#define KERAS_ANTMAN_THREAD_CHOICE_H_

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace keras_antman {

constexpr int kProbeRun = 4;  // calls per count in a probe, 1 not counted
constexpr int kProbeCalls = 2 * kProbeRun;
constexpr int kKept = kProbeRun - 1;
constexpr int64_t kMarginDiv = 20;  // more threads must be 5% faster
constexpr int64_t kFirstRecheck = 25;
constexpr int64_t kMaxRecheck = 400;
constexpr int kSlowCalls = 3;
constexpr int64_t kSlowNum = 5, kSlowDen = 4;  // 25% slower than one thread

// The choice for one class of calls. Not thread-safe: ThreadChoices holds
// the lock.
class ThreadChoice {
 public:
  // A call's threads and, for a probe call, its place in the probe.
  struct Call {
    int threads;
    int slot;          // 0 .. kProbeCalls - 1, or -1: not a probe call
    uint32_t probe;    // which probe the slot belongs to
  };

  explicit ThreadChoice(int asked) : asked_(asked) {}

  Call Begin() {
    if (probing_ && next_slot_ < kProbeCalls) {
      const int slot = next_slot_++;
      return {slot < kProbeRun ? 1 : asked_, slot, probe_};
    }
    // Every probe call handed out, some not reported: concurrent calls, or
    // a call that failed before it ran; after many such calls, probe anew.
    if (probing_ && ++waiting_ > 4 * kProbeCalls) {
      StartProbe();
      return Begin();
    }
    if (!probing_ && ++since_ > recheck_) {
      StartProbe();
      return Begin();
    }
    // The choice, or (concurrent calls before the first probe is complete)
    // the count asked.
    return {chosen_ > 0 ? chosen_ : asked_, -1, probe_};
  }

  void End(const Call& call, int64_t ns_per_step) {
    ns_per_step = std::max<int64_t>(1, ns_per_step);
    if (call.slot >= 0) {
      if (!probing_ || call.probe != probe_) return;  // a stale probe
      if (call.slot % kProbeRun == 0) return;         // warm-up: not counted
      const int arm = call.slot < kProbeRun ? 0 : 1;
      if (kept_[arm] < kKept) samples_[arm][kept_[arm]++] = ns_per_step;
      if (kept_[0] == kKept && kept_[1] == kKept) Decide();
      return;
    }
    if (probing_ || chosen_ <= 1 || call.threads <= 1) return;
    if (ns_per_step * kSlowDen > one_median_ * kSlowNum) {
      if (++slow_in_a_row_ >= kSlowCalls) {
        recheck_ = kFirstRecheck;
        StartProbe();
      }
    } else {
      slow_in_a_row_ = 0;
    }
  }

  // The threads the next call would use outside a probe: the count asked
  // until the first probe has decided.
  int Current() const { return chosen_ > 0 ? chosen_ : asked_; }

 private:
  static int64_t Median(int64_t* v) {
    std::sort(v, v + kKept);
    return v[kKept / 2];
  }

  void StartProbe() {
    probing_ = true;
    ++probe_;
    next_slot_ = 0;
    waiting_ = 0;
    kept_[0] = kept_[1] = 0;
  }

  void Decide() {
    const int64_t one = Median(samples_[0]), many = Median(samples_[1]);
    const int choice =
        many * kMarginDiv < one * (kMarginDiv - 1) ? asked_ : 1;
    recheck_ = choice == chosen_ ? std::min(2 * recheck_, kMaxRecheck)
                                 : kFirstRecheck;
    chosen_ = choice;
    one_median_ = one;
    probing_ = false;
    since_ = 0;
    slow_in_a_row_ = 0;
  }

  int asked_;
  int chosen_ = 0;  // 0: not decided yet
  bool probing_ = true;
  uint32_t probe_ = 0;
  int next_slot_ = 0;
  int waiting_ = 0;
  int kept_[2] = {0, 0};
  int64_t samples_[2][kKept] = {};
  int64_t one_median_ = 0;
  int64_t since_ = 0;
  int64_t recheck_ = kFirstRecheck;
  int slow_in_a_row_ = 0;
};

// Every class of the process, keyed by the exact multiply-adds per step
// (batch included) and the count asked: a bit-length class mixed shapes
// whose steps cost different times (an LSTM and a GRU at d = 800 both
// fell in [2^17, 2^18)), so a call could be judged by another shape's
// one-thread time.
class ThreadChoices {
 public:
  ThreadChoice::Call Begin(int64_t work, int asked) {
    std::lock_guard<std::mutex> lock(mu_);
    if (classes_.size() >= kMaxClasses) classes_.clear();
    return classes_.try_emplace({work, asked}, asked).first->second.Begin();
  }

  void End(int64_t work, int asked, const ThreadChoice::Call& call,
           int64_t ns_per_step) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = classes_.find({work, asked});
    if (it != classes_.end()) it->second.End(call, ns_per_step);
  }

  int Current(int64_t work, int asked) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = classes_.find({work, asked});
    return it == classes_.end() ? asked : it->second.Current();
  }

 private:
  // A process that runs ever new shapes forgets them all now and then
  // rather than grow without bound.
  static constexpr size_t kMaxClasses = 4096;
  std::mutex mu_;
  std::map<std::pair<int64_t, int>, ThreadChoice> classes_;
};

}  // namespace keras_antman

#endif  // KERAS_ANTMAN_THREAD_CHOICE_H_
