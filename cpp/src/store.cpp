// Note [Stream ordering]
// Every copy is fenced by events on both sides (copy_engine.hpp, Note [Submission]); nothing
// on the fast path waits on the host.
//
//  offload(src, user):   the to_tier lane waits for the work enqueued on `user` (which produced
//                        src) and for the new block's fences (Note [Ordered reuse], pool.hpp);
//                        copy src -> block; done := the copy's event.
//                        [fence_user] user waits done -- later writes to src cannot race it.
//                        Otherwise the caller orders itself with fence_source() before it
//                        writes src again (a deferred snapshot), or never writes it (release).
//  fetch(id, dst, user): the demand lane waits for `user` (which allocated dst) and for done
//                        (the offload or migration may still run); copy block -> dst; user
//                        waits for the copy -- later kernels see the bytes.
//  prefetch:             the same on the prefetch lane, but user does not wait; fetch later
//                        makes user wait for the prefetch's event.
//  migrate (store_migration.cpp): the migrate lane waits for every touch of the old block and
//                        for the new block's fences; copy; done := the move's event.
//  Releasing the *source* of an offload (release=True) is the caller's side: the Python layer
//  keeps the storage alive until `done` (record_stream on CUDA, a holder on emulation).
//
// Note [Block release]
// A block is touched by one write at a time (`done`: the offload, an append, or the migration
// that filled it) and by reads on two lanes (`read`: the latest prefetch and the latest
// fetch-with-keep; a lane runs in order, so its latest read comes after its earlier ones).
// Every later write waits for all touches (an append, a migration), and the block is released
// fenced by all of them (plus the consuming fetch's own copy): the next owner of those bytes
// orders its copy after them, and reap() drops fences whose event completed.
//
// Note [Locking]
// mutex_ guards the handle table, the tiers (pools, segments, eviction order, fences) and the
// counters. No backend call (CUDA runtime or emulation worker) is ever made while holding it:
// an operation takes what it needs, marks the entries as owned (state submitting or fetching,
// or busy for a migration, prefetch or incremental offload), drops the lock, submits through
// the copy engine, and re-takes the lock to publish. Others wait on `changed_` for an owned
// entry, or refuse it (a second fetch). Event references are RAII (event_pool.hpp); the event
// pool's own lock is a leaf.
//
// Note [Close]
// close() refuses new calls first (closed_, checked with the call count under mutex_), waits
// until every call in progress has returned, drains every lane, and only then frees every pool
// segment (device, peer, pinned host), stream and event. So when close() returns, the memory
// is back with the driver (a lender may reuse it), and no copy can touch it any more. Handles
// still referenced from Python stay objects; every call on them is refused as closed.
//
// Note [Fork]
// A child forked from a process with a store has a copy of its memory but none of its threads
// (emulated streams) and no usable CUDA context. Every call there is refused with a typed
// error, and close()/the destructor only mark the copy closed: joining workers that do not
// exist would hang, and freeing the parent's memory in the child frees nothing real. The
// child can make stores of its own.
#include "aqua/store.hpp"

#include <unistd.h>

#include <algorithm>
#include <string>
#include <utility>

#include "aqua/error.hpp"

