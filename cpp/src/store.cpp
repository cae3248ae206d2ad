// Note [Stream ordering]
// Every copy is fenced by events on both sides; nothing on the fast path waits on the host.
//
//  offload(src, user):   e0 := record(user)           -- after the work that produced src
//                        to_tier waits e0; copy src -> block on to_tier
//                        done := record(to_tier)
//                        [fence_user] user waits done -- later writes to src cannot race the copy
//  fetch(id, dst, user): e2 := record(user)           -- after the caller allocated dst on user
//                        from_tier waits e2 and done  -- the offload copy may still be running
//                        copy block -> dst on from_tier; e3 := record(from_tier)
//                        user waits e3                -- later kernels see the bytes
//  Releasing the *source* of an offload (release=True) is the caller's side: the Python layer
//  keeps the storage alive until `done` (record_stream on CUDA, a holder on emulation).
//
// Note [Deferred reuse]
// A block leaves its pool for good only through defer_release_locked(), which parks it in
// pending_ with the event of the last copy that touched it. reap() returns parked blocks to
// their pool once their event completed; allocation never hands out a block a copy may still
// read or write. When no tier has room, place() waits for parked blocks before giving up.
//
// Note [Locking]
// mutex_ guards the handle table, the pools, pending_ and the counters. No backend call (CUDA
// runtime or emulation worker) is ever made while holding it: calls that need the lock take
// what they need, drop it, talk to the backend, and re-take it to publish the result. An entry
// in state `submitting` or `fetching` belongs to the thread that set it; others refuse it.
// event_pool has its own lock and also calls the backend outside it.
#include "aqua/store.hpp"

#include <algorithm>
#include <string>
#include <utility>

#include "aqua/error.hpp"

namespace aqua {

namespace {
constexpr std::size_t no_offset = static_cast<std::size_t>(-1);
constexpr std::size_t prealloc_events = 64;
}  // namespace

const char* to_string(handle_state s) noexcept {
  switch (s) {
    case handle_state::submitting: return "submitting";
    case handle_state::in_flight: return "in_flight";
    case handle_state::offloaded: return "offloaded";
    case handle_state::fetching: return "fetching";
    case handle_state::fetched: return "fetched";
    case handle_state::freed: return "freed";
  }
  return "unknown";
}

store::store(std::shared_ptr<backend> b, store_config cfg)
    : backend_(std::move(b)), config_(std::move(cfg)) {
  AQUA_EXPECTS(backend_ != nullptr, invalid_argument_error, "store: no backend");
  const int n = backend_->device_count();
  AQUA_EXPECTS(config_.device >= 0 && config_.device < n, invalid_argument_error,
               "device " + std::to_string(config_.device) + " does not exist on the " +
                   backend_->name() + " backend (" + std::to_string(n) + " device(s))");
  AQUA_EXPECTS(config_.chunk_bytes >= block_alignment, invalid_argument_error,
               "chunk_bytes must be at least 256");
  for (std::size_t i = 0; i < config_.peers.size(); ++i) {
    const auto& p = config_.peers[i];
    AQUA_EXPECTS(p.device >= 0 && p.device < n, invalid_argument_error,
                 "peer device " + std::to_string(p.device) + " does not exist on the " +
                     backend_->name() + " backend (" + std::to_string(n) + " device(s))");
    AQUA_EXPECTS(p.bytes >= block_alignment, invalid_argument_error,
                 "peer " + backend_->device_label(p.device) + ": " + format_bytes(p.bytes) +
                     " is smaller than one 256-byte block");
    for (std::size_t j = 0; j < i; ++j)
      AQUA_EXPECTS(config_.peers[j].device != p.device, invalid_argument_error,
                   "peer " + backend_->device_label(p.device) + " is listed twice");
    if (p.device != config_.device)
      AQUA_EXPECTS(backend_->can_access_peer(config_.device, p.device), invalid_argument_error,
                   backend_->device_label(config_.device) + " cannot access " +
                       backend_->device_label(p.device) + " as a peer");
  }
  AQUA_EXPECTS(config_.host_bytes == 0 || config_.host_bytes >= block_alignment,
               invalid_argument_error, "host tier smaller than one 256-byte block");

  // Everything below is allocated once, here: the hot path makes no allocation call.
  try {
    device_guard guard(*backend_, config_.device);
    for (const auto& p : config_.peers) {
      if (p.device != config_.device) backend_->enable_peer_access(config_.device, p.device);
      tier t{"peer", backend_->device_label(p.device), p.device, nullptr, 0, pool(p.bytes)};
      tiers_.push_back(std::move(t));
      auto& back = tiers_.back();
      back.base = static_cast<std::byte*>(backend_->allocate_device(p.device, p.bytes));
      back.reserved = p.bytes;
    }
    if (config_.host_bytes > 0) {
      tier t{"host", "cpu", -1, nullptr, 0, pool(config_.host_bytes)};
      tiers_.push_back(std::move(t));
      auto& back = tiers_.back();
      back.base = static_cast<std::byte*>(backend_->allocate_pinned_host(config_.host_bytes));
      back.reserved = config_.host_bytes;
    }
    AQUA_EXPECTS(!tiers_.empty(), invalid_argument_error,
                 "no tier to offload to: give at least one peer or a host tier");
    for (auto& t : tiers_) {
      t.to_tier = backend_->create_stream(config_.device);
      t.from_tier = backend_->create_stream(config_.device);
    }
    events_ = std::make_unique<event_pool>(backend_, config_.device, prealloc_events);
  } catch (...) {
    release_resources();
    throw;
  }
}

store::~store() {
  close();
  release_resources();
}

void store::release_resources() noexcept {
  // Called only once no copy can be running (after close(), or from a failed constructor).
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& kv : pending_)
      if (events_) events_->release(kv.second.event);
    pending_.clear();
    for (auto& kv : entries_)
      if (kv.second.done && events_) events_->release(kv.second.done);
    entries_.clear();
  }
  events_.reset();
  for (auto& t : tiers_) {
    if (t.to_tier) backend_->destroy_stream(t.to_tier);
    if (t.from_tier) backend_->destroy_stream(t.from_tier);
    t.to_tier = t.from_tier = 0;
    if (t.base) {
      if (t.device < 0)
        backend_->free_pinned_host(t.base, t.reserved);
      else
        backend_->free_device(t.device, t.base);
      t.base = nullptr;
    }
  }
}

