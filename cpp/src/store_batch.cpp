// Batched offload and fetch: one call from Python, one event on the user stream, and per tier
// one stream wait and one batched submission (cudaMemcpyBatchAsync on CUDA >= 12.8), so a
// batch of small tensors costs about one copy of their total size. The ordering rules are
// those of Note [Stream ordering] in store.cpp, applied once per batch.
#include <algorithm>
#include <optional>
#include <string>

#include "aqua/error.hpp"
#include "aqua/store.hpp"

namespace aqua {

namespace {
constexpr std::size_t no_offset = static_cast<std::size_t>(-1);

}  // namespace

std::vector<std::pair<std::uint64_t, std::size_t>> store::offload_many(
    const std::vector<offload_item>& items, stream_t user, bool fence_user) {
  require_open();
  for (const auto& item : items)
    AQUA_EXPECTS(item.nbytes == 0 || item.src != nullptr, invalid_argument_error,
                 "offload_many: null source pointer");
  reap();
  std::vector<std::uint64_t> ids(items.size());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (std::size_t i = 0; i < items.size(); ++i) {
      ids[i] = next_id_++;
      entries_.emplace(ids[i], entry{handle_state::submitting, 0, no_offset, nullptr,
                                     items[i].nbytes, 0, 0, items[i].priority, clock_, clock_});
      ++clock_;
    }
  }
  // Place every item first (evicting as needed); nothing is enqueued until all have a block.
  std::vector<std::optional<placement>> where(items.size());
  auto rollback = [&](event_t fence) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (where[i]) {
        for (event_t f : where[i]->fences) unref_locked(f);
        release_block_locked(where[i]->tier, where[i]->offset, fence);
      }
      entries_.erase(ids[i]);
    }
    changed_.notify_all();
  };
  try {
    for (std::size_t i = 0; i < items.size(); ++i)
      if (items[i].nbytes > 0) where[i] = place(items[i].nbytes, 0, ids[i]);
  } catch (...) {
    rollback(0);
    throw;
  }
  // One event on the user stream; per tier, one wait, one batched submission, one event.
  std::vector<event_t> done(tiers_.size(), 0);
  event_t ready_src = 0;
  try {
    ready_src = events_->acquire();
    device_guard guard(*backend_, config_.device);
    backend_->record(ready_src, user);
    for (std::size_t t = 0; t < tiers_.size(); ++t) {
      std::vector<void*> dsts;
      std::vector<const void*> srcs;
      std::vector<std::size_t> sizes;
      const stream_t s = tiers_[t].to_tier;
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (!where[i] || where[i]->tier != t) continue;
        if (dsts.empty()) backend_->stream_wait(s, ready_src);
        for (event_t f : where[i]->fences) backend_->stream_wait(s, f);
        if (items[i].nbytes > config_.chunk_bytes) {
          enqueue_copy(where[i]->ptr, items[i].src, items[i].nbytes, s);
          dsts.push_back(nullptr);  // marks the tier as used
          continue;
        }
        dsts.push_back(where[i]->ptr);
        srcs.push_back(items[i].src);
        sizes.push_back(items[i].nbytes);
      }
      if (dsts.empty()) continue;
      dsts.erase(std::remove(dsts.begin(), dsts.end(), nullptr), dsts.end());
      backend_->copy_batch_async(dsts.data(), srcs.data(), sizes.data(), dsts.size(), s);
      done[t] = events_->acquire();
      backend_->record(done[t], s);
      if (fence_user) backend_->stream_wait(user, done[t]);
    }
  } catch (...) {
    for (std::size_t t = 0; t < tiers_.size(); ++t) {  // error path: drain what was enqueued
      try {
        backend_->synchronize_stream(tiers_[t].to_tier);
      } catch (...) {
      }
      if (done[t]) events_->release(done[t]);
    }
    if (ready_src) events_->release(ready_src);
    rollback(0);
    throw;
  }
  events_->release(ready_src);
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::size_t i = 0; i < items.size(); ++i) {
    entry& e = entries_.at(ids[i]);
    if (!where[i]) {  // zero bytes
      e.state = handle_state::offloaded;
      ++tiers_[0].handles;
    } else {
      for (event_t f : where[i]->fences) unref_locked(f);
      e.state = handle_state::in_flight;
      e.tier = where[i]->tier;
      e.offset = where[i]->offset;
      e.ptr = where[i]->ptr;
      e.done = e.touched = done[e.tier];
      ref_locked(e.done);  // shared by the batch's handles on that tier
      ref_locked(e.touched);
      ++tiers_[e.tier].handles;
      counters_.bytes_offloaded += items[i].nbytes;
    }
    ++counters_.offloads;
  }
  changed_.notify_all();
  std::vector<std::pair<std::uint64_t, std::size_t>> out;
  out.reserve(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) out.emplace_back(ids[i], where[i] ? where[i]->tier : 0);
  return out;
}