namespace aqua {

namespace {
constexpr std::size_t prealloc_events = 64;
}  // namespace

/// `what` with the device, the bytes asked and the device's free memory, for setup failures.
std::byte* allocate_named(backend& b, int device, std::size_t bytes, const std::string& what) {
  auto detail = [&](const char* cause) {
    std::string msg = what + ": cannot allocate " + format_bytes(bytes) + " on " +
                      (device < 0 ? std::string("pinned host memory") : b.device_label(device));
    if (device >= 0) {
      try {
        const auto [free, total] = b.memory_info(device);
        msg += " (" + format_bytes(free) + " free of " + format_bytes(total) + ")";
      } catch (...) {
      }
    }
    return msg + ": " + cause;
  };
  try {
    return static_cast<std::byte*>(device < 0 ? b.allocate_pinned_host(bytes)
                                              : b.allocate_device(device, bytes));
  } catch (const out_of_memory_error& x) {
    throw out_of_memory_error(detail(x.what()), bytes);
  } catch (const backend_error& x) {
    throw backend_error(detail(x.what()), x.error_name());
  }
}

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
    : backend_(std::move(b)),
      config_(std::move(cfg)),
      policy_(make_eviction_policy(config_.policy)),
      tiers_(*policy_),
      owner_pid_(static_cast<long>(::getpid())) {
  AQUA_EXPECTS(backend_ != nullptr, invalid_argument_error, "store: no backend");
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
  try {
    device_guard guard(*backend_, config_.device);
    for (const auto& p : config_.peers) {
      if (p.device != config_.device) backend_->enable_peer_access(config_.device, p.device);
      const std::size_t t = tiers_.add_tier("peer", backend_->device_label(p.device), p.device);
      if (p.bytes > 0)
        tiers_.add_segment(t, allocate_named(*backend_, p.device, p.bytes, "peer tier"), p.bytes,
                           false);
    }
    if (config_.host_bytes > 0) {
      const std::size_t t = tiers_.add_tier("host", "cpu", -1);
      tiers_.add_segment(t, allocate_named(*backend_, -1, config_.host_bytes, "host tier"),
                         config_.host_bytes, false);
    }
    tier_count_ = tiers_.size();
    for (std::size_t t = 0; t < tier_count_; ++t) {
      kinds_.push_back(tiers_.kind(t));
      locations_.push_back(tiers_.location(t));
    }
    events_ = std::make_unique<event_pool>(backend_, config_.device, prealloc_events);
    engine_ = std::make_unique<copy_engine>(backend_, config_.device, tier_count_,
                                            config_.chunk_bytes, *events_);
  } catch (...) {
    release_resources();
    throw;
  }
}

store::~store() {
  close();
  if (static_cast<long>(::getpid()) != owner_pid_) {  // Note [Fork]: leak the parent's copies:
    (void)engine_.release();  // joining its stream workers would hang or crash, and dropping
    (void)events_.release();  // an event reference takes the pool's lock, which a parent
    (void)policy_.release();  // thread may have held at the fork
    new std::unordered_map<std::uint64_t, entry>(std::move(entries_));
    new tier_set(std::move(tiers_));
  }
}

void store::release_resources() noexcept {
  // Only once no call is in progress (close(), or a failed constructor). The engine goes
  // first: it drains its lanes, whose queued work may name events and blocks.
  if (engine_) {
    const copy_engine_stats c = engine_->stats();
    std::lock_guard<std::mutex> lock(mutex_);
    counters_.batched_submissions = c.batched_submissions;
    counters_.batch_fallbacks = c.batch_fallbacks;
    counters_.batch_kernels = c.batch_kernels;
  }
  engine_.reset();
  std::vector<segment_memory> memory;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();  // drops their event references before the pool goes
    memory = tiers_.take_all();
    if (events_) counters_.events_created = events_->created();
  }
  try {
    device_guard guard(*backend_, config_.device);
    events_.reset();
    for (const auto& m : memory) {
      if (m.device < 0)
        backend_->free_pinned_host(m.ptr, m.bytes);
      else
        backend_->free_device(m.device, m.ptr);
    }
  } catch (...) {  // the runtime is unloading (exit): the driver reclaims everything anyway
  }
}

void store::begin_call() {
  if (static_cast<long>(::getpid()) != owner_pid_)
    AQUA_FAIL(error, "this offload manager belongs to process " + std::to_string(owner_pid_) +
                         "; a forked child cannot use it (make a new one in the child)");
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_.load()) throw error("the offload manager is closed");
  ++active_calls_;
}

void store::end_call() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  if (--active_calls_ == 0) changed_.notify_all();
}

