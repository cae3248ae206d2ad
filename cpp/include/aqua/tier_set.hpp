// The tiers: one pool per location (each peer GPU, pinned host), the memory of their segments,
// which handle owns each block, the eviction order, and the fences of released blocks.
//
// Note [Cascade]
// Tiers are ordered fastest first (peers in the order given, pinned host last). An offload goes
// to the first tier with room; when a tier is full, the eviction policy picks victims there and
// each moves down to the first lower tier with room, until the new block fits or no victim can
// move; only then is the next tier tried. A full bottom tier is an OutOfMemoryError and nothing
// was changed (victims already moved stay moved: no data lost).
//
// Note [Eviction order]
// Each tier keeps its *candidates* in a set ordered by eviction_policy (priority, the policy,
// age, id), so picking a victim is O(log n), not a scan of every handle. A handle is a
// candidate exactly while it could move: offloaded or in flight, with a block, not busy in a
// migration or prefetch, not prefetched, not being fetched. The store lists and unlists
// entries as those change (store.cpp: list_locked / unlist_locked).
//
// Note [Fence tokens]
// A released block carries fences (Note [Ordered reuse], pool.hpp): one token per distinct
// event, shared by every block released with it (a batch of 64k fetches makes one token, not
// 64k), so reaping costs one query per copy in flight, not per block.
//
// Not thread-safe: the store calls everything here under its lock, and nothing here calls the
// backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "aqua/event_pool.hpp"
#include "aqua/eviction_policy.hpp"
#include "aqua/pool.hpp"

namespace aqua {

/// A block chosen for a copy, with the events of the fences its copy must wait for.
struct placement {
  std::size_t tier;
  std::size_t offset;
  std::byte* ptr;
  std::vector<event_ref> fences;
};

/// Memory of one segment, to be freed by whoever holds it.
struct segment_memory {
  int device;  ///< -1 for pinned host
  std::byte* ptr;
  std::size_t bytes;
};

struct tier_stats {
  std::string kind;      ///< "peer" or "host"
  std::string location;  ///< "cuda:1", "emu:1", "cpu"
  int device;            ///< backend device index, -1 for host
  pool_stats pool;
  std::size_t handles = 0;
  std::size_t lent_segments = 0;
};

class tier_set {
 public:
  explicit tier_set(const eviction_policy& policy) : policy_(policy) {}

  // --- tiers and segments ---
  std::size_t add_tier(std::string kind, std::string location, int device);
  /// Adds the memory at `ptr` as a new segment of tier `t`; returns its base offset.
  std::size_t add_segment(std::size_t t, std::byte* ptr, std::size_t bytes, bool lent);
  std::size_t size() const noexcept { return tiers_.size(); }
  const std::string& kind(std::size_t t) const { return tiers_.at(t).kind; }
  const std::string& location(std::size_t t) const { return tiers_.at(t).location; }
  int device(std::size_t t) const { return tiers_.at(t).device; }
  std::size_t capacity(std::size_t t) const { return tiers_[t].blocks.capacity(); }
  /// The tier of peer `device`, if there is one.
  std::optional<std::size_t> peer_tier(int device) const;
  tier_stats stats(std::size_t t) const;
  /// Every segment's memory, leaving every tier empty (close): the caller frees it.
  std::vector<segment_memory> take_all();

  // --- blocks ---
  /// A block of `nbytes` on tier `t` owned by `owner`, or nullopt when none is free.
  std::optional<placement> try_allocate(std::size_t t, std::size_t nbytes, std::uint64_t owner);
  /// Returns a block, fenced by `fences` (Note [Ordered reuse]); empty refs are skipped.
  void release(std::size_t t, std::size_t offset, const std::vector<event_ref>& fences);
  /// The block at `offset` now belongs to `owner` (an incremental offload took it over).
  void set_owner(std::size_t t, std::size_t offset, std::uint64_t owner) { tiers_[t].owner[offset] = owner; }
  std::size_t block_size(std::size_t t, std::size_t offset) const { return tiers_[t].blocks.block_size(offset); }
  /// Handle counts per tier (a handle with no block counts on tier 0).
  void count_handle(std::size_t t, int delta) { tiers_[t].handles += delta; }
  std::string oom_message(std::size_t nbytes) const;

  // --- eviction order (Note [Eviction order]) ---
  void list(std::size_t t, const victim_info& v) { tiers_[t].candidates.insert(v); }
  void unlist(std::size_t t, const victim_info& v) { tiers_[t].candidates.erase(v); }
  /// The handle to evict first from tier `t`, if any can move.
  std::optional<std::uint64_t> victim(std::size_t t) const;

  // --- fences (Note [Fence tokens]) ---
  /// Every live fence: token and event (to be queried outside the lock).
  std::vector<std::pair<std::uint64_t, event_ref>> fences() const;
  /// The fence's event completed: its bytes need no wait any more.
  void clear_fence(std::uint64_t token);

  // --- reclaim (Note [Lending] in store_lending.cpp) ---
  /// Whole segments of tier `t`, newest first, covering at least `want` bytes.
  std::vector<std::size_t> newest_segments(std::size_t t, std::size_t want) const;
  void drain(std::size_t t, const std::vector<std::size_t>& bases);
  void undrain(std::size_t t, const std::vector<std::size_t>& bases);
  /// Live blocks (offset, size) in the segment at `base`, and who owns the first one.
  std::vector<std::pair<std::size_t, std::size_t>> blocks_in(std::size_t t, std::size_t base) const { return tiers_[t].blocks.blocks_in(base); }
  std::uint64_t owner(std::size_t t, std::size_t offset) const { return tiers_[t].owner.at(offset); }
  std::optional<std::size_t> first_block_in(std::size_t t, std::size_t base) const { return tiers_[t].blocks.first_block_in(base); }
  bool fenced(std::size_t t, const std::vector<std::size_t>& bases) const;
  /// Removes drained, empty, unfenced segments and returns their memory to free.
  std::vector<segment_memory> remove(std::size_t t, const std::vector<std::size_t>& bases);
  std::size_t free_bytes(std::size_t t) const { return tiers_[t].blocks.capacity() - tiers_[t].blocks.used(); }
  bool& reclaiming(std::size_t t) { return tiers_[t].reclaiming; }

 private:
  struct victim_order {
    const eviction_policy* policy;
    bool operator()(const victim_info& a, const victim_info& b) const noexcept {
      if (evict_before(*policy, a, b)) return true;
      if (evict_before(*policy, b, a)) return false;
      return a.id < b.id;
    }
  };
  struct lent_memory {
    std::byte* ptr;
    std::size_t bytes;
    bool lent;  ///< added by lend() (the initial segment is not)
  };
  struct tier {
    std::string kind;
    std::string location;
    int device;
    pool blocks;
    std::map<std::size_t, lent_memory> segments;           // base offset -> memory
    std::unordered_map<std::size_t, std::uint64_t> owner;  // block offset -> handle
    std::set<victim_info, victim_order> candidates;
    std::size_t handles = 0;
    bool reclaiming = false;
  };

  const eviction_policy& policy_;
  std::vector<tier> tiers_;
  std::map<std::uint64_t, event_ref> fences_;              // token -> event
  std::unordered_map<event_t, std::uint64_t> token_of_;    // event -> its live token
  std::uint64_t next_token_ = 1;
};

}  // namespace aqua
