// The copy engine: the one place that records events, makes streams wait and enqueues copies.
// Every copy the store makes (offload, fetch, prefetch, migration, reclaim, incremental) is a
// submission here.
//
// Note [Lanes]
// Each tier has four streams of the compute device (types.hpp `lane`): to_tier (offloads),
// prefetch, demand (a fetch the caller waits for never queues behind prefetches) and migrate
// (moves down the cascade). Copies in one direction serialise on the hardware anyway; separate
// streams keep a demand fetch from waiting on unrelated work *in software*, and chunking
// (below) keeps it from waiting long behind a huge copy on the hardware. The demand stream is
// created with the highest priority, which orders kernels only (CUDA: stream priorities do not
// affect memory copies); its latency comes from the separate stream and the chunking. (The
// opt-in copy kernel for batches of small pieces is a kernel: there the priority does order
// it, ahead of the workload's own kernels; Note [Copy kernel] in cuda/copy_kernel.hpp.)
// Dependencies between lanes are events only.
//
// Note [Submission]
// A submission is a set of groups, one per (tier, lane), each a list of copies and the events
// they must wait for. In order: one event is recorded on the user's stream (when the copies
// must follow the user's work: the source was produced there, or the destination allocated
// there); each group's stream waits for it and for the group's events (each distinct event
// once), enqueues its copies -- those above chunk_bytes in chunk_bytes pieces, the others in
// one batched submission -- and records one event, which the submission returns for the
// group. With fence_user, the user's stream then waits for every group's event and for the
// extra `user_waits` (e.g. a prefetch that already ran). Nothing waits on the host.
//
// Note [Relay]
// A caller's stream the backend cannot batch on (CUDA's legacy default stream, torch's default
// stream: cudaMemcpyBatchAsync refuses it outright) would get one copy per piece, a launch
// each. copy_on() then relays the batch through a stream of the engine's own: one event
// recorded on the caller's stream, which the relay stream waits for; the batch there; one event
// recorded after it, which the caller's stream waits for. So the copies follow the caller's
// earlier work and precede its later work, as on the caller's stream itself. A `wait` waits
// for that event: this batch and, the relay being one stream, the relayed batches queued on it
// before (each behind its own caller's work), never the caller's later work or another stream.
// A single copy needs no batch and is not relayed.
//
// Note [Abort rule]
// If any step of a submission fails, every stream it touched is synchronised before the error
// propagates (errors while synchronising are ignored: a stream that cannot sync runs nothing
// more). So when submit() throws, no piece of that submission can still run: the caller may
// hand its blocks back without a fence and free its destination buffers at once. Fences the
// blocks inherited stay in their pool until their own events complete (Note [Ordered reuse] in
// pool.hpp). Waits already enqueued on the user's stream refer to events that were recorded,
// so they complete too. This is the only failure rule of the core.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "aqua/backend.hpp"
#include "aqua/event_pool.hpp"
#include "aqua/types.hpp"

namespace aqua {

struct copy_op {
  void* dst;
  const void* src;
  std::size_t bytes;
};

/// Copies of one tier's lane, submitted together (Note [Submission]).
struct copy_group {
  std::size_t tier;
  aqua::lane lane;
  std::vector<event_ref> after;  ///< events the copies must wait for (duplicates are fine)
  std::vector<copy_op> ops;
};

struct submission {
  static constexpr std::size_t no_group = static_cast<std::size_t>(-1);

  stream_t user = 0;
  bool after_user = true;  ///< the copies follow the work enqueued on `user` so far
  bool fence_user = false;  ///< later work on `user` follows the copies
  std::vector<copy_group> groups;
  std::vector<event_ref> user_waits;  ///< with fence_user: more events `user` waits for

  /// The group of `tier`, opened on `lane` by its first copy. `index` maps each tier to its
  /// group's position in `groups` (`no_group` until it has one), for the caller to find the
  /// group's event among submit()'s results.
  copy_group& group_for(std::vector<std::size_t>& index, std::size_t tier, aqua::lane lane) {
    std::size_t& g = index[tier];
    if (g == no_group) {
      g = groups.size();
      groups.push_back(copy_group{tier, lane, {}, {}});
    }
    return groups[g];
  }
};

struct copy_engine_stats {
  std::uint64_t batched_submissions = 0;  ///< batches of >= 2 copies in one submission
  std::uint64_t batch_fallbacks = 0;      ///< batches the runtime refused: one copy each
  std::uint64_t batch_kernels = 0;        ///< batches copied by the copy kernel (CUDA, opt-in)
};

class copy_engine {
 public:
  copy_engine(std::shared_ptr<backend> b, int device, std::size_t tiers, std::size_t chunk_bytes,
              event_pool& events);
  ~copy_engine();  ///< drains and destroys every stream; never throws
  copy_engine(const copy_engine&) = delete;
  copy_engine& operator=(const copy_engine&) = delete;

  /// Runs `s` (Note [Submission]); returns one event per group, in order. Throws after
  /// draining (Note [Abort rule]).
  std::vector<event_ref> submit(const submission& s);
  /// Copies on a caller's stream, not a tier's (staging buffers, raw baselines): batched like
  /// a group, not chunked (chunks keep a demand fetch from queueing behind a huge copy on the
  /// tiers' streams; a caller's stream has no such neighbour), no event. With `wait`, returns
  /// once they ran (that stream only: never the whole device, whose other streams may run
  /// unrelated work for long). A stream the backend cannot batch on is relayed (Note
  /// [Relay]). Throws after synchronising the streams it used (Note [Abort rule]).
  void copy_on(stream_t s, const std::vector<copy_op>& ops, bool wait);
  stream_t stream(std::size_t tier, aqua::lane l) const { return streams_.at(tier * lane_count + static_cast<std::size_t>(l)); }
  /// Blocks until everything enqueued on every lane so far has run.
  void synchronize();
  /// synchronize(), ignoring errors (a runtime shutting down at exit).
  void drain() noexcept;
  std::size_t chunk_bytes() const noexcept { return chunk_bytes_; }
  copy_engine_stats stats() const noexcept;

 private:
  /// Copies above `chunk` bytes in pieces of `chunk`, the others in one batched submission
  /// (`own`: the store's own memory, which the copy kernel may take).
  void enqueue(const std::vector<copy_op>& ops, stream_t s, std::size_t chunk, bool own);

  std::shared_ptr<backend> backend_;
  int device_;
  std::size_t chunk_bytes_;
  event_pool& events_;
  std::vector<stream_t> streams_;  // tier * lane_count + lane, then the relay (Note [Relay]);
                                   // immutable after construction
  std::atomic<std::uint64_t> batched_{0}, fallbacks_{0}, kernels_{0};
};

}  // namespace aqua
