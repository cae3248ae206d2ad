// Migration down the cascade, and elastic lending (lend, reclaim).
//
// Note [Migration]
// A migration never blocks the host and never makes a handle unavailable. The entry is marked
// busy while the copy is submitted; the migrate lane of the source tier waits for every touch
// of the old block (Note [Block release] in store.cpp) and for the new block's fences, copies,
// and records m. The entry then points at the new block with done = m (its reads belong to the
// old block), so any later fetch reads the new block after m, and the old block is released
// with fence m. If the submission fails the entry is untouched: still valid on its old tier
// (Note [Abort rule]). A pending prefetch keeps its own event: its buffer was filled from the
// old block, and the move waited for it.
//
// Note [Lending]
// A peer tier is a pool over segments: the initial budget and one per lend(). reclaim() drains
// whole segments, newest first (no new block lands there), migrates every handle living in them
// down the cascade (waiting for entries owned by another call to settle: an event on changed_,
// no polling), waits for the migrations' fences, and only then frees the memory. When the tiers
// below lack the free bytes, it raises OutOfMemoryError before moving anything. If a move still
// fails midway (fragmentation below, or a copy that cannot be submitted: BackendError), the
// segments return to service and the memory stays lent; handles moved so far stay where they
// went, intact. No data is lost either way. Whole segments, because cudaFree cannot return
// part of an allocation: reclaim(n) may hand back more than n, and says how much.
#include <algorithm>
#include <chrono>
#include <limits>
#include <string>

#include "aqua/error.hpp"
#include "aqua/store.hpp"