void store::require_open() const {
  if (closed_.load()) throw error("the offload manager is closed");
}

store::entry& store::find_locked(std::uint64_t id, const char* op) {
  auto it = entries_.find(id);
  if (it == entries_.end())
    throw invalid_handle_error(std::string(op) + ": handle " + std::to_string(id) +
                               " is not live (already fetched or freed, or from another manager)");
  return it->second;
}

void store::enqueue_copy(void* dst, const void* src, std::size_t bytes, stream_t s) {
  auto* d = static_cast<std::byte*>(dst);
  const auto* p = static_cast<const std::byte*>(src);
  for (std::size_t done = 0; done < bytes; done += config_.chunk_bytes)
    backend_->copy_async(d + done, p + done, std::min(config_.chunk_bytes, bytes - done), s);
}

void store::defer_release_locked(std::size_t t, std::size_t offset, event_t e) {
  const std::size_t bytes = tiers_[t].blocks.block_size(offset);
  pending_.emplace(next_seq_++, pending_block{t, offset, bytes, e});
  tiers_[t].pending_bytes += bytes;
}

void store::reap() {
  std::vector<std::pair<std::uint64_t, event_t>> parked;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pending_.empty()) return;
    parked.reserve(pending_.size());
    for (const auto& kv : pending_) parked.emplace_back(kv.first, kv.second.event);
  }
  std::vector<std::uint64_t> completed;
  for (const auto& [seq, ev] : parked)
    if (backend_->query(ev)) completed.push_back(seq);
  if (completed.empty()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::uint64_t seq : completed) {
    auto it = pending_.find(seq);
    if (it == pending_.end()) continue;  // another thread reaped it first
    auto& t = tiers_[it->second.tier];
    t.blocks.release(it->second.offset);
    t.pending_bytes -= it->second.bytes;
    events_->release(it->second.event);
    pending_.erase(it);
  }
}

void store::wait_pending() {
  std::vector<event_t> parked;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& kv : pending_) parked.push_back(kv.second.event);
  }
  for (event_t e : parked) backend_->wait(e);
  reap();
}

