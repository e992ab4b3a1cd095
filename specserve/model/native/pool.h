// A small persistent thread pool for the quantized matmul. A call is a list of work items;
// the caller and the workers claim items from one shared counter, and the call returns as
// soon as every item is done. A worker the OS delays (the other core busy) therefore costs
// the call at most the item it holds, never a share of the work it has not started.
//
// The counter holds (generation << 32 | next item). Between calls it is closed (item =
// kClosed), so a late worker can never claim an item of a finished call, nor of the next
// one before its parameters are written.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace specserve {

class Pool {
 public:
  using Item = void (*)(void* ctx, int64_t item);

  ~Pool() { resize(1); }

  int size() const { return threads_; }

  // Start or stop workers so that `threads` threads work on a call (the caller is one).
  void resize(int threads) {
    if (threads < 1) threads = 1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      wake_++;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
    stop_ = false;
    threads_ = threads;
    const uint64_t start = wake_.load();  // a call made before a worker runs is still new
    for (int i = 1; i < threads; i++) workers_.emplace_back([this, start] { loop(start); });
  }

  // f(r0, r1) over pieces of `per` rows of [0, m) on every thread (a single piece runs on
  // the caller). A row's result must not depend on the piece that holds it.
  template <class F>
  void for_rows(int64_t m, int64_t per, const F& f) {
    const int64_t pieces = (m + per - 1) / per;
    if (pieces <= 1) {
      if (m > 0) f(int64_t{0}, m);
      return;
    }
    struct Ctx {
      const F* f;
      int64_t m, per;
    } ctx{&f, m, per};
    run(
        [](void* p, int64_t i) {
          const Ctx& c = *static_cast<const Ctx*>(p);
          const int64_t r0 = i * c.per, r1 = r0 + c.per < c.m ? r0 + c.per : c.m;
          (*c.f)(r0, r1);
        },
        &ctx, pieces);
  }

  // The caller has no call in sight (its model is idle): the workers sleep now instead of
  // spinning for `kSpin`, which leaves the cores to the processes that carry the answer out
  // (a proxy, the client). The next call wakes them as usual.
  void park() { parked_.store(true, std::memory_order_release); }

  // Run item(ctx, i) for i in 0..items-1 over all threads; returns when all are done.
  void run(Item item, void* ctx, int64_t items) {
    parked_.store(false, std::memory_order_relaxed);
    const uint64_t gen = (claim_.load() >> 32) + 1;
    item_ = item;
    ctx_ = ctx;
    items_ = items;
    done_.store(0, std::memory_order_relaxed);
    claim_.store(gen << 32, std::memory_order_release);
    if (threads_ > 1) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        wake_++;
      }
      cv_.notify_all();
    }
    work();
    while (done_.load(std::memory_order_acquire) < items) pause();
    claim_.store(gen << 32 | kClosed, std::memory_order_release);
  }

 private:
  static constexpr uint64_t kClosed = 0xFFFFFFFFu;
  // How long a worker spins for the next call before it sleeps. Waking a sleeping thread
  // can cost a millisecond on a virtual machine (its CPU halts), so workers stay awake
  // between the matmuls of a generation and sleep only when the model is idle.
  static constexpr std::chrono::microseconds kSpin{5000};

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  // Claim and run items of the current call until none is left.
  void work() {
    for (;;) {
      uint64_t v = claim_.load(std::memory_order_acquire);
      const uint64_t next = v & kClosed;
      if (next == kClosed || static_cast<int64_t>(next) >= items_) return;
      if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      item_(ctx_, static_cast<int64_t>(next));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop(uint64_t seen) {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      int spins = 0;
      while (wake_.load(std::memory_order_acquire) == seen) {
        pause();
        if (++spins % 256 == 0 && (parked_.load(std::memory_order_acquire) ||
                                   std::chrono::steady_clock::now() > until)) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return wake_.load() != seen; });
        }
      }
      seen = wake_.load(std::memory_order_acquire);
      if (stop_) return;
      work();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> wake_{0};
  std::atomic<uint64_t> claim_{kClosed};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> parked_{false};
  Item item_ = nullptr;
  void* ctx_ = nullptr;
  int64_t items_ = 0;
  int threads_ = 1;
  bool stop_ = false;
};

}  // namespace specserve