namespace aqua {

store::move store::migrate_locked(std::unique_lock<std::mutex>& lock, std::uint64_t id,
                                  std::size_t below, std::string* why) {
  entry& e = entries_.at(id);  // stays valid: a busy entry is never erased
  std::optional<placement> dest;
  for (std::size_t t = below; t < tiers_.size() && !dest; ++t)
    dest = tiers_.try_allocate(t, e.nbytes, id);
  if (!dest) return move::no_room;
  unlist_locked(id, e);
  e.busy = true;
  const std::size_t from = e.tier, old_offset = e.offset, nbytes = e.nbytes;
  submission sub;
  sub.after_user = false;  // no user stream: only the block's own history matters
  sub.groups.push_back(copy_group{from, lane::migrate, touches(e), {{dest->ptr, e.ptr, nbytes}}});
  auto& after = sub.groups.back().after;
  after.insert(after.end(), dest->fences.begin(), dest->fences.end());
  lock.unlock();

  std::vector<event_ref> moved;
  try {
    moved = engine_->submit(sub);
  } catch (const std::exception& x) {
    if (why) *why = x.what();
  } catch (...) {
    if (why) *why = "unknown error";
  }

  lock.lock();
  const bool ok = !moved.empty();
  if (ok) {
    tiers_.release(from, old_offset, {moved[0]});
    e.done = moved[0];
    e.read[0].reset();
    e.read[1].reset();
    e.tier = dest->tier;
    e.offset = dest->offset;
    e.ptr = dest->ptr;
    tiers_.count_handle(from, -1);
    tiers_.count_handle(dest->tier, +1);
    ++counters_.migrations;
    counters_.bytes_migrated += nbytes;
  } else {
    tiers_.release(dest->tier, dest->offset, {});  // nothing of the move runs any more
    ++counters_.migration_failures;
  }
  e.busy = false;
  list_locked(id, e);
  changed_.notify_all();
  return ok ? move::moved : move::failed;
}

std::size_t store::peer_tier(int device, const char* op) const {
  if (auto t = tiers_.peer_tier(device)) return *t;  // tier kinds never change: no lock needed
  throw invalid_argument_error(std::string(op) + ": " + backend_->device_label(device) +
                               " is not a peer tier of this manager (list it in peers=)");
}

std::size_t store::lend(int device, std::size_t nbytes) {
  call_scope call(*this);
  const std::size_t t = peer_tier(device, "lend");
  AQUA_EXPECTS(nbytes >= block_alignment, invalid_argument_error,
               "lend: " + format_bytes(nbytes) + " is less than one 256-byte block");
  std::byte* mem = nullptr;
  {
    device_guard guard(*backend_, config_.device);
    mem = allocate_named(*backend_, device, nbytes, "lend");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  tiers_.add_segment(t, mem, nbytes, true);
  ++counters_.lends;
  counters_.bytes_lent += nbytes / block_alignment * block_alignment;  // what the pool gained
  return tiers_.capacity(t);
}

std::size_t store::reclaim(int device, std::optional<std::size_t> nbytes) {
  call_scope call(*this);
  const auto start = std::chrono::steady_clock::now();
  const std::size_t t = peer_tier(device, "reclaim");
  const std::string& where = locations_[t];
  std::unique_lock<std::mutex> lock(mutex_);
  if (tiers_.reclaiming(t))
    throw invalid_argument_error("reclaim: a reclaim of " + where + " is already in progress");
  const std::size_t capacity = tiers_.capacity(t);
  const std::size_t want = nbytes.value_or(capacity);
  if (want > capacity)
    throw invalid_argument_error("reclaim: cannot take back " + format_bytes(want) + " from " +
                                 where + ": only " + format_bytes(capacity) + " is lent");
  if (want == 0) return 0;
  const std::vector<std::size_t> chosen = tiers_.newest_segments(t, want);
  tiers_.reclaiming(t) = true;
  tiers_.drain(t, chosen);
  const std::uint64_t migrated_before = counters_.bytes_migrated;
  // Until the segments are removed, any way out (an error, a throwing wait) puts them back in
  // service; it runs with the lock held, as every exit below has it.
  bool removed = false;
  auto undo = [&] {
    if (removed) return;
    removed = true;
    tiers_.undrain(t, chosen);
    tiers_.reclaiming(t) = false;
    changed_.notify_all();
  };
  struct undo_guard {
    decltype(undo)& fn;
    std::unique_lock<std::mutex>& lock;
    ~undo_guard() {
      if (!lock.owns_lock()) lock.lock();
      fn();
    }
  } guard{undo, lock};
  // Fail fast, before moving anything, when the tiers below cannot hold what lives here.
  std::size_t live = 0, room = 0;
  for (std::size_t base : chosen)
    for (const auto& blk : tiers_.blocks_in(t, base)) live += blk.second;
  for (std::size_t below = t + 1; below < tiers_.size(); ++below) room += tiers_.free_bytes(below);
  if (live > room) {
    undo();
    throw out_of_memory_error("reclaim of " + where + ": " + format_bytes(live) +
                                  " of live handles, but the tiers below have " +
                                  format_bytes(room) + " free; nothing was reclaimed",
                              live);
  }
  // Move every handle out of the chosen segments.
  for (std::size_t base : chosen) {
    for (;;) {
      const auto first = tiers_.first_block_in(t, base);
      if (!first) break;
      const std::uint64_t id = tiers_.owner(t, *first);
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
        throw backend_error("reclaim of " + where + ": a migration failed (" + why +
                                "); nothing was reclaimed",
                            "migrationFailed");
      throw out_of_memory_error("reclaim of " + where + ": no lower tier has a free block "
                                    "for a " + format_bytes(need) +
                                    " handle (fragmentation); nothing was reclaimed",
                                need);
    }
  }
  // Wait (host side: the lender asked for its memory back) until no copy touches the segments.
  while (tiers_.fenced(t, chosen)) {
    const auto pending = tiers_.fences();
    lock.unlock();
    {
      device_guard guard(*backend_, config_.device);
      for (const auto& f : pending) backend_->wait(f.second.get());
    }
    reap();
    lock.lock();
  }
  const std::vector<segment_memory> memory = tiers_.remove(t, chosen);
  tiers_.reclaiming(t) = false;
  removed = true;
  const std::uint64_t moved = counters_.bytes_migrated - migrated_before;
  lock.unlock();
  std::size_t freed = 0;
  {
    device_guard guard(*backend_, config_.device);
    for (const auto& m : memory) {
      backend_->free_device(device, m.ptr);
      freed += m.bytes / block_alignment * block_alignment;
    }
  }
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

}  // namespace aqua
