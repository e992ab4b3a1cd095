// A tiny persistent thread pool for the quantized matmul: the caller runs part 0 and
// `threads - 1` workers run the others. Workers spin briefly between calls (a decode step
// issues hundreds of matmuls a few microseconds apart), then sleep on a condition variable,
// so an idle server costs no CPU.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace specserve {

class Pool {
 public:
  using Task = void (*)(void* ctx, int part, int parts);

  ~Pool() { resize(1); }

  int size() const { return threads_; }

  // Start or stop workers so that `threads` parts run at once (the caller is one of them).
  void resize(int threads) {
    if (threads < 1) threads = 1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_++;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
    stop_ = false;
    threads_ = threads;
    for (int i = 1; i < threads; i++) workers_.emplace_back([this, i] { loop(i); });
  }

  // Run task(ctx, part, parts) for every part in 0..threads-1; returns when all are done.
  void run(Task task, void* ctx) {
    if (threads_ == 1) {
      task(ctx, 0, 1);
      return;
    }
    task_ = task;
    ctx_ = ctx;
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_++;
    }
    cv_.notify_all();
    task(ctx, 0, threads_);
    while (pending_.load(std::memory_order_acquire) > 0) {
      pause();
    }
  }

 private:
  // How long a worker spins for the next call before it sleeps.
  static constexpr std::chrono::microseconds kSpin{300};

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void loop(int part) {
    uint64_t seen = generation_.load();
    for (;;) {
      auto until = std::chrono::steady_clock::now() + kSpin;
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        pause();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return generation_.load() != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      task_(ctx_, part, threads_);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  Task task_ = nullptr;
  void* ctx_ = nullptr;
  int threads_ = 1;
  bool stop_ = false;
};

}  // namespace specserve
