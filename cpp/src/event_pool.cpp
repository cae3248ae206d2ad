#include "aqua/event_pool.hpp"

#include <cassert>

namespace aqua {

event_ref::event_ref(const event_ref& o) noexcept : slot_(o.slot_) {
  if (slot_) slot_->refs.fetch_add(1, std::memory_order_relaxed);
}

event_t event_ref::get() const noexcept { return slot_ ? slot_->event : 0; }

void event_ref::reset() noexcept {
  if (!slot_) return;
  if (slot_->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) slot_->pool->give_back(slot_);
  slot_ = nullptr;
}

event_pool::event_pool(std::shared_ptr<backend> b, int device, std::size_t prealloc)
    : backend_(std::move(b)), device_(device) {
  for (std::size_t i = 0; i < prealloc; ++i) {
    auto s = std::make_unique<event_ref::slot>();
    s->event = backend_->create_event(device_);
    s->pool = this;
    free_.push_back(s.get());
    all_.push_back(std::move(s));
  }
}

event_pool::~event_pool() {
  assert(free_.size() == all_.size() && "an event_ref outlived its pool");
  for (auto& s : all_) backend_->destroy_event(s->event);
}

event_ref event_pool::acquire() {
  event_ref::slot* s = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      s = free_.back();
      free_.pop_back();
    }
  }
  if (!s) {
    auto made = std::make_unique<event_ref::slot>();
    made->event = backend_->create_event(device_);  // backend call outside the lock
    made->pool = this;
    s = made.get();
    std::lock_guard<std::mutex> lock(mutex_);
    all_.push_back(std::move(made));
  }
  s->refs.store(1, std::memory_order_relaxed);
  return event_ref(s);
}

void event_pool::give_back(event_ref::slot* s) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  free_.push_back(s);
}

std::size_t event_pool::created() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return all_.size();
}

}  // namespace aqua