std::uint64_t store::place_locked(std::size_t nbytes) {
  for (std::size_t t = 0; t < tiers_.size(); ++t) {
    auto offset = tiers_[t].blocks.allocate(nbytes);
    if (!offset) continue;
    const std::uint64_t id = next_id_++;
    entries_.emplace(id, entry{handle_state::submitting, t, *offset, nbytes, 0});
    ++tiers_[t].handles;
    return id;
  }
  return 0;
}

std::string store::oom_message_locked(std::size_t nbytes) const {
  std::string msg = "cannot offload " + format_bytes(nbytes) + ": no tier has a free block that large (";
  for (std::size_t t = 0; t < tiers_.size(); ++t) {
    const auto s = tiers_[t].blocks.stats();
    if (t) msg += "; ";
    msg += tiers_[t].kind + " " + tiers_[t].location + ": " + format_bytes(s.free) + " free of " +
           format_bytes(s.capacity) + ", largest free block " + format_bytes(s.largest_free);
  }
  return msg + ")";
}

std::uint64_t store::offload(const void* src, std::size_t nbytes, stream_t user, bool fence_user) {
  require_open();
  if (nbytes == 0) {  // nothing to copy: a handle with no block, already complete
    std::lock_guard<std::mutex> lock(mutex_);
    const std::uint64_t id = next_id_++;
    entries_.emplace(id, entry{handle_state::offloaded, 0, no_offset, 0, 0});
    ++tiers_[0].handles;
    ++counters_.offloads;
    return id;
  }
  AQUA_EXPECTS(src != nullptr, invalid_argument_error, "offload: null source pointer");

  reap();
  std::uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    id = place_locked(nbytes);
  }
  if (id == 0) {  // full: blocks awaiting deferred reuse may free enough room
    wait_pending();
    std::lock_guard<std::mutex> lock(mutex_);
    id = place_locked(nbytes);
    if (id == 0) throw out_of_memory_error(oom_message_locked(nbytes), nbytes);
  }

  std::size_t t = 0, offset = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const entry& e = entries_.at(id);
    t = e.tier;
    offset = e.offset;
  }
  tier& tr = tiers_[t];  // the vector never changes size; streams and base are immutable
  const event_t ready_src = events_->acquire();
  const event_t done = events_->acquire();
  bool done_recorded = false;
  try {
    device_guard guard(*backend_, config_.device);
    backend_->record(ready_src, user);
    backend_->stream_wait(tr.to_tier, ready_src);
    enqueue_copy(tr.base + offset, src, nbytes, tr.to_tier);
    backend_->record(done, tr.to_tier);
    done_recorded = true;
    if (fence_user) backend_->stream_wait(user, done);
  } catch (...) {
    // Part of the copy may be enqueued: park the block behind an event recorded after it.
    bool parked = done_recorded;
    if (!parked) {
      try {
        backend_->record(done, tr.to_tier);
        parked = true;
      } catch (...) {
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(id);
    --tr.handles;
    if (parked) {
      defer_release_locked(t, offset, done);
    } else {  // the stream is unusable; nothing more will run on it
      tr.blocks.release(offset);
      events_->release(done);
    }
    events_->release(ready_src);
    throw;
  }
  events_->release(ready_src);  // the wait on it is already captured
  std::lock_guard<std::mutex> lock(mutex_);
  entry& e = entries_.at(id);
  e.state = handle_state::in_flight;
  e.done = done;
  ++counters_.offloads;
  counters_.bytes_offloaded += nbytes;
  return id;
}

void store::fetch(std::uint64_t id, void* dst, stream_t user) {
  require_open();
  entry snapshot{};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    entry& e = find_locked(id, "fetch");
    if (e.state != handle_state::in_flight && e.state != handle_state::offloaded)
      throw invalid_handle_error("fetch: handle " + std::to_string(id) + " is " +
                                 to_string(e.state) + " in another call");
    snapshot = e;
    e.state = handle_state::fetching;
  }
  if (snapshot.nbytes == 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    --tiers_[snapshot.tier].handles;
    entries_.erase(id);
    ++counters_.fetches;
    return;
  }
  AQUA_EXPECTS(dst != nullptr, invalid_argument_error, "fetch: null destination pointer");
  tier& tr = tiers_[snapshot.tier];
  const event_t dst_ready = events_->acquire();
  const event_t copied = events_->acquire();
  try {
    device_guard guard(*backend_, config_.device);
    backend_->record(dst_ready, user);
    backend_->stream_wait(tr.from_tier, dst_ready);
    backend_->stream_wait(tr.from_tier, snapshot.done);
    enqueue_copy(dst, tr.base + snapshot.offset, snapshot.nbytes, tr.from_tier);
    backend_->record(copied, tr.from_tier);
    backend_->stream_wait(user, copied);
  } catch (...) {
    // The caller frees dst when we throw: make sure no enqueued piece can still write it.
    try {
      backend_->synchronize_stream(tr.from_tier);
    } catch (...) {
    }
    events_->release(dst_ready);
    events_->release(copied);
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.at(id).state = snapshot.state;  // the handle stays valid: the block was only read
    throw;
  }
  events_->release(dst_ready);
  std::lock_guard<std::mutex> lock(mutex_);
  events_->release(snapshot.done);  // waits on it are captured; nothing else uses it
  defer_release_locked(snapshot.tier, snapshot.offset, copied);
  --tr.handles;
  entries_.erase(id);
  ++counters_.fetches;
  counters_.bytes_fetched += snapshot.nbytes;
}

