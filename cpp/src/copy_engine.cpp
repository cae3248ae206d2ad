// The notes this file implements are at the top of include/aqua/copy_engine.hpp.
#include "aqua/copy_engine.hpp"

#include <algorithm>
#include <limits>
#include <unordered_set>

#include "aqua/error.hpp"

namespace aqua {

copy_engine::copy_engine(std::shared_ptr<backend> b, int device, std::size_t tiers,
                         std::size_t chunk_bytes, event_pool& events)
    : backend_(std::move(b)), device_(device), chunk_bytes_(chunk_bytes), events_(events) {
  AQUA_EXPECTS(chunk_bytes_ >= block_alignment, invalid_argument_error,
               "chunk_bytes must be at least 256");
  device_guard guard(*backend_, device_);
  streams_.reserve(tiers * lane_count + 1);
  try {
    for (std::size_t t = 0; t < tiers; ++t)
      for (std::size_t l = 0; l < lane_count; ++l)
        streams_.push_back(
            backend_->create_stream(device_, static_cast<lane>(l) == lane::demand));
    streams_.push_back(backend_->create_stream(device_));  // the relay (Note [Relay])
  } catch (...) {
    for (stream_t s : streams_) backend_->destroy_stream(s);
    throw;
  }
}

copy_engine::~copy_engine() {
  drain();
  try {
    device_guard guard(*backend_, device_);
    for (stream_t s : streams_) backend_->destroy_stream(s);
  } catch (...) {  // the runtime is unloading (exit): the driver frees the streams anyway
  }
}

void copy_engine::enqueue(const std::vector<copy_op>& ops, stream_t s, std::size_t chunk,
                          bool own) {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<std::size_t> sizes;
  for (const copy_op& op : ops) {
    if (op.bytes == 0) continue;
    if (op.bytes <= chunk) {
      dsts.push_back(op.dst);
      srcs.push_back(op.src);
      sizes.push_back(op.bytes);
      continue;
    }
    auto* d = static_cast<std::byte*>(op.dst);
    const auto* p = static_cast<const std::byte*>(op.src);
    for (std::size_t done = 0; done < op.bytes; done += chunk)
      backend_->copy_async(d + done, p + done, std::min(chunk, op.bytes - done), s);
  }
  if (dsts.size() == 1) {
    backend_->copy_async(dsts[0], srcs[0], sizes[0], s);
  } else if (dsts.size() > 1) {
    const batch_submit how = backend_->copy_batch_async(dsts.data(), srcs.data(), sizes.data(),
                                                        dsts.size(), s, own);
    (how == batch_submit::batched  ? batched_
     : how == batch_submit::kernel ? kernels_
                                   : fallbacks_)
        .fetch_add(1, std::memory_order_relaxed);
  }
}

std::vector<event_ref> copy_engine::submit(const submission& sub) {
  std::vector<event_ref> out;
  out.reserve(sub.groups.size());
  std::vector<stream_t> touched;
  device_guard guard(*backend_, device_);
  try {
    event_ref user_ready;
    if (sub.after_user && !sub.groups.empty()) {
      user_ready = events_.acquire();
      backend_->record(user_ready.get(), sub.user);
    }
    std::unordered_set<event_t> waited;  // each distinct event once (a batch shares many)
    for (const copy_group& g : sub.groups) {
      const stream_t s = stream(g.tier, g.lane);
      if (std::find(touched.begin(), touched.end(), s) == touched.end()) touched.push_back(s);
      waited.clear();
      if (user_ready) {
        backend_->stream_wait(s, user_ready.get());
        waited.insert(user_ready.get());
      }
      for (const event_ref& e : g.after) {
        if (!e || !waited.insert(e.get()).second) continue;
        backend_->stream_wait(s, e.get());
      }
      enqueue(g.ops, s, chunk_bytes_, true);  // the store's own memory: the tiers, the device
      out.push_back(events_.acquire());
      backend_->record(out.back().get(), s);
    }
    if (sub.fence_user) {
      for (const event_ref& e : out) backend_->stream_wait(sub.user, e.get());
      for (const event_ref& e : sub.user_waits)
        if (e) backend_->stream_wait(sub.user, e.get());
    }
  } catch (...) {
    for (stream_t s : touched) {  // Note [Abort rule]
      try {
        backend_->synchronize_stream(s);
      } catch (...) {
      }
    }
    throw;
  }
  return out;
}

void copy_engine::copy_on(stream_t s, const std::vector<copy_op>& ops, bool wait) {
  device_guard guard(*backend_, device_);
  const bool relay =
      !backend_->batches_on(s) &&
      std::count_if(ops.begin(), ops.end(), [](const copy_op& op) { return op.bytes > 0; }) > 1;
  const stream_t on = relay ? streams_.back() : s;  // Note [Relay]
  try {
    event_ref after;
    if (relay) {
      event_ref before = events_.acquire();
      backend_->record(before.get(), s);
      backend_->stream_wait(on, before.get());
    }
    // One stream: nothing to chunk for. The caller's pointers: never the copy kernel (Note
    // [Copy kernel] in cuda/copy_kernel.hpp: a pointer it cannot reach ends the context).
    enqueue(ops, on, std::numeric_limits<std::size_t>::max(), false);
    if (relay) {
      after = events_.acquire();
      backend_->record(after.get(), on);
      backend_->stream_wait(s, after.get());
    }
    if (wait) relay ? backend_->wait(after.get()) : backend_->synchronize_stream(s);
  } catch (...) {
    for (stream_t used : {on, s}) {  // Note [Abort rule]
      try {
        backend_->synchronize_stream(used);
      } catch (...) {
      }
    }
    throw;
  }
}

void copy_engine::synchronize() {
  device_guard guard(*backend_, device_);
  for (stream_t s : streams_) backend_->synchronize_stream(s);
}

void copy_engine::drain() noexcept {
  try {
    device_guard guard(*backend_, device_);
    for (stream_t s : streams_) {
      try {
        backend_->synchronize_stream(s);
      } catch (...) {  // a dying runtime (cudaErrorCudartUnloading at exit): nothing to wait on
      }
    }
  } catch (...) {
  }
}

copy_engine_stats copy_engine::stats() const noexcept {
  return {batched_.load(std::memory_order_relaxed), fallbacks_.load(std::memory_order_relaxed),
          kernels_.load(std::memory_order_relaxed)};
}

}  // namespace aqua
