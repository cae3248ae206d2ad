// Offload: placement down the cascade (Note [Cascade] in tier_set.hpp), batches, and
// incremental offload. Single offloads are batches of one.
//
// Note [Incremental offload]
// offload(src, base=h) says: h's bytes are a prefix of src (an append-only cache that grew).
// When h's block has room, the new handle takes the block over and only the suffix is copied,
// after every touch of the block (Note [Block release]); otherwise a fresh block with 2x
// headroom gets a full copy, so growth is amortised. h is consumed either way (it is owned,
// `busy`, from the start of the call, and given back untouched if the call fails). Either way
// the new copy is ordered after every touch of the base's block, so the new handle's `done`
// implies the base's copy completed: memory the caller keeps for the base's copy (a deferred
// snapshot's source) can be kept for the new handle instead. The core trusts the prefix
// contract; it does not compare bytes.
#include <algorithm>
#include <optional>
#include <string>
#include <unordered_set>

#include "aqua/error.hpp"
#include "aqua/store.hpp"

namespace aqua {

placement store::place(std::size_t nbytes, std::uint64_t owner) {
  std::unique_lock<std::mutex> lock(mutex_);
  for (std::size_t t = 0; t < tiers_.size(); ++t) {
    if (tiers_.capacity(t) < nbytes) continue;
    for (;;) {
      if (auto p = tiers_.try_allocate(t, nbytes, owner)) return std::move(*p);
      if (t + 1 == tiers_.size()) break;
      const auto victim = tiers_.victim(t);
      if (!victim || migrate_locked(lock, *victim, t + 1) != move::moved) break;
      ++counters_.evictions;
    }
  }
  throw out_of_memory_error(tiers_.oom_message(nbytes), nbytes);
}

std::vector<offload_result> store::offload_many(const std::vector<offload_item>& items,
                                                       stream_t user, bool fence_user) {
  call_scope call(*this);
  for (const auto& item : items)
    AQUA_EXPECTS(item.nbytes == 0 || item.src != nullptr, invalid_argument_error,
                 "offload: null source pointer");
  reap();
  const std::size_t n = items.size();
  struct plan {
    std::uint64_t id = 0;
    bool in_place = false;  // the suffix goes into the base's block
    std::size_t base_nbytes = 0;
    std::optional<placement> fresh;
  };
  std::vector<plan> plans(n);
  std::vector<std::uint64_t> bases;
  for (const auto& item : items)
    if (item.base) bases.push_back(item.base);
  {
    std::unique_lock<std::mutex> lock(mutex_);
    std::unordered_set<std::uint64_t> seen(bases.size() * 2);
    for (std::uint64_t b : bases)
      AQUA_EXPECTS(seen.insert(b).second, invalid_argument_error,
                   "offload(base=): handle " + std::to_string(b) + " is the base of two offloads");
    claim_all_locked(lock, bases, "offload(base=)");
    for (const auto& item : items) {
      if (!item.base) continue;
      const entry& b = entries_.at(item.base);
      AQUA_EXPECTS(b.nbytes <= item.nbytes, invalid_argument_error,
                   "offload(base=): the base handle holds " + format_bytes(b.nbytes) +
                       ", more than the " + format_bytes(item.nbytes) + " offloaded now");
    }
    for (std::size_t i = 0; i < n; ++i) {
      plans[i].id = next_id_++;
      entries_.emplace(plans[i].id, entry(items[i].nbytes, items[i].priority, clock_++));
      if (!items[i].base) continue;
      entry& b = entries_.at(items[i].base);
      unlist_locked(items[i].base, b);
      b.busy = true;  // ours until this call ends
      plans[i].base_nbytes = b.nbytes;
      plans[i].in_place = b.nbytes > 0 && b.offset != no_offset && !b.prefetched &&
                          tiers_.block_size(b.tier, b.offset) >= items[i].nbytes;
    }
  }
  auto rollback = [&] {  // nothing of ours runs any more (Note [Abort rule])
    std::lock_guard<std::mutex> lock(mutex_);
    for (std::size_t i = 0; i < n; ++i) {
      if (plans[i].fresh) tiers_.release(plans[i].fresh->tier, plans[i].fresh->offset, {});
      entries_.erase(plans[i].id);
      if (!items[i].base) continue;
      entry& b = entries_.at(items[i].base);
      b.busy = false;
      list_locked(items[i].base, b);
    }
    changed_.notify_all();
  };
  // Place every item first (evicting as needed); nothing is enqueued until all have a block.
  try {
    for (std::size_t i = 0; i < n; ++i) {
      if (plans[i].in_place || items[i].nbytes == 0) continue;
      std::size_t want = items[i].nbytes;
      if (items[i].base) {  // growth: headroom for the appends to come
        std::lock_guard<std::mutex> lock(mutex_);
        const entry& b = entries_.at(items[i].base);
        if (b.offset != no_offset) want = std::max(want, 2 * tiers_.block_size(b.tier, b.offset));
      }
      try {
        plans[i].fresh = place(want, plans[i].id);
      } catch (const out_of_memory_error&) {
        if (want == items[i].nbytes) throw;
        plans[i].fresh = place(items[i].nbytes, plans[i].id);  // no room for headroom
      }
    }
  } catch (...) {
    rollback();
    throw;
  }
  // One submission: per tier, the to_tier lane waits for the user's stream and the blocks'
  // fences (or, for an append, every touch of the base's block) and copies.
  submission sub;
  sub.user = user;
  sub.fence_user = fence_user;
  std::vector<std::size_t> group_of(tier_count_, submission::no_group), tier_of(n, 0);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (std::size_t i = 0; i < n; ++i) {
      copy_op op{nullptr, items[i].src, items[i].nbytes};
      std::vector<event_ref> after;
      if (plans[i].in_place) {
        const entry& b = entries_.at(items[i].base);
        tier_of[i] = b.tier;
        const std::size_t skip = plans[i].base_nbytes;
        op = copy_op{b.ptr + skip, static_cast<const std::byte*>(items[i].src) + skip,
                     items[i].nbytes - skip};
        after = touches(b);
      } else if (plans[i].fresh) {
        tier_of[i] = plans[i].fresh->tier;
        op.dst = plans[i].fresh->ptr;
        after = plans[i].fresh->fences;
        if (items[i].base) {  // the new handle's copy completes after the base's: whoever
          const auto base_touches = touches(entries_.at(items[i].base));  // keeps the base's
          after.insert(after.end(), base_touches.begin(), base_touches.end());  // source alive
        }                                                  // until then may wait on it
      } else {
        continue;  // nothing to copy
      }
      copy_group& group = sub.group_for(group_of, tier_of[i], lane::to_tier);
      group.after.insert(group.after.end(), after.begin(), after.end());
      group.ops.push_back(op);
    }
  }
  std::vector<event_ref> done;
  try {
    done = engine_->submit(sub);
  } catch (...) {
    rollback();
    throw;
  }
  std::vector<offload_result> out;
  out.reserve(n);
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::size_t i = 0; i < n; ++i) {
    entry& e = entries_.at(plans[i].id);
    const plan& p = plans[i];
    e.state = handle_state::in_flight;
    if (p.in_place) {  // the new handle takes the base's block over
      entry& b = entries_.at(items[i].base);
      e.tier = b.tier;
      e.offset = b.offset;
      e.ptr = b.ptr;
      tiers_.set_owner(b.tier, b.offset, p.id);
      entries_.erase(items[i].base);  // handle count unchanged: one handle replaced another
      counters_.bytes_offloaded += items[i].nbytes - p.base_nbytes;
      counters_.incremental_bytes_saved += p.base_nbytes;
    } else if (p.fresh) {
      e.tier = p.fresh->tier;
      e.offset = p.fresh->offset;
      e.ptr = p.fresh->ptr;
      tiers_.count_handle(e.tier, +1);
      counters_.bytes_offloaded += items[i].nbytes;
    } else {  // zero bytes: a handle with no block, complete at once
      e.state = handle_state::offloaded;
      tiers_.count_handle(0, +1);
    }
    if (e.state == handle_state::in_flight) e.done = e.source = done[group_of[tier_of[i]]];
    list_locked(p.id, e);
    ++counters_.offloads;
    if (items[i].base) {
      ++counters_.incremental_offloads;
      if (!p.in_place) {
        entry& b = entries_.at(items[i].base);
        b.busy = false;
        retire_locked(items[i].base, b, touches(b));
      }
    }
    out.push_back(offload_result{p.id, e.tier});
  }
  changed_.notify_all();
  return out;
}

}  // namespace aqua