void store::fetch_many(const std::vector<std::uint64_t>& ids, const std::vector<void*>& dsts,
                       stream_t user, bool keep) {
  require_open();
  AQUA_EXPECTS(ids.size() == dsts.size(), invalid_argument_error,
               "fetch_many: as many destinations as handles are needed");
  for (std::size_t i = 0; i < ids.size(); ++i)
    for (std::size_t j = 0; j < i; ++j)
      AQUA_EXPECTS(ids[i] != ids[j], invalid_argument_error,
                   "fetch_many: handle " + std::to_string(ids[i]) + " is listed twice");
  struct job {
    std::size_t tier;
    std::byte* src;
    std::size_t nbytes;
    event_t done, prefetched;
    handle_state was;
  };
  std::vector<job> jobs(ids.size());
  const event_t dst_ready = events_->acquire();  // before claiming: a failure here changes nothing
  try {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // Check every handle before claiming any, so a bad one changes nothing.
      for (bool all_free = false; !all_free;) {
        all_free = true;
        for (auto id : ids) {
          entry& e = claim_locked(lock, id, "fetch");  // may wait: then re-check them all
          (void)e;
        }
        for (auto id : ids)
          if (entries_.at(id).busy || entries_.at(id).state == handle_state::submitting) all_free = false;
      }
      for (std::size_t i = 0; i < ids.size(); ++i) {
        const entry& e = entries_.at(ids[i]);
        AQUA_EXPECTS(e.nbytes == 0 || e.prefetched || dsts[i] != nullptr, invalid_argument_error,
                     "fetch: null destination pointer");
      }
      for (std::size_t i = 0; i < ids.size(); ++i) {
        entry& e = entries_.at(ids[i]);
        jobs[i] = job{e.tier, e.ptr, e.nbytes, e.done, e.prefetched, e.state};
        ref_locked(e.done);
        e.state = handle_state::fetching;
      }
    }
  } catch (...) {
    events_->release(dst_ready);
    throw;
  }
  std::vector<event_t> copied(tiers_.size(), 0);
  try {
    device_guard guard(*backend_, config_.device);
    bool recorded_user = false;
    for (std::size_t t = 0; t < tiers_.size(); ++t) {
      std::vector<void*> d;
      std::vector<const void*> s;
      std::vector<std::size_t> n;
      std::vector<event_t> waited;
      const stream_t stream = tiers_[t].from_tier;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        const job& j = jobs[i];
        if (j.tier != t || j.nbytes == 0 || j.prefetched) continue;
        if (!recorded_user) {
          backend_->record(dst_ready, user);
          recorded_user = true;
        }
        if (waited.empty()) backend_->stream_wait(stream, dst_ready);
        if (std::find(waited.begin(), waited.end(), j.done) == waited.end()) {
          backend_->stream_wait(stream, j.done);  // the offload (or migration) that wrote it
          waited.push_back(j.done);
        }
        if (j.nbytes > config_.chunk_bytes) {
          enqueue_copy(dsts[i], j.src, j.nbytes, stream);
          continue;
        }
        d.push_back(dsts[i]);
        s.push_back(j.src);
        n.push_back(j.nbytes);
      }
      if (waited.empty()) continue;
      backend_->copy_batch_async(d.data(), s.data(), n.data(), d.size(), stream);
      copied[t] = events_->acquire();
      backend_->record(copied[t], stream);
      backend_->stream_wait(user, copied[t]);
    }
    for (const job& j : jobs)
      if (j.prefetched) backend_->stream_wait(user, j.prefetched);
  } catch (...) {
    // The caller frees the destinations when we throw: no enqueued piece may still write them.
    for (std::size_t t = 0; t < tiers_.size(); ++t) {
      try {
        backend_->synchronize_stream(tiers_[t].from_tier);
      } catch (...) {
      }
      if (copied[t]) events_->release(copied[t]);
    }
    events_->release(dst_ready);
    std::lock_guard<std::mutex> lock(mutex_);
    for (std::size_t i = 0; i < ids.size(); ++i) {  // handles stay valid: blocks were only read
      entries_.at(ids[i]).state = jobs[i].was;
      unref_locked(jobs[i].done);
    }
    changed_.notify_all();
    throw;
  }
  events_->release(dst_ready);
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    entry& e = entries_.at(ids[i]);
    const job& j = jobs[i];
    unref_locked(j.done);
    const event_t read = j.prefetched ? j.prefetched : copied[j.tier];
    ++counters_.fetches;
    if (!j.prefetched) counters_.bytes_fetched += j.nbytes;
    if (keep) {  // the block stays a clean copy; the read is its latest touch (Note [Block release])
      if (!j.prefetched && read) {  // a prefetch already counted as a touch when it was made
        ref_locked(read);
        unref_locked(e.touched);
        e.touched = read;
      }
      if (e.prefetched) {
        unref_locked(e.prefetched);
        e.prefetched = 0;
      }
      e.state = j.was;
      continue;
    }
    retire_entry_locked(ids[i], e, j.prefetched ? e.touched : read);
  }
  for (event_t c : copied)
    if (c && event_refs_.find(c) == event_refs_.end()) events_->release(c);  // zero-byte only
  changed_.notify_all();
}

}  // namespace aqua
