// Store: the handle table, its state machine, the pools of every tier and the copy engine.
// See the design note at the top of cpp/src/store.cpp for the stream-ordering rules.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "aqua/backend.hpp"
#include "aqua/event_pool.hpp"
#include "aqua/pool.hpp"
#include "aqua/types.hpp"

namespace aqua {

/// Life of a handle: submitting -> in_flight -> offloaded -> fetching -> fetched, or -> freed
/// from in_flight/offloaded. fetched and freed are terminal (the entry leaves the table).
enum class handle_state : std::uint8_t { submitting, in_flight, offloaded, fetching, fetched, freed };
const char* to_string(handle_state s) noexcept;

struct store_config {
  struct peer {
    int device;
    std::size_t bytes;
  };
  int device = 0;            ///< compute device: where tensors live and copy streams run
  std::vector<peer> peers;   ///< peer tiers, fastest first
  std::size_t host_bytes = 0;  ///< pinned host tier (0: none)
  /// Copies larger than this are enqueued in pieces, so a fetch is never stuck behind one
  /// huge copy on a shared engine.
  std::size_t chunk_bytes = std::size_t{32} << 20;
};

struct handle_info {
  handle_state state;
  std::size_t tier;
  std::size_t nbytes;
};

struct tier_stats {
  std::string kind;      ///< "peer" or "host"
  std::string location;  ///< "cuda:1", "emu:1", "cpu"
  pool_stats pool;
  std::size_t pending_bytes = 0;  ///< released blocks awaiting their copy's completion
  std::size_t handles = 0;
};

struct store_stats {
  std::vector<tier_stats> tiers;
  std::uint64_t offloads = 0, fetches = 0, frees = 0;
  std::uint64_t bytes_offloaded = 0, bytes_fetched = 0;
  std::size_t live_handles = 0;
  std::size_t events_created = 0;
};

class store {
 public:
  store(std::shared_ptr<backend> b, store_config cfg);
  ~store();
  store(const store&) = delete;
  store& operator=(const store&) = delete;

  /// Places `nbytes` at `src` on the fastest tier with room and enqueues the copy after the
  /// work already enqueued on `user`. With `fence_user`, later work on `user` is ordered after
  /// the copy (a snapshot whose source stays writable). Returns at once.
  std::uint64_t offload(const void* src, std::size_t nbytes, stream_t user, bool fence_user);
  /// Copies the handle's bytes to `dst` (allocated by the caller on `user`); later work on
  /// `user` sees them. Consumes the handle; its block is reused once the copy completed.
  void fetch(std::uint64_t id, void* dst, stream_t user);
  /// Drops the handle; its block is reused once any copy still touching it completed.
  void free(std::uint64_t id);
  bool ready(std::uint64_t id);
  void wait(std::uint64_t id);
  handle_info info(std::uint64_t id) const;
  bool contains(std::uint64_t id) const;

  void synchronize();
  /// Waits for every copy and refuses further work. Idempotent, never throws.
  void close() noexcept;
  bool closed() const noexcept { return closed_.load(); }

  /// Returns blocks whose copies completed to their pools first, so `used` is current.
  store_stats stats();
  std::size_t tier_count() const noexcept { return tiers_.size(); }
  const std::string& tier_kind(std::size_t t) const { return tiers_.at(t).kind; }
  const std::string& tier_location(std::size_t t) const { return tiers_.at(t).location; }
  stream_t copy_stream(std::size_t t, direction d) const;
  int device() const noexcept { return config_.device; }
  backend& get_backend() const noexcept { return *backend_; }
  const store_config& config() const noexcept { return config_; }

  /// One unchunked backend copy on `stream`: the raw baseline benchmarks compare against.
  void raw_copy(void* dst, const void* src, std::size_t bytes, stream_t stream);

 private:
  struct tier {
    std::string kind;
    std::string location;
    int device;  ///< -1 for pinned host
    std::byte* base = nullptr;
    std::size_t reserved = 0;
    pool blocks;
    stream_t to_tier = 0;
    stream_t from_tier = 0;
    std::size_t handles = 0;
    std::size_t pending_bytes = 0;
  };
  struct entry {
    handle_state state;
    std::size_t tier;
    std::size_t offset;
    std::size_t nbytes;
    event_t done;  ///< completion of the last copy that touched the block (0: none)
  };
  struct pending_block {
    std::size_t tier;
    std::size_t offset;
    std::size_t bytes;
    event_t event;
  };

  void require_open() const;
  entry& find_locked(std::uint64_t id, const char* op);
  std::uint64_t place_locked(std::size_t nbytes);  // 0 when nothing fits
  std::string oom_message_locked(std::size_t nbytes) const;
  void defer_release_locked(std::size_t tier, std::size_t offset, event_t e);
  void reap();
  void wait_pending();
  void enqueue_copy(void* dst, const void* src, std::size_t bytes, stream_t s);
  void release_resources() noexcept;

  std::shared_ptr<backend> backend_;
  store_config config_;
  std::vector<tier> tiers_;  // the vector is fixed after construction; pools: LOCK: mutex_
  std::unique_ptr<event_pool> events_;

  mutable std::mutex mutex_;
  std::unordered_map<std::uint64_t, entry> entries_;  // LOCK: mutex_
  std::map<std::uint64_t, pending_block> pending_;    // LOCK: mutex_ (seq -> block)
  std::uint64_t next_id_ = 1;                          // LOCK: mutex_
  std::uint64_t next_seq_ = 1;                         // LOCK: mutex_
  store_stats counters_;                               // LOCK: mutex_ (counter fields only)
  std::atomic<bool> closed_{false};
};

}  // namespace aqua
