// Placement, the cascade, migration, lending and incremental offload.
//
// Note [Cascade]
// Tiers are ordered fastest first (peers in the order given, pinned host last). An offload goes
// to the first tier with room; when a tier is full, the eviction policy picks victims there and
// each moves down to the first lower tier with room (migrate_locked), until the new block fits
// or no victim can move; only then is the next tier tried. A full bottom tier is an
// OutOfMemoryError and nothing was changed (victims already moved stay moved: no data lost).
//
// Note [Migration]
// A migration never blocks the host and never makes a handle unavailable. The entry is marked
// busy while the copy is submitted; the migrate stream of the source tier waits for `touched`
// (every copy that wrote or read the old block, Note [Block release] in store.cpp) and for the
// new block's fences, copies, and records m. The entry then points at the new block with
// done = touched = m, so any later fetch reads the new block after m, and the old block is
// released with fence m. If the submission fails the entry is untouched: still valid on its old
// tier. A pending prefetch keeps its own event: its buffer was filled from the old block.
//
// Note [Lending]
// A peer tier is a pool over segments: the initial budget and one per lend(). reclaim() drains
// whole segments, newest first (no new block lands there), migrates every handle living in them
// down the cascade (waiting for entries owned by another call to settle: an event on changed_,
// no polling), waits for the migrations' fences, and only then frees the memory. When the tiers
// below lack the free bytes, it raises OutOfMemoryError before moving anything. If a move still
// fails midway (fragmentation below, or a copy that cannot be submitted: BackendError), the
// segments return to service and the memory stays lent; handles moved so far stay where they
// went, intact. No data is lost either way.
//
// Note [Incremental offload]
// offload(src, base=h) says: h's bytes are a prefix of src (an append-only cache that grew).
// When h's block has room, the new handle takes the block over and only the suffix is copied
// (after h's own copy, on the same stream order); otherwise a fresh block with 2x headroom gets a
// full copy, so growth is amortised. h is consumed either way.
#include <algorithm>
#include <chrono>
#include <string>

#include "aqua/error.hpp"
#include "aqua/store.hpp"