void store::free(std::uint64_t id) {
  require_open();
  std::lock_guard<std::mutex> lock(mutex_);
  entry& e = find_locked(id, "free");
  if (e.state != handle_state::in_flight && e.state != handle_state::offloaded)
    throw invalid_handle_error("free: handle " + std::to_string(id) + " is " + to_string(e.state) +
                               " in another call");
  if (e.nbytes > 0) defer_release_locked(e.tier, e.offset, e.done);
  --tiers_[e.tier].handles;
  entries_.erase(id);
  ++counters_.frees;
}

bool store::ready(std::uint64_t id) {
  event_t ev = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    entry& e = find_locked(id, "ready");
    if (e.state == handle_state::offloaded) return true;
    if (e.state != handle_state::in_flight) return false;
    ev = e.done;
  }
  if (!backend_->query(ev)) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(id);
  if (it != entries_.end() && it->second.state == handle_state::in_flight && it->second.done == ev)
    it->second.state = handle_state::offloaded;
  return true;
}

void store::wait(std::uint64_t id) {
  event_t ev = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    entry& e = find_locked(id, "wait");
    if (e.state != handle_state::in_flight) return;
    ev = e.done;
  }
  backend_->wait(ev);
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(id);
  if (it != entries_.end() && it->second.state == handle_state::in_flight && it->second.done == ev)
    it->second.state = handle_state::offloaded;
}

handle_info store::info(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(id);
  if (it == entries_.end())
    throw invalid_handle_error("handle " + std::to_string(id) + " is not live");
  return {it->second.state, it->second.tier, it->second.nbytes};
}

bool store::contains(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.count(id) != 0;
}

void store::synchronize() {
  require_open();
  for (auto& t : tiers_) {
    backend_->synchronize_stream(t.to_tier);
    backend_->synchronize_stream(t.from_tier);
  }
  reap();
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& kv : entries_)
    if (kv.second.state == handle_state::in_flight) kv.second.state = handle_state::offloaded;
}

void store::close() noexcept {
  if (closed_.exchange(true)) return;
  for (auto& t : tiers_) {
    try {
      if (t.to_tier) backend_->synchronize_stream(t.to_tier);
      if (t.from_tier) backend_->synchronize_stream(t.from_tier);
    } catch (...) {  // a dying runtime (cudaErrorCudartUnloading at exit): nothing left to wait on
    }
  }
}

store_stats store::stats() {
  reap();
  std::lock_guard<std::mutex> lock(mutex_);
  store_stats s = counters_;
  s.tiers.clear();
  for (const auto& t : tiers_)
    s.tiers.push_back(tier_stats{t.kind, t.location, t.blocks.stats(), t.pending_bytes, t.handles});
  s.live_handles = entries_.size();
  s.events_created = events_ ? events_->created() : 0;
  return s;
}

stream_t store::copy_stream(std::size_t t, direction d) const {
  const tier& tr = tiers_.at(t);
  return d == direction::to_tier ? tr.to_tier : tr.from_tier;
}

void store::raw_copy(void* dst, const void* src, std::size_t bytes, stream_t stream) {
  require_open();
  device_guard guard(*backend_, config_.device);
  backend_->copy_async(dst, src, bytes, stream);
}

}  // namespace aqua
