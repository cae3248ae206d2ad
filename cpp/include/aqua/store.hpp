// Store: the handle table and its state machine. Placement, eviction order and fences live in
// tier_set; every copy goes through copy_engine. The rules are design notes at the top of
// cpp/src/store.cpp (stream ordering, block release, locking, close), store_offload.cpp
// (placement, incremental offload) and store_migration.cpp (migration, lend, reclaim).
//
// Every operation on handles is a batch: offload() is offload_many() of one item, fetch() is
// fetch_many() of one handle, prefetch() is prefetch_many() of one.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "aqua/backend.hpp"
#include "aqua/copy_engine.hpp"
#include "aqua/event_pool.hpp"
#include "aqua/eviction_policy.hpp"
#include "aqua/tier_set.hpp"
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
  std::size_t chunk_bytes = default_chunk_bytes;  ///< Note [Lanes] in copy_engine.hpp
  std::string policy = "lru";
};

struct handle_info {
  handle_state state;
  std::size_t tier;
  std::size_t nbytes;
  bool prefetched;
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
  std::uint64_t batched_submissions = 0, batch_fallbacks = 0, batch_kernels = 0;
  std::size_t live_handles = 0;
  std::size_t events_created = 0;
};

/// One item of a batched offload.
struct offload_item {
  const void* src;
  std::size_t nbytes;
  double priority = 0.0;
  /// A live handle whose bytes are a prefix of src's (Note [Incremental offload]); 0: none.
  std::uint64_t base = 0;
};

/// Where an offloaded item went: its handle and the tier whose to_tier lane copies it.
struct offload_result {
  std::uint64_t id;
  std::size_t tier;
};

/// Allocates device (`device` >= 0) or pinned host (-1) memory; a failure names `what`, the
/// device, the bytes asked and the device's free memory, with the runtime's error.
std::byte* allocate_named(backend& b, int device, std::size_t bytes, const std::string& what);

class store {
 public:
  store(std::shared_ptr<backend> b, store_config cfg);
  ~store();
  store(const store&) = delete;
  store& operator=(const store&) = delete;

  // --- handles (store.cpp) ---
  /// Places every item on the fastest tier with room (evicting down the cascade when the
  /// fastest is full) and enqueues the copies after the work already enqueued on `user`. With
  /// `fence_user`, later work on `user` is ordered after the copies. All or nothing. Returns at
  /// once. An item with a `base` consumes it (store_migration.cpp).
  std::vector<offload_result> offload_many(const std::vector<offload_item>& items, stream_t user,
                                           bool fence_user);
  offload_result offload(const offload_item& item, stream_t user, bool fence_user);
  /// Copies each handle's bytes to its `dst` (allocated by the caller on `user`) on the demand
  /// lane; later work on `user` sees them. With `keep`, the handles stay live (clean copies to
  /// be a `base`); otherwise they are consumed. A prefetched handle only orders `user` after
  /// its prefetch. Every handle is checked before any is claimed.
  void fetch_many(const std::vector<std::uint64_t>& ids, const std::vector<void*>& dsts,
                  stream_t user, bool keep = false);
  void fetch(std::uint64_t id, void* dst, stream_t user, bool keep = false);
  /// Starts copying each handle back to its `dst` now, on the prefetch lane; a later fetch only
  /// waits for it. Already prefetched (or empty) handles are left as they are. Returns the tier
  /// of each (the caller keeps `dst` alive until that tier's prefetch lane ran past the copy).
  std::vector<std::size_t> prefetch_many(const std::vector<std::uint64_t>& ids,
                                         const std::vector<void*>& dsts, stream_t user);
  std::size_t prefetch(std::uint64_t id, void* dst, stream_t user);
  /// Later work on `user` follows the copy that read the handle's source (a snapshot taken
  /// with fence_user=false: the caller fences before it writes the source again).
  void fence_source(std::uint64_t id, stream_t user);
  /// Drops the handle; its block is reused in stream order after any copy touching it.
  void free(std::uint64_t id);
  bool ready(std::uint64_t id);
  /// Blocks until the handle's data is in its tier and any prefetch of it has landed.
  void wait(std::uint64_t id);
  handle_info info(std::uint64_t id) const;
  bool contains(std::uint64_t id) const;
  /// Every live handle's id: the Python layer frees those whose Handle object died without
  /// saying so (an interrupt inside its finalizer; Note [Orphans] in manager.py).
  std::vector<std::uint64_t> live_ids() const;

  void synchronize();
  /// Refuses new calls, waits for the calls in progress and every copy, then gives every
  /// pool segment, stream and event back (Note [Close]). Idempotent, never throws.
  void close() noexcept;
  bool closed() const noexcept { return closed_.load(); }

  /// Returns completed fences to their pools first, so the numbers are current.
  store_stats stats();
  std::size_t tier_count() const noexcept { return tier_count_; }
  const std::string& tier_kind(std::size_t t) const { return kinds_.at(t); }
  const std::string& tier_location(std::size_t t) const { return locations_.at(t); }
  stream_t copy_stream(std::size_t t, aqua::lane l);
  int device() const noexcept { return config_.device; }
  backend& get_backend() const noexcept { return *backend_; }
  const store_config& config() const noexcept { return config_; }
  std::string policy() const { return policy_->name(); }

