// Store: the handle table, its state machine, the tiers (pools of every location), the copy
// engine, eviction and migration between tiers, and lending. The rules are design notes at
// the top of cpp/src/store.cpp (handles, stream ordering, locking) and cpp/src/store_tiers.cpp
// (placement, cascade, lending).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "aqua/backend.hpp"
#include "aqua/event_pool.hpp"
#include "aqua/eviction_policy.hpp"
#include "aqua/pool.hpp"
#include "aqua/types.hpp"

namespace aqua {

/// Life of a handle: submitting -> in_flight -> offloaded -> fetching -> fetched, or -> freed
/// from in_flight/offloaded. fetched and freed are terminal (the entry leaves the table).
/// Migration between tiers and prefetch happen inside in_flight/offloaded.
enum class handle_state : std::uint8_t { submitting, in_flight, offloaded, fetching, fetched, freed };
const char* to_string(handle_state s) noexcept;

struct store_config {
  struct peer {
    int device;
    std::size_t bytes;  ///< initial pool; 0 is allowed (grow it with lend)
  };
  int device = 0;              ///< compute device: where tensors live and copy streams run
  std::vector<peer> peers;     ///< peer tiers, fastest first
  std::size_t host_bytes = 0;  ///< pinned host tier, the bottom of the cascade (0: none)
  /// Copies larger than this are enqueued in pieces, so a fetch is never stuck behind one
  /// huge copy on a shared engine.
  std::size_t chunk_bytes = std::size_t{32} << 20;
  std::string policy = "lru";
};

struct handle_info {
  handle_state state;
  std::size_t tier;
  std::size_t nbytes;
  bool prefetched;
};

struct tier_stats {
  std::string kind;      ///< "peer" or "host"
  std::string location;  ///< "cuda:1", "emu:1", "cpu"
  int device;            ///< backend device index, -1 for host
  pool_stats pool;
  std::size_t handles = 0;
  std::size_t lent_segments = 0;
};

struct store_stats {
  std::vector<tier_stats> tiers;
  std::uint64_t offloads = 0, fetches = 0, frees = 0, prefetches = 0;
  std::uint64_t bytes_offloaded = 0, bytes_fetched = 0, bytes_migrated = 0;
  std::uint64_t incremental_offloads = 0, incremental_bytes_saved = 0;
  std::uint64_t evictions = 0, migrations = 0, migration_failures = 0;
  std::uint64_t lends = 0, reclaims = 0, bytes_lent = 0, bytes_reclaimed = 0;
  double reclaim_last_s = 0, reclaim_max_s = 0, reclaim_total_s = 0;
  std::uint64_t reclaim_last_bytes_moved = 0;
  std::size_t live_handles = 0;
  std::size_t events_created = 0;
};

/// One item of a batched offload.
struct offload_item {
  const void* src;
  std::size_t nbytes;
  double priority = 0.0;
};

class store {
 public:
  store(std::shared_ptr<backend> b, store_config cfg);
  ~store();
  store(const store&) = delete;
  store& operator=(const store&) = delete;

  // --- handles (store.cpp) ---
  /// Places `nbytes` at `src` on the fastest tier with room (evicting down the cascade when the
  /// fastest is full) and enqueues the copy after the work already enqueued on `user`. With
  /// `fence_user`, later work on `user` is ordered after the copy. Returns at once.
  /// With `base` (a live handle whose bytes are a prefix of src's, e.g. an append-only cache),
  /// only the new suffix is copied when base's block has room; `base` is consumed.
  /// `copy_tier`, if given, receives the tier whose to_tier stream ran the copy.
  std::uint64_t offload(const void* src, std::size_t nbytes, stream_t user, bool fence_user,
                        double priority = 0.0, std::uint64_t base = 0,
                        std::size_t* copy_tier = nullptr);
  /// Offloads every item with one event on `user`; all or nothing.
  /// Returns (handle, tier whose to_tier stream ran its copy) per item.
  std::vector<std::pair<std::uint64_t, std::size_t>> offload_many(
      const std::vector<offload_item>& items, stream_t user, bool fence_user);
  /// Copies the handle's bytes to `dst` (allocated by the caller on `user`); later work on
  /// `user` sees them. With `keep`, the handle stays live (a clean copy to be a `base`);
  /// otherwise it is consumed. A prefetched handle only orders `user` after its prefetch.
  void fetch(std::uint64_t id, void* dst, stream_t user, bool keep = false);
  /// Fetches every handle with one event on `user` and one batched submission per tier; all
  /// handles are checked before any is claimed.
  void fetch_many(const std::vector<std::uint64_t>& ids, const std::vector<void*>& dsts,
                  stream_t user, bool keep = false);
  /// Starts copying the handle back to `dst` now; a later fetch only waits for it. Returns the
  /// tier whose from_tier stream runs the copy (the caller keeps `dst` alive until it ran).
  std::size_t prefetch(std::uint64_t id, void* dst, stream_t user);
  /// Drops the handle; its block is reused in stream order after any copy touching it.
  void free(std::uint64_t id);
  bool ready(std::uint64_t id);
  /// Blocks until the handle's data is in its tier and any prefetch of it has landed.
  void wait(std::uint64_t id);
  handle_info info(std::uint64_t id) const;
  bool contains(std::uint64_t id) const;

  void synchronize();
  /// Waits for every copy and refuses further work. Idempotent, never throws.
  void close() noexcept;
  bool closed() const noexcept { return closed_.load(); }

