// Recycles backend events so the hot path never creates one in steady state.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "aqua/backend.hpp"

namespace aqua {

class event_pool {
 public:
  event_pool(std::shared_ptr<backend> b, int device, std::size_t prealloc);
  ~event_pool();
  event_pool(const event_pool&) = delete;
  event_pool& operator=(const event_pool&) = delete;

  /// A free event; creates one (outside the lock) only when none is free.
  event_t acquire();
  /// Returns an event. The caller guarantees no stream_wait will be enqueued on it anymore;
  /// waits already enqueued are unaffected by later re-records (backend contract).
  void release(event_t e);
  std::size_t created() const;

 private:
  std::shared_ptr<backend> backend_;
  int device_;
  mutable std::mutex mutex_;
  std::vector<event_t> free_;  // LOCK: mutex_
  std::size_t created_ = 0;    // LOCK: mutex_
};

}  // namespace aqua
