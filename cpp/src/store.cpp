// Note [Stream ordering]
// Every copy is fenced by events on both sides; nothing on the fast path waits on the host.
//
//  offload(src, user):   e0 := record(user)           -- after the work that produced src
//                        to_tier waits e0 and the block's fences (Note [Ordered reuse], pool.hpp)
//                        copy src -> block on to_tier; done := record(to_tier)
//                        [fence_user] user waits done -- later writes to src cannot race the copy
//  fetch(id, dst, user): e2 := record(user)           -- after the caller allocated dst on user
//                        from_tier waits e2 and done  -- the offload copy may still be running
//                        copy block -> dst on from_tier; e3 := record(from_tier)
//                        user waits e3                -- later kernels see the bytes
//  prefetch:             the same copy, but user does not wait; fetch later makes user wait e3.
//  migrate (store_tiers.cpp): migrate stream waits `touched` and the new block's fences;
//                        copy; m := record; the handle's done and touched become m.
//  Releasing the *source* of an offload (release=True) is the caller's side: the Python layer
//  keeps the storage alive until `done` (record_stream on CUDA, a holder on emulation).
//
// Note [Block release]
// Each entry keeps `touched`: an event ordered after every copy that touched its block. An
// offload sets it to its copy's event; a read (fetch with keep, prefetch) to the read's event,
// which comes after it because reads wait on `done` and reads of one tier share its from_tier
// stream; a migration to its event (the move waited on `touched`); an in-place append to the
// append's event (which waited on `touched`). The block is released with `touched` (or with the
// consuming fetch's own copy) as its fence: the next owner of those bytes orders its copy after
// it, and reap() drops fences whose event completed.
//
// Note [Locking]
// mutex_ guards the handle table, the tiers' pools and segments, event refcounts, fences and
// counters. No backend call (CUDA runtime or emulation worker) is ever made while holding it:
// an operation takes what it needs, marks the entry as owned (state submitting or fetching, or
// busy for a migration or prefetch), drops the lock, talks to the backend, and re-takes the
// lock to publish. Others wait on `changed_` for an owned entry, or refuse it (a second fetch).
// Events are reference counted (event_refs_): an entry, a fence or a batch may share one, and
// it returns to the event pool at zero. event_pool has its own lock and calls the backend
// outside it.
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
  policy_ = make_eviction_policy(config_.policy);
  const int n = backend_->device_count();
  if (n == 0 && !backend_->status().empty())
    throw backend_error("the " + backend_->name() + " backend has no device: " +
                            backend_->status(),
                        "noDevice");
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
    AQUA_EXPECTS(p.bytes == 0 || p.bytes >= block_alignment, invalid_argument_error,
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
  AQUA_EXPECTS(!config_.peers.empty() || config_.host_bytes > 0, invalid_argument_error,
               "no tier to offload to: give at least one peer or a host tier");

  // Everything below is allocated once, here (and in lend): the hot path allocates nothing.
  tiers_.reserve(config_.peers.size() + 1);
  try {
    device_guard guard(*backend_, config_.device);
    for (const auto& p : config_.peers) {
      if (p.device != config_.device) backend_->enable_peer_access(config_.device, p.device);
      tiers_.push_back(tier{"peer", backend_->device_label(p.device), p.device, pool(), {}, {}});
      if (p.bytes > 0) {
        auto* mem = static_cast<std::byte*>(backend_->allocate_device(p.device, p.bytes));
        const std::size_t base = tiers_.back().blocks.add_segment(p.bytes);
        tiers_.back().segments.emplace(base, segment_memory{mem, p.bytes, false});
      }
    }
    if (config_.host_bytes > 0) {
      tiers_.push_back(tier{"host", "cpu", -1, pool(), {}, {}});
      auto* mem = static_cast<std::byte*>(backend_->allocate_pinned_host(config_.host_bytes));
      const std::size_t base = tiers_.back().blocks.add_segment(config_.host_bytes);
      tiers_.back().segments.emplace(base, segment_memory{mem, config_.host_bytes, false});
    }
    for (auto& t : tiers_) {
      t.to_tier = backend_->create_stream(config_.device);
      t.from_tier = backend_->create_stream(config_.device);
      t.migrate = backend_->create_stream(config_.device);
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
  // Streams go first: an emulated stream drains its queue, whose tasks may name events.
  for (auto& t : tiers_) {
    for (stream_t* s : {&t.to_tier, &t.from_tier, &t.migrate}) {
      if (*s) backend_->destroy_stream(*s);
      *s = 0;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (events_)
      for (auto& kv : event_refs_) events_->release(kv.first);
    event_refs_.clear();
    fences_.clear();
    entries_.clear();
  }
  events_.reset();
  for (auto& t : tiers_) {
    for (auto& kv : t.segments) {
      if (t.device < 0)
        backend_->free_pinned_host(kv.second.ptr, kv.second.bytes);
      else
        backend_->free_device(t.device, kv.second.ptr);
    }
    t.segments.clear();
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

store::entry& store::claim_locked(std::unique_lock<std::mutex>& lock, std::uint64_t id,
                                  const char* op) {
  for (;;) {
    entry& e = find_locked(id, op);
    if (e.busy || e.state == handle_state::submitting) {  // owned for a moment by another thread
      changed_.wait(lock);
      continue;
    }
    if (e.state != handle_state::in_flight && e.state != handle_state::offloaded)
      throw invalid_handle_error(std::string(op) + ": handle " + std::to_string(id) + " is " +
                                 to_string(e.state) + " in another call");
    return e;
  }
}

void store::ref_locked(event_t e) {
  if (e) ++event_refs_[e];
}

void store::unref_locked(event_t e) {
  if (!e) return;
  auto it = event_refs_.find(e);
  if (it == event_refs_.end()) return;
  if (--it->second == 0) {
    event_refs_.erase(it);
    events_->release(e);
  }
}

void store::release_block_locked(std::size_t t, std::size_t offset, event_t fence) {
  tier& tr = tiers_[t];
  tr.owner.erase(offset);
  if (!fence) {
    tr.blocks.release(offset);
    return;
  }
  const std::uint64_t token = next_token_++;
  ref_locked(fence);
  fences_.emplace(token, fence);
  tr.blocks.release(offset, token);
}

void store::retire_entry_locked(std::uint64_t id, entry& e, event_t fence) {
  if (e.offset != no_offset) release_block_locked(e.tier, e.offset, fence);
  unref_locked(e.done);
  unref_locked(e.touched);
  unref_locked(e.prefetched);
  --tiers_[e.tier].handles;
  entries_.erase(id);
  changed_.notify_all();
}

void store::enqueue_copy(void* dst, const void* src, std::size_t bytes, stream_t s) {
  auto* d = static_cast<std::byte*>(dst);
  const auto* p = static_cast<const std::byte*>(src);
  for (std::size_t done = 0; done < bytes; done += config_.chunk_bytes)
    backend_->copy_async(d + done, p + done, std::min(config_.chunk_bytes, bytes - done), s);
}

void store::reap() {
  std::vector<std::pair<std::uint64_t, event_t>> parked;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (fences_.empty()) return;
    parked.assign(fences_.begin(), fences_.end());
    for (auto& kv : parked) ref_locked(kv.second);  // keep them from being recycled meanwhile
  }
  std::vector<bool> completed(parked.size());
  for (std::size_t i = 0; i < parked.size(); ++i) completed[i] = backend_->query(parked[i].second);
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::size_t i = 0; i < parked.size(); ++i) {
    if (completed[i] && fences_.erase(parked[i].first)) {  // another reaper may have been first
      for (auto& t : tiers_) t.blocks.clear_fence(parked[i].first);
      unref_locked(parked[i].second);
    }
    unref_locked(parked[i].second);
  }
}

std::uint64_t store::offload(const void* src, std::size_t nbytes, stream_t user, bool fence_user,
                             double priority, std::uint64_t base, std::size_t* copy_tier) {
  std::size_t ignored = 0;
  if (!copy_tier) copy_tier = &ignored;
  require_open();
  AQUA_EXPECTS(nbytes == 0 || src != nullptr, invalid_argument_error, "offload: null source pointer");
  std::uint64_t id = 0;
  std::size_t alloc = nbytes;
  entry based{};
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (base != 0) {  // Note [Incremental offload] in store_tiers.cpp
      entry& b = claim_locked(lock, base, "offload(base=)");
      AQUA_EXPECTS(b.nbytes <= nbytes, invalid_argument_error,
                   "offload(base=): the base handle holds " + format_bytes(b.nbytes) +
                       ", more than the " + format_bytes(nbytes) + " offloaded now");
      b.busy = true;  // ours until this call ends
      based = b;
    }
    id = next_id_++;
    entries_.emplace(id, entry{handle_state::submitting, 0, no_offset, nullptr, nbytes, 0, 0,
                               priority, clock_, clock_});
    ++clock_;
  }
  if (base != 0) {
    *copy_tier = offload_incremental(id, base, based, src, nbytes, user, fence_user);
    return id;
  }
  if (nbytes == 0) {  // nothing to copy: a handle with no block, already complete
    std::lock_guard<std::mutex> lock(mutex_);
    entry& e = entries_.at(id);
    e.state = handle_state::offloaded;
    ++tiers_[0].handles;
    ++counters_.offloads;
    changed_.notify_all();
    *copy_tier = 0;
    return id;
  }
  reap();
  *copy_tier = submit_offload(id, src, nbytes, alloc, user, fence_user);
  return id;
}

std::size_t store::submit_offload(std::uint64_t id, const void* src, std::size_t nbytes,
                                  std::size_t alloc, stream_t user, bool fence_user) {
  std::optional<placement> got;
  event_t ready_src = 0, done = 0;
  try {
    ready_src = events_->acquire();  // first: a failure here leaves nothing placed
    done = events_->acquire();
    try {
      got = place(alloc, 0, id);
    } catch (const out_of_memory_error&) {
      if (alloc == nbytes) throw;
      got = place(nbytes, 0, id);  // no room for headroom: the exact size then
    }
  } catch (...) {
    if (ready_src) events_->release(ready_src);
    if (done) events_->release(done);
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(id);
    changed_.notify_all();
    throw;
  }
  const placement& p = *got;
  tier& tr = tiers_[p.tier];  // streams are immutable; the pool is only touched under the lock
  bool recorded = false;
  try {
    device_guard guard(*backend_, config_.device);
    backend_->record(ready_src, user);
    backend_->stream_wait(tr.to_tier, ready_src);
    for (event_t f : p.fences) backend_->stream_wait(tr.to_tier, f);
    enqueue_copy(p.ptr, src, nbytes, tr.to_tier);
    backend_->record(done, tr.to_tier);
    recorded = true;
    if (fence_user) backend_->stream_wait(user, done);
  } catch (...) {
    // Part of the copy may be enqueued: fence the block behind an event recorded after it.
    if (!recorded) {
      try {
        backend_->record(done, tr.to_tier);
        recorded = true;
      } catch (...) {  // the stream is unusable; nothing more will run on it
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    for (event_t f : p.fences) unref_locked(f);
    release_block_locked(p.tier, p.offset, recorded ? done : 0);
    if (!recorded) events_->release(done);
    events_->release(ready_src);
    entries_.erase(id);
    changed_.notify_all();
    throw;
  }
  events_->release(ready_src);  // the wait on it is already captured
  std::lock_guard<std::mutex> lock(mutex_);
  for (event_t f : p.fences) unref_locked(f);
  entry& e = entries_.at(id);
  e.state = handle_state::in_flight;
  e.tier = p.tier;
  e.offset = p.offset;
  e.ptr = p.ptr;
  e.done = e.touched = done;
  ref_locked(done);
  ref_locked(done);  // once as done, once as touched
  ++tr.handles;
  ++counters_.offloads;
  counters_.bytes_offloaded += nbytes;
  changed_.notify_all();
  return p.tier;
}

void store::fetch(std::uint64_t id, void* dst, stream_t user, bool keep) {
  fetch_many({id}, {dst}, user, keep);
}

std::size_t store::prefetch(std::uint64_t id, void* dst, stream_t user) {
  require_open();
  std::size_t t = 0;
  std::byte* src = nullptr;
  std::size_t nbytes = 0;
  event_t done = 0;
  const event_t dst_ready = events_->acquire();  // before claiming: a failure changes nothing
  event_t landed = 0;
  try {
    landed = events_->acquire();
    std::unique_lock<std::mutex> lock(mutex_);
    entry& e = claim_locked(lock, id, "prefetch");
    if (e.prefetched || e.nbytes == 0) {  // already on its way, or nothing to move
      events_->release(dst_ready);
      events_->release(landed);
      return e.tier;
    }
    AQUA_EXPECTS(dst != nullptr, invalid_argument_error, "prefetch: null destination pointer");
    e.busy = true;
    t = e.tier;
    src = e.ptr;
    nbytes = e.nbytes;
    done = e.done;
  } catch (...) {
    events_->release(dst_ready);
    if (landed) events_->release(landed);
    throw;
  }
  const stream_t stream = tiers_[t].from_tier;
  try {
    device_guard guard(*backend_, config_.device);
    backend_->record(dst_ready, user);
    backend_->stream_wait(stream, dst_ready);
    backend_->stream_wait(stream, done);
    enqueue_copy(dst, src, nbytes, stream);
    backend_->record(landed, stream);
  } catch (...) {
    try {
      backend_->synchronize_stream(stream);
    } catch (...) {
    }
    events_->release(dst_ready);
    events_->release(landed);
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.at(id).busy = false;
    changed_.notify_all();
    throw;
  }
  events_->release(dst_ready);
  std::lock_guard<std::mutex> lock(mutex_);
  entry& e = entries_.at(id);
  e.prefetched = landed;  // the user stream waits on it at fetch
  ref_locked(landed);
  unref_locked(e.touched);  // a read: the block's latest touch (Note [Block release])
  e.touched = landed;
  ref_locked(landed);
  e.busy = false;
  e.last_use = clock_++;
  ++counters_.prefetches;
  counters_.bytes_fetched += nbytes;
  changed_.notify_all();
  return t;
}

void store::free(std::uint64_t id) {
  require_open();
  std::unique_lock<std::mutex> lock(mutex_);
  entry& e = claim_locked(lock, id, "free");
  retire_entry_locked(id, e, e.touched);
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
    ref_locked(ev);
  }
  const bool done = backend_->query(ev);
  std::lock_guard<std::mutex> lock(mutex_);
  unref_locked(ev);
  // The copy that offloaded it completed: the data is in a tier now, and a migration started
  // meanwhile does not change that (the old block stays valid until the move completed).
  auto it = entries_.find(id);
  if (done && it != entries_.end() && it->second.state == handle_state::in_flight)
    it->second.state = handle_state::offloaded;
  return done;
}

void store::wait(std::uint64_t id) {
  std::vector<event_t> evs;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {  // look the entry up again after every wait: it may be gone meanwhile
      entry& e = find_locked(id, "wait");
      if (e.busy) {
        changed_.wait(lock);
        continue;
      }
      // Wait for the copy that wrote it unless it is known complete (a fetch in another thread
      // does not make it so), and for a prefetch of it.
      for (event_t ev : {e.state != handle_state::offloaded ? e.done : 0, e.prefetched})
        if (ev) {
          ref_locked(ev);
          evs.push_back(ev);
        }
      break;
    }
  }
  for (event_t ev : evs) backend_->wait(ev);
  std::lock_guard<std::mutex> lock(mutex_);
  for (event_t ev : evs) unref_locked(ev);
  auto it = entries_.find(id);  // as in ready(): a migration meanwhile changes nothing
  if (it != entries_.end() && it->second.state == handle_state::in_flight)
    it->second.state = handle_state::offloaded;
}

handle_info store::info(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(id);
  if (it == entries_.end())
    throw invalid_handle_error("handle " + std::to_string(id) + " is not live");
  const entry& e = it->second;
  return {e.state, e.tier, e.nbytes, e.prefetched != 0};
}

bool store::contains(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.count(id) != 0;
}

void store::synchronize() {
  require_open();
  std::vector<std::uint64_t> before;  // only copies enqueued before the sync are known complete
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& kv : entries_)
      if (kv.second.state == handle_state::in_flight) before.push_back(kv.first);
  }
  for (auto& t : tiers_)
    for (stream_t s : {t.to_tier, t.from_tier, t.migrate}) backend_->synchronize_stream(s);
  reap();
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::uint64_t id : before) {
    auto it = entries_.find(id);
    if (it != entries_.end() && it->second.state == handle_state::in_flight)
      it->second.state = handle_state::offloaded;
  }
}

void store::close() noexcept {
  if (closed_.exchange(true)) return;
  for (auto& t : tiers_) {
    for (stream_t s : {t.to_tier, t.from_tier, t.migrate}) {
      try {
        if (s) backend_->synchronize_stream(s);
      } catch (...) {  // a dying runtime (cudaErrorCudartUnloading at exit): nothing to wait on
      }
    }
  }
}

store_stats store::stats() {
  reap();
  std::lock_guard<std::mutex> lock(mutex_);
  store_stats s = counters_;
  s.tiers.clear();
  for (const auto& t : tiers_) {
    std::size_t lent = 0;
    for (const auto& kv : t.segments) lent += kv.second.lent ? 1 : 0;
    s.tiers.push_back(tier_stats{t.kind, t.location, t.device, t.blocks.stats(), t.handles, lent});
  }
  s.live_handles = 0;  // handles being submitted are not live yet (nor counted in a tier)
  for (const auto& kv : entries_) s.live_handles += kv.second.state != handle_state::submitting;
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