  /// Returns completed fences to their pools first, so the numbers are current.
  store_stats stats();
  std::size_t tier_count() const noexcept { return tiers_.size(); }
  const std::string& tier_kind(std::size_t t) const { return tiers_.at(t).kind; }
  const std::string& tier_location(std::size_t t) const { return tiers_.at(t).location; }
  stream_t copy_stream(std::size_t t, direction d) const;
  int device() const noexcept { return config_.device; }
  backend& get_backend() const noexcept { return *backend_; }
  const store_config& config() const noexcept { return config_; }
  std::string policy() const { return policy_->name(); }

  // --- tiers (store_tiers.cpp) ---
  /// Grows the pool of peer `device` by a new segment of `nbytes`. Returns the tier's capacity.
  std::size_t lend(int device, std::size_t nbytes);
  /// Shrinks the pool of peer `device` by whole segments, newest first, covering at least
  /// `nbytes` (all of it when nullopt): every handle inside is migrated down the cascade
  /// first. Blocks until the memory is handed back; returns the bytes handed back.
  std::size_t reclaim(int device, std::optional<std::size_t> nbytes);

  /// One unchunked backend copy on `stream`: the raw baseline benchmarks compare against.
  void raw_copy(void* dst, const void* src, std::size_t bytes, stream_t stream);

 private:
  struct segment_memory {
    std::byte* ptr;
    std::size_t bytes;
    bool lent;  ///< added by lend() (the initial segment is not)
  };
  struct tier {
    std::string kind;
    std::string location;
    int device;  ///< -1 for pinned host
    pool blocks;                                       // LOCK: mutex_
    std::map<std::size_t, segment_memory> segments;    // LOCK: mutex_ (base offset -> memory)
    std::unordered_map<std::size_t, std::uint64_t> owner;  // LOCK: mutex_ (offset -> handle)
    std::size_t handles = 0;                           // LOCK: mutex_
    bool reclaiming = false;                           // LOCK: mutex_
    stream_t to_tier = 0, from_tier = 0, migrate = 0;  // immutable after construction
  };
  struct entry {
    handle_state state;
    std::size_t tier;
    std::size_t offset;
    std::byte* ptr;
    std::size_t nbytes;
    event_t done;     ///< last copy that wrote the block: readers wait on it (0: none)
    event_t touched;  ///< ordered after every copy that touched the block: movers, overwriters
                      ///< and the block's release fence wait on it (0: none)
    double priority;
    std::uint64_t inserted;
    std::uint64_t last_use;
    bool busy = false;      ///< a migration or prefetch of it is being submitted
    event_t prefetched = 0;  ///< prefetch copy into the caller's buffer (0: none)
  };
  /// A block chosen for a copy, with the fence events its copy must wait for (each ref'd).
  struct placement {
    std::size_t tier;
    std::size_t offset;
    std::byte* ptr;
    std::vector<event_t> fences;
  };

  // store.cpp
  void require_open() const;
  entry& find_locked(std::uint64_t id, const char* op);
  entry& claim_locked(std::unique_lock<std::mutex>& lock, std::uint64_t id, const char* op);
  void ref_locked(event_t e);
  void unref_locked(event_t e);
  void release_block_locked(std::size_t tier, std::size_t offset, event_t fence);
  void retire_entry_locked(std::uint64_t id, entry& e, event_t fence);
  void reap();
  void enqueue_copy(void* dst, const void* src, std::size_t bytes, stream_t s);
  void release_resources() noexcept;

  std::size_t submit_offload(std::uint64_t id, const void* src, std::size_t nbytes,
                             std::size_t alloc, stream_t user, bool fence_user);

  // store_tiers.cpp
  bool record_after_failure(event_t e, stream_t s) noexcept;
  std::optional<placement> try_allocate_locked(std::size_t tier, std::size_t nbytes,
                                               std::uint64_t owner);
  placement place(std::size_t nbytes, std::size_t first_tier, std::uint64_t owner);
  bool evict_one_locked(std::unique_lock<std::mutex>& lock, std::size_t tier);
  enum class move { moved, no_room, failed };
  /// Moves handle `id` to the first tier from `below` on with room. On `failed` (the copy could
  /// not be submitted), `why` holds the backend's message; the handle is untouched.
  move migrate_locked(std::unique_lock<std::mutex>& lock, std::uint64_t id, std::size_t below,
                      std::string* why = nullptr);
  std::size_t offload_incremental(std::uint64_t id, std::uint64_t base, const entry& based,
                                  const void* src, std::size_t nbytes, stream_t user,
                                  bool fence_user);
  std::string oom_message_locked(std::size_t nbytes) const;
  std::size_t peer_tier(int device, const char* op) const;

  std::shared_ptr<backend> backend_;
  store_config config_;
  std::unique_ptr<eviction_policy> policy_;
  std::vector<tier> tiers_;  // the vector is fixed after construction
  std::unique_ptr<event_pool> events_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;  // an entry left a busy state (submitting, fetching, busy)
  std::unordered_map<std::uint64_t, entry> entries_;  // LOCK: mutex_
  std::unordered_map<event_t, int> event_refs_;       // LOCK: mutex_
  std::map<std::uint64_t, event_t> fences_;           // LOCK: mutex_ (fence token -> event)
  std::uint64_t next_id_ = 1;                          // LOCK: mutex_
  std::uint64_t next_token_ = 1;                       // LOCK: mutex_
  std::uint64_t clock_ = 0;                            // LOCK: mutex_ (inserted / last_use)
  store_stats counters_;                               // LOCK: mutex_ (counter fields only)
  std::atomic<bool> closed_{false};
};

}  // namespace aqua
