// A stream of the emulation backend: a FIFO of tasks served by one worker thread, so
// operations run asynchronously and in order, exactly like a device stream.
//
// An idle worker spins (yielding) for a few microseconds before it sleeps: a copy is usually
// enqueued as several tasks (wait, copy, record) in quick succession, and waking a sleeping
// thread costs tens of microseconds on small VMs, more than a small copy itself.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace aqua::host {

class worker_stream {
 public:
  worker_stream();
  ~worker_stream();  ///< drains the queue, then joins
  worker_stream(const worker_stream&) = delete;
  worker_stream& operator=(const worker_stream&) = delete;

  void enqueue(std::function<void()> task);
  /// Blocks until every task enqueued before the call has run.
  void synchronize();

 private:
  void run();

  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<std::function<void()>> queue_;  // LOCK: mutex_
  std::uint64_t enqueued_ = 0;               // LOCK: mutex_
  std::atomic<std::uint64_t> posted_{0};     // enqueued_, readable without the lock
  std::uint64_t completed_ = 0;              // LOCK: mutex_
  bool stopping_ = false;                    // LOCK: mutex_
  std::thread thread_;
};

}  // namespace aqua::host