void store::close() noexcept {
  if (static_cast<long>(::getpid()) != owner_pid_) {  // Note [Fork]: the parent's, not ours
    closed_.store(true);
    return;
  }
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (closed_.exchange(true)) {
      changed_.wait(lock, [&] { return released_; });  // a concurrent close finishes first
      return;
    }
    changed_.wait(lock, [&] { return active_calls_ == 0; });
  }
  release_resources();
  std::lock_guard<std::mutex> lock(mutex_);
  released_ = true;
  changed_.notify_all();
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
  claim_all_locked(lock, {id}, op);
  return entries_.at(id);
}

void store::claim_all_locked(std::unique_lock<std::mutex>& lock,
                             const std::vector<std::uint64_t>& ids, const char* op) {
  for (;;) {  // all or none: a wait for one owned entry re-checks them all afterwards
    bool owned = false;
    for (std::uint64_t id : ids) {
      const entry& e = find_locked(id, op);
      owned = owned || e.busy || e.state == handle_state::submitting;
    }
    if (owned) {
      changed_.wait(lock);
      continue;
    }
    for (std::uint64_t id : ids) {
      const entry& e = entries_.at(id);
      if (e.state != handle_state::in_flight && e.state != handle_state::offloaded)
        throw invalid_handle_error(std::string(op) + ": handle " + std::to_string(id) + " is " +
                                   to_string(e.state) + " in another call");
    }
    return;
  }
}

victim_info store::victim_of(std::uint64_t id, const entry& e) const {
  return victim_info{id, e.nbytes, e.priority, e.inserted, e.last_use};
}

void store::list_locked(std::uint64_t id, entry& e) {
  const bool candidate = (e.state == handle_state::in_flight || e.state == handle_state::offloaded) &&
                         e.offset != no_offset && !e.busy && !e.prefetched;
  if (candidate && !e.listed) tiers_.list(e.tier, victim_of(id, e));
  e.listed = e.listed || candidate;
}

void store::unlist_locked(std::uint64_t id, entry& e) {
  if (e.listed) tiers_.unlist(e.tier, victim_of(id, e));
  e.listed = false;
}

std::vector<event_ref> store::touches(const entry& e) const {
  return {e.done, e.read[prefetch_read], e.read[demand_read]};
}

void store::retire_locked(std::uint64_t id, entry& e, std::vector<event_ref> fences) {
  unlist_locked(id, e);
  if (e.offset != no_offset) tiers_.release(e.tier, e.offset, fences);
  tiers_.count_handle(e.tier, -1);
  entries_.erase(id);
  changed_.notify_all();
}

void store::reap() {
  std::vector<std::pair<std::uint64_t, event_ref>> parked;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    parked = tiers_.fences();  // one per copy in flight (Note [Fence tokens])
  }
  if (parked.empty()) return;
  std::vector<char> completed(parked.size());
  {
    device_guard guard(*backend_, config_.device);
    for (std::size_t i = 0; i < parked.size(); ++i)
      completed[i] = backend_->query(parked[i].second.get());
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::size_t i = 0; i < parked.size(); ++i)
    if (completed[i]) tiers_.clear_fence(parked[i].first);
}

offload_result store::offload(const offload_item& item, stream_t user, bool fence_user) {
  return offload_many({item}, user, fence_user).front();
}

void store::fetch(std::uint64_t id, void* dst, stream_t user, bool keep) {
  fetch_many({id}, {dst}, user, keep);
}

std::size_t store::prefetch(std::uint64_t id, void* dst, stream_t user) {
  return prefetch_many({id}, {dst}, user).front();
}

void store::fence_source(std::uint64_t id, stream_t user) {
  call_scope call(*this);
  event_ref source;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    source = find_locked(id, "fence_source").source;
  }
  submission sub;
  sub.user = user;
  sub.after_user = false;
  sub.fence_user = true;
  sub.user_waits.push_back(std::move(source));
  engine_->submit(sub);
}

