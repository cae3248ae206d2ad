#include "aqua/event_pool.hpp"

namespace aqua {

event_pool::event_pool(std::shared_ptr<backend> b, int device, std::size_t prealloc)
    : backend_(std::move(b)), device_(device) {
  free_.reserve(prealloc);
  for (std::size_t i = 0; i < prealloc; ++i) free_.push_back(backend_->create_event(device_));
  created_ = prealloc;
}

event_pool::~event_pool() {
  for (event_t e : free_) backend_->destroy_event(e);
}

event_t event_pool::acquire() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      event_t e = free_.back();
      free_.pop_back();
      return e;
    }
  }
  event_t e = backend_->create_event(device_);  // backend call outside the lock
  std::lock_guard<std::mutex> lock(mutex_);
  ++created_;
  return e;
}

void event_pool::release(event_t e) {
  std::lock_guard<std::mutex> lock(mutex_);
  free_.push_back(e);
}

std::size_t event_pool::created() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return created_;
}

}  // namespace aqua
