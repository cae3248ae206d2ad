#include "host/worker_stream.hpp"

#include <chrono>
#include <utility>

namespace aqua::host {

worker_stream::worker_stream() : thread_([this] { run(); }) {}

worker_stream::~worker_stream() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_cv_.notify_one();
  thread_.join();
}

void worker_stream::enqueue(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(task));
    ++enqueued_;
    posted_.store(enqueued_, std::memory_order_release);
  }
  work_cv_.notify_one();
}

void worker_stream::synchronize() {
  std::unique_lock<std::mutex> lock(mutex_);
  const std::uint64_t target = enqueued_;
  done_cv_.wait(lock, [&] { return completed_ >= target; });
}

void worker_stream::run() {
  using clock = std::chrono::steady_clock;
  constexpr auto spin_for = std::chrono::microseconds(50);
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    if (queue_.empty() && !stopping_) {  // spin a little before sleeping
      const std::uint64_t seen = completed_;
      lock.unlock();
      const auto until = clock::now() + spin_for;
      while (posted_.load(std::memory_order_acquire) == seen && clock::now() < until)
        std::this_thread::yield();
      lock.lock();
    }
    work_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and drained
    auto task = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    task();  // tasks never throw (the backend wraps them)
    lock.lock();
    ++completed_;
    done_cv_.notify_all();
  }
}

}  // namespace aqua::host