void store::free(std::uint64_t id) {
  call_scope call(*this);
  std::unique_lock<std::mutex> lock(mutex_);
  entry& e = claim_locked(lock, id, "free");
  retire_locked(id, e, touches(e));
  ++counters_.frees;
}

bool store::ready(std::uint64_t id) {
  call_scope call(*this);
  event_ref ev;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    entry& e = find_locked(id, "ready");
    if (e.state == handle_state::offloaded) return true;
    if (e.state != handle_state::in_flight) return false;
    ev = e.done;
  }
  bool done = false;
  {
    device_guard guard(*backend_, config_.device);
    done = backend_->query(ev.get());
  }
  std::lock_guard<std::mutex> lock(mutex_);
  // The copy that offloaded it completed: the data is in a tier now, and a migration started
  // meanwhile does not change that (the old block stays valid until the move completed).
  auto it = entries_.find(id);
  if (done && it != entries_.end() && it->second.state == handle_state::in_flight)
    it->second.state = handle_state::offloaded;
  return done;
}

void store::wait(std::uint64_t id) {
  call_scope call(*this);
  std::vector<event_ref> evs;
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
      if (e.state != handle_state::offloaded && e.done) evs.push_back(e.done);
      if (e.prefetched) evs.push_back(e.prefetched);
      break;
    }
  }
  {
    device_guard guard(*backend_, config_.device);
    for (const event_ref& ev : evs) backend_->wait(ev.get());
  }
  std::lock_guard<std::mutex> lock(mutex_);
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
  return {e.state, e.tier, e.nbytes, static_cast<bool>(e.prefetched)};
}

bool store::contains(std::uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.count(id) != 0;
}

std::vector<std::uint64_t> store::live_ids() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::uint64_t> ids;
  ids.reserve(entries_.size());
  for (const auto& kv : entries_) ids.push_back(kv.first);
  return ids;
}

void store::synchronize() {
  call_scope call(*this);
  std::vector<std::uint64_t> before;  // only copies enqueued before the sync are known complete
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& kv : entries_)
      if (kv.second.state == handle_state::in_flight) before.push_back(kv.first);
  }
  engine_->synchronize();
  reap();
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::uint64_t id : before) {
    auto it = entries_.find(id);
    if (it != entries_.end() && it->second.state == handle_state::in_flight)
      it->second.state = handle_state::offloaded;
  }
}

store_stats store::stats() {
  bool open = true;
  try {
    begin_call();
  } catch (const error&) {
    open = false;  // closed: the counters stand, the tiers are empty
  }
  if (open) {
    try {
      reap();
    } catch (...) {
      end_call();
      throw;
    }
  }
  store_stats s;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    s = counters_;
    s.tiers.clear();
    for (std::size_t t = 0; t < tiers_.size(); ++t) s.tiers.push_back(tiers_.stats(t));
    s.live_handles = 0;  // handles being submitted are not live yet (nor counted in a tier)
    for (const auto& kv : entries_) s.live_handles += kv.second.state != handle_state::submitting;
    if (open) {
      s.events_created = events_->created();
      const copy_engine_stats c = engine_->stats();
      s.batched_submissions = c.batched_submissions;
      s.batch_fallbacks = c.batch_fallbacks;
      s.batch_kernels = c.batch_kernels;
    }
  }
  if (open) end_call();
  return s;
}

stream_t store::copy_stream(std::size_t t, aqua::lane l) {
  call_scope call(*this);
  AQUA_EXPECTS(t < tier_count_, invalid_argument_error, "copy_stream: no tier " + std::to_string(t));
  return engine_->stream(t, l);
}

void store::raw_copy_many(const std::vector<copy_op>& ops, stream_t stream, bool wait) {
  call_scope call(*this);
  engine_->copy_on(stream, ops, wait);
}

void store::synchronize_stream(stream_t stream) {
  call_scope call(*this);
  device_guard guard(*backend_, config_.device);
  backend_->synchronize_stream(stream);
}

}  // namespace aqua