namespace aqua {

namespace {
constexpr std::size_t no_offset = static_cast<std::size_t>(-1);
}

bool store::record_after_failure(event_t e, stream_t s) noexcept {
  try {
    backend_->record(e, s);  // fence whatever part of a failed submission was enqueued
    return true;
  } catch (...) {
    return false;
  }
}

std::optional<store::placement> store::try_allocate_locked(std::size_t t, std::size_t nbytes,
                                                           std::uint64_t owner) {
  tier& tr = tiers_[t];
  std::vector<std::uint64_t> tokens;
  auto offset = tr.blocks.allocate(nbytes, &tokens);
  if (!offset) return std::nullopt;
  auto seg = std::prev(tr.segments.upper_bound(*offset));
  placement p{t, *offset, seg->second.ptr + (*offset - seg->first), {}};
  for (std::uint64_t token : tokens) {
    auto f = fences_.find(token);
    if (f == fences_.end()) continue;  // completed meanwhile
    ref_locked(f->second);             // the caller waits on it, then unrefs
    p.fences.push_back(f->second);
  }
  tr.owner[*offset] = owner;
  return p;
}

store::placement store::place(std::size_t nbytes, std::size_t first_tier, std::uint64_t owner) {
  std::unique_lock<std::mutex> lock(mutex_);
  for (std::size_t t = first_tier; t < tiers_.size(); ++t) {
    if (tiers_[t].blocks.capacity() < nbytes) continue;
    for (;;) {
      if (auto p = try_allocate_locked(t, nbytes, owner)) return *p;
      if (t + 1 == tiers_.size() || !evict_one_locked(lock, t)) break;
    }
  }
  throw out_of_memory_error(oom_message_locked(nbytes), nbytes);
}

bool store::evict_one_locked(std::unique_lock<std::mutex>& lock, std::size_t t) {
  std::uint64_t victim = 0;
  victim_info best{};
  for (const auto& [id, e] : entries_) {
    if (e.tier != t || e.offset == no_offset || e.busy || e.prefetched) continue;
    if (e.state != handle_state::in_flight && e.state != handle_state::offloaded) continue;
    const victim_info v{id, e.nbytes, e.priority, e.inserted, e.last_use};
    if (victim == 0 || evict_before(*policy_, v, best)) {
      victim = id;
      best = v;
    }
  }
  if (victim == 0) return false;
  const bool moved = migrate_locked(lock, victim, t + 1) == move::moved;
  if (moved) ++counters_.evictions;
  return moved;
}

store::move store::migrate_locked(std::unique_lock<std::mutex>& lock, std::uint64_t id,
                                  std::size_t below, std::string* why) {
  entry& e = entries_.at(id);  // stays valid: a busy entry is never erased
  std::optional<placement> dest;
  for (std::size_t t = below; t < tiers_.size() && !dest; ++t)
    dest = try_allocate_locked(t, e.nbytes, id);
  if (!dest) return move::no_room;
  e.busy = true;
  const std::size_t from = e.tier, old_offset = e.offset, nbytes = e.nbytes;
  std::byte* src = e.ptr;
  const event_t after = e.touched;  // held by the entry, which stays while busy
  const stream_t stream = tiers_[from].migrate;
  lock.unlock();

  event_t moved = 0;
  bool ok = false, recorded = false;
  try {
    moved = events_->acquire();
    device_guard guard(*backend_, config_.device);
    backend_->stream_wait(stream, after);
    for (event_t f : dest->fences) backend_->stream_wait(stream, f);
    enqueue_copy(dest->ptr, src, nbytes, stream);
    backend_->record(moved, stream);
    recorded = ok = true;
  } catch (const std::exception& x) {
    if (why) *why = x.what();
    recorded = moved && record_after_failure(moved, stream);
  } catch (...) {
    if (why) *why = "unknown error";
    recorded = moved && record_after_failure(moved, stream);
  }

  lock.lock();
  for (event_t f : dest->fences) unref_locked(f);
  if (ok) {
    release_block_locked(from, old_offset, moved);
    unref_locked(e.done);
    unref_locked(e.touched);
    ref_locked(moved);
    ref_locked(moved);
    e.done = e.touched = moved;
    e.tier = dest->tier;
    e.offset = dest->offset;
    e.ptr = dest->ptr;
    --tiers_[from].handles;
    ++tiers_[dest->tier].handles;
    ++counters_.migrations;
    counters_.bytes_migrated += nbytes;
  } else {
    release_block_locked(dest->tier, dest->offset, recorded ? moved : 0);
    if (!recorded && moved) events_->release(moved);
    ++counters_.migration_failures;
  }
  e.busy = false;
  changed_.notify_all();
  return ok ? move::moved : move::failed;
}

std::string store::oom_message_locked(std::size_t nbytes) const {
  std::string msg = "cannot offload " + format_bytes(nbytes) + ": no tier has a free block that large";
  if (tiers_.size() > 1) msg += " and eviction could not make room";
  msg += " (";
  for (std::size_t t = 0; t < tiers_.size(); ++t) {
    const auto s = tiers_[t].blocks.stats();
    if (t) msg += "; ";
    msg += tiers_[t].kind + " " + tiers_[t].location + ": " + format_bytes(s.free) + " free of " +
           format_bytes(s.capacity) + ", largest free block " + format_bytes(s.largest_free);
  }
  return msg + ")";
}

std::size_t store::peer_tier(int device, const char* op) const {
  for (std::size_t t = 0; t < tiers_.size(); ++t)
    if (tiers_[t].kind == "peer" && tiers_[t].device == device) return t;
  throw invalid_argument_error(std::string(op) + ": " + backend_->device_label(device) +
                               " is not a peer tier of this manager (list it in peers=)");
}

std::size_t store::lend(int device, std::size_t nbytes) {
  require_open();
  const std::size_t t = peer_tier(device, "lend");
  AQUA_EXPECTS(nbytes >= block_alignment, invalid_argument_error,
               "lend: " + format_bytes(nbytes) + " is less than one 256-byte block");
  std::byte* mem = nullptr;
  {
    device_guard guard(*backend_, config_.device);
    mem = static_cast<std::byte*>(backend_->allocate_device(device, nbytes));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const std::size_t base = tiers_[t].blocks.add_segment(nbytes);
  tiers_[t].segments.emplace(base, segment_memory{mem, nbytes, true});
  ++counters_.lends;
  counters_.bytes_lent += nbytes / block_alignment * block_alignment;  // what the pool gained
  return tiers_[t].blocks.capacity();
}

std::size_t store::reclaim(int device, std::optional<std::size_t> nbytes) {
  require_open();
  const auto start = std::chrono::steady_clock::now();
  const std::size_t t = peer_tier(device, "reclaim");
  tier& tr = tiers_[t];
  std::vector<std::size_t> chosen;
  std::unique_lock<std::mutex> lock(mutex_);
  if (tr.reclaiming)
    throw invalid_argument_error("reclaim: a reclaim of " + tr.location + " is already in progress");
  const std::size_t capacity = tr.blocks.capacity();
  const std::size_t want = nbytes.value_or(capacity);
  if (want > capacity)
    throw invalid_argument_error("reclaim: cannot take back " + format_bytes(want) + " from " +
                                 tr.location + ": only " + format_bytes(capacity) + " is lent");
  if (want == 0) return 0;
  std::size_t covered = 0;
  for (auto it = tr.segments.rbegin(); it != tr.segments.rend() && covered < want; ++it) {
    chosen.push_back(it->first);
    covered += it->second.bytes / block_alignment * block_alignment;
  }
  tr.reclaiming = true;
  for (std::size_t base : chosen) tr.blocks.drain_segment(base);
  const std::uint64_t migrated_before = counters_.bytes_migrated;

  auto undo = [&] {
    for (std::size_t base : chosen) tr.blocks.undrain_segment(base);
    tr.reclaiming = false;
    changed_.notify_all();
  };
  // Fail fast, before moving anything, when the tiers below cannot hold what lives here.
  std::size_t live = 0, room = 0;
  for (std::size_t base : chosen)
    for (const auto& blk : tr.blocks.blocks_in(base)) live += blk.second;
  for (std::size_t below = t + 1; below < tiers_.size(); ++below)
    room += tiers_[below].blocks.stats().free;
  if (live > room) {
    undo();
    throw out_of_memory_error("reclaim of " + tr.location + ": " + format_bytes(live) +
                                  " of live handles, but the tiers below have " +
                                  format_bytes(room) + " free; nothing was reclaimed",
                              live);
  }
  // Move every handle out of the chosen segments.
  for (std::size_t base : chosen) {
    for (;;) {
      const auto blocks = tr.blocks.blocks_in(base);
      if (blocks.empty()) break;
      const std::uint64_t id = tr.owner.at(blocks.front().first);
      const entry& e = entries_.at(id);
      if (e.busy || e.state == handle_state::submitting || e.state == handle_state::fetching ||
          e.tier != t) {
        changed_.wait(lock);  // owned by another call for a moment
        continue;
      }
      std::string why;
      const move result = migrate_locked(lock, id, t + 1, &why);
      if (result == move::moved) continue;
      const std::size_t need = entries_.at(id).nbytes;
      undo();
      // Handles moved so far stay moved (intact, fetchable); the memory stays lent.
      if (result == move::failed)
        throw backend_error("reclaim of " + tr.location + ": a migration failed (" + why +
                                "); nothing was reclaimed",
                            "migrationFailed");
      throw out_of_memory_error("reclaim of " + tr.location + ": no lower tier has a free block "
                                    "for a " + format_bytes(need) +
                                    " handle (fragmentation); nothing was reclaimed",
                                need);
    }
  }
  // Wait (host side: the lender asked for its memory back) until no copy touches the segments.
  for (;;) {
    bool fenced = false;
    for (std::size_t base : chosen) fenced = fenced || tr.blocks.fenced(base);
    if (!fenced) break;
    std::vector<event_t> pending;
    for (auto& kv : fences_) {
      ref_locked(kv.second);
      pending.push_back(kv.second);
    }
    lock.unlock();
    for (event_t ev : pending) backend_->wait(ev);
    reap();
    lock.lock();
    for (event_t ev : pending) unref_locked(ev);
  }
  std::vector<std::pair<std::byte*, std::size_t>> to_free;
  std::size_t freed = 0;
  for (std::size_t base : chosen) {
    freed += tr.blocks.remove_segment(base);
    auto seg = tr.segments.find(base);
    to_free.emplace_back(seg->second.ptr, seg->second.bytes);
    tr.segments.erase(seg);
  }
  tr.reclaiming = false;
  const std::uint64_t moved = counters_.bytes_migrated - migrated_before;
  lock.unlock();
  for (auto& [ptr, bytes] : to_free) backend_->free_device(device, ptr);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  lock.lock();
  ++counters_.reclaims;
  counters_.bytes_reclaimed += freed;
  counters_.reclaim_last_s = seconds;
  counters_.reclaim_max_s = std::max(counters_.reclaim_max_s, seconds);
  counters_.reclaim_total_s += seconds;
  counters_.reclaim_last_bytes_moved = moved;
  changed_.notify_all();
  return freed;
}

std::size_t store::offload_incremental(std::uint64_t id, std::uint64_t base, const entry& based,
                                         const void* src, std::size_t nbytes, stream_t user,
                                         bool fence_user) {
  std::size_t room = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (based.offset != no_offset && !based.prefetched)
      room = tiers_[based.tier].blocks.block_size(based.offset);
  }

  if (based.nbytes > 0 && room >= nbytes && src != nullptr) {
    // Grow in place: copy only the suffix into base's block, after base's own copy.
    const stream_t s = tiers_[based.tier].to_tier;
    event_t ready_src = 0, done = 0;
    const std::size_t suffix = nbytes - based.nbytes;
    try {
      ready_src = events_->acquire();
      done = events_->acquire();
      device_guard guard(*backend_, config_.device);
      backend_->record(ready_src, user);
      backend_->stream_wait(s, ready_src);
      backend_->stream_wait(s, based.touched);  // after every copy that wrote or read the block
      enqueue_copy(based.ptr + based.nbytes, static_cast<const std::byte*>(src) + based.nbytes,
                   suffix, s);
      backend_->record(done, s);
      if (fence_user) backend_->stream_wait(user, done);
    } catch (...) {
      try {
        backend_->synchronize_stream(s);  // no stray suffix write may outlive this call
      } catch (...) {
      }
      if (ready_src) events_->release(ready_src);
      if (done) events_->release(done);
      std::lock_guard<std::mutex> lock(mutex_);
      entries_.erase(id);
      entries_.at(base).busy = false;
      changed_.notify_all();
      throw;
    }
    events_->release(ready_src);
    std::lock_guard<std::mutex> lock(mutex_);
    entry& b = entries_.at(base);
    entry& e = entries_.at(id);
    e.state = handle_state::in_flight;
    e.tier = b.tier;
    e.offset = b.offset;
    e.ptr = b.ptr;
    e.done = e.touched = done;  // the append waited on base's touched: it is the latest touch
    ref_locked(done);
    ref_locked(done);
    tiers_[b.tier].owner[b.offset] = id;
    unref_locked(b.done);
    unref_locked(b.touched);
    entries_.erase(base);  // handle count unchanged: one handle replaced another
    ++counters_.offloads;
    ++counters_.incremental_offloads;
    counters_.bytes_offloaded += suffix;
    counters_.incremental_bytes_saved += based.nbytes;
    changed_.notify_all();
    return based.tier;
  }

  // No room (or nothing to extend): a full copy into a fresh block with headroom.
  std::size_t copy_tier = 0;
  try {
    if (nbytes == 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      entries_.at(id).state = handle_state::offloaded;
      ++tiers_[0].handles;
      ++counters_.offloads;
    } else {
      AQUA_EXPECTS(src != nullptr, invalid_argument_error, "offload: null source pointer");
      reap();
      copy_tier = submit_offload(id, src, nbytes, std::max(nbytes, 2 * room), user, fence_user);
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(id);
    entries_.at(base).busy = false;
    changed_.notify_all();
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  entry& b = entries_.at(base);
  b.busy = false;
  retire_entry_locked(base, b, b.touched);
  ++counters_.incremental_offloads;
  return copy_tier;
}

}  // namespace aqua
