// Recycled backend events with RAII references, so the hot path never creates one in steady
// state and nobody counts references by hand.
//
// Note [Event references]
// An event_ref shares one recorded event: a batch's handles, a pool fence and a pending wait
// may all hold the same one. The event goes back to the pool when its last reference goes
// (an atomic count; the pool's lock is taken only then, and it is a leaf lock: nothing is
// called under it). Returning an event is safe while waits on it are still enqueued: by the
// backend contract a later re-record does not move them. The pool outlives every reference
// (the store drops its entries, fences and engine before the pool).
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

#include "aqua/backend.hpp"

namespace aqua {

class event_pool;

class event_ref {
 public:
  event_ref() noexcept = default;
  event_ref(const event_ref& o) noexcept;
  event_ref(event_ref&& o) noexcept : slot_(o.slot_) { o.slot_ = nullptr; }
  event_ref& operator=(event_ref o) noexcept {
    std::swap(slot_, o.slot_);
    return *this;
  }
  ~event_ref() { reset(); }

  event_t get() const noexcept;
  explicit operator bool() const noexcept { return slot_ != nullptr; }
  bool operator==(const event_ref& o) const noexcept { return slot_ == o.slot_; }
  bool operator!=(const event_ref& o) const noexcept { return slot_ != o.slot_; }
  void reset() noexcept;

 private:
  friend class event_pool;
  struct slot {
    event_t event;
    std::atomic<int> refs{0};
    event_pool* pool;
  };
  explicit event_ref(slot* s) noexcept : slot_(s) {}
  slot* slot_ = nullptr;
};

class event_pool {
 public:
  event_pool(std::shared_ptr<backend> b, int device, std::size_t prealloc);
  ~event_pool();  ///< destroys every event; no event_ref may outlive the pool
  event_pool(const event_pool&) = delete;
  event_pool& operator=(const event_pool&) = delete;

  /// A free event, referenced once; creates one (outside the lock) only when none is free.
  event_ref acquire();
  std::size_t created() const;

 private:
  friend class event_ref;
  void give_back(event_ref::slot* s) noexcept;

  std::shared_ptr<backend> backend_;
  int device_;
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<event_ref::slot>> all_;  // LOCK: mutex_
  std::vector<event_ref::slot*> free_;                 // LOCK: mutex_
};

}  // namespace aqua