  // --- lending (store_migration.cpp) ---
  /// Grows the pool of peer `device` by a new segment of `nbytes`. Returns the tier's capacity.
  std::size_t lend(int device, std::size_t nbytes);
  /// Shrinks the pool of peer `device` by whole segments, newest first, covering at least
  /// `nbytes` (all of it when nullopt): every handle inside is migrated down the cascade
  /// first. Blocks until the memory is handed back; returns the bytes handed back.
  std::size_t reclaim(int device, std::optional<std::size_t> nbytes);

  /// Copies on the caller's `stream` outside any handle (copy_engine::copy_on): the remote
  /// tier's staging copies, and the raw baseline benchmarks compare against. With `wait`,
  /// returns once they ran on `stream` (only that stream).
  void raw_copy_many(const std::vector<copy_op>& ops, stream_t stream, bool wait);
  /// Blocks until the work enqueued on `stream` so far has run.
  void synchronize_stream(stream_t stream);

 private:
  static constexpr std::size_t no_offset = static_cast<std::size_t>(-1);  ///< entry: no block
  static constexpr std::size_t prefetch_read = 0, demand_read = 1;  ///< entry::read slots
  struct entry {
    entry(std::size_t n, double prio, std::uint64_t clock)
        : nbytes(n), priority(prio), inserted(clock), last_use(clock) {}
    handle_state state = handle_state::submitting;
    std::size_t tier = 0;
    std::size_t offset = no_offset;
    std::byte* ptr = nullptr;
    std::size_t nbytes;
    double priority;
    std::uint64_t inserted;
    std::uint64_t last_use;
    event_ref done;     ///< the last copy that wrote the block: readers wait on it
    event_ref source;   ///< the offload copy that read the caller's source (fence_source)
    event_ref read[2];  ///< the latest read of the block on the prefetch / demand lane
    event_ref prefetched;  ///< the prefetch into the caller's buffer (empty: none)
    bool busy = false;     ///< a migration, prefetch or incremental offload owns it
    bool listed = false;   ///< an eviction candidate (Note [Eviction order])
  };
  /// Counts a public call in progress, so close() waits for it (RAII; Note [Close]).
  class call_scope {
   public:
    explicit call_scope(store& s) : s_(s) { s_.begin_call(); }
    ~call_scope() { s_.end_call(); }
    call_scope(const call_scope&) = delete;
    call_scope& operator=(const call_scope&) = delete;

   private:
    store& s_;
  };

  // store.cpp
  void begin_call();
  void end_call() noexcept;
  entry& find_locked(std::uint64_t id, const char* op);
  entry& claim_locked(std::unique_lock<std::mutex>& lock, std::uint64_t id, const char* op);
  void claim_all_locked(std::unique_lock<std::mutex>& lock, const std::vector<std::uint64_t>& ids,
                        const char* op);
  victim_info victim_of(std::uint64_t id, const entry& e) const;
  void list_locked(std::uint64_t id, entry& e);
  void unlist_locked(std::uint64_t id, entry& e);
  std::vector<event_ref> touches(const entry& e) const;
  void retire_locked(std::uint64_t id, entry& e, std::vector<event_ref> fences);
  void reap();
  void release_resources() noexcept;

  // store_offload.cpp
  placement place(std::size_t nbytes, std::uint64_t owner);

  // store_migration.cpp
  enum class move { moved, no_room, failed };
  /// Moves handle `id` to the first tier from `below` on with room. On `failed` (the copy could
  /// not be submitted), `why` holds the backend's message; the handle is untouched.
  move migrate_locked(std::unique_lock<std::mutex>& lock, std::uint64_t id, std::size_t below,
                      std::string* why = nullptr);
  std::size_t peer_tier(int device, const char* op) const;

  std::shared_ptr<backend> backend_;
  store_config config_;
  std::unique_ptr<eviction_policy> policy_;
  std::size_t tier_count_ = 0;
  std::vector<std::string> kinds_, locations_;  // immutable after construction
  std::unique_ptr<event_pool> events_;
  std::unique_ptr<copy_engine> engine_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;  // an entry left a busy state, or a call ended
  tier_set tiers_;                                    // LOCK: mutex_
  std::unordered_map<std::uint64_t, entry> entries_;  // LOCK: mutex_
  std::uint64_t next_id_ = 1;                         // LOCK: mutex_
  std::uint64_t clock_ = 0;                           // LOCK: mutex_ (inserted / last_use)
  store_stats counters_;                              // LOCK: mutex_ (counter fields only)
  std::size_t active_calls_ = 0;                      // LOCK: mutex_
  bool released_ = false;                             // LOCK: mutex_ (close() is done)
  std::atomic<bool> closed_{false};
  long owner_pid_;  ///< the process that made it (Note [Fork])
};

}  // namespace aqua
