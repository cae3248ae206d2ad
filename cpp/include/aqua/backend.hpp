// The backend interface: everything the core needs from a device runtime, and nothing more.
// Two implementations, chosen at run time by make_backend(): "cuda" (cpp/src/cuda) and
// "emulation" (cpp/src/host). Core logic never tests which one it has.
//
// Contract (both backends):
//  - allocate_*/free_* and create_* are setup-time calls; the hot path only records events,
//    makes streams wait and enqueues copies.
//  - record(e, s) then query(e) reflects the most recent record only, as cudaEventRecord does;
//    stream_wait(s, e) captures the event's state at the time of the call, so an event can be
//    re-recorded afterwards without affecting waits already enqueued.
//  - Stream 0 is the user's default stream: on the emulation backend it is the calling host
//    thread itself (recording completes at once, waiting blocks the caller).
//  - Destructors and free_*/destroy_* never throw.
//
// Note [No stray contexts]
// A thread that has never used CUDA has no current context. Setting a device there and
// "restoring" device 0 afterwards with cudaSetDevice would create GPU 0's primary context
// (~0.5 GiB, and an error under exclusive-process mode) on a thread that only ever meant to
// touch another GPU: the lending consumer thread, a worker. So enter_device() returns the
// previous *context* and restore_device() puts exactly that back, creating nothing, as torch's
// MaybeSetDevice does. A thread that had no context keeps the compute device's (which exists
// already): there is nothing to restore, and no new context. Every core operation that calls
// the runtime runs under a device_guard of the compute device: the thread's device is always
// set explicitly.
#pragma once

#include <cstddef>
#include <optional>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "aqua/types.hpp"

namespace aqua {

class backend {
 public:
  virtual ~backend() = default;
  backend() = default;
  backend(const backend&) = delete;
  backend& operator=(const backend&) = delete;

  // --- identity and capabilities ---
  virtual std::string name() const = 0;  ///< "cuda" or "emulation"
  virtual bool is_emulation() const noexcept = 0;
  virtual int device_count() const = 0;
  /// Why the backend has fewer devices than expected, if it knows ("" when all is well).
  virtual std::string status() const { return ""; }
  virtual std::string device_name(int device) const = 0;
  /// Location label of a device as users see it ("cuda:1", "emu:1").
  virtual std::string device_label(int device) const = 0;
  virtual bool can_access_peer(int device, int peer) const = 0;
  /// Idempotent; called once per pair at setup.
  virtual void enable_peer_access(int device, int peer) = 0;
  /// Free and total bytes of a device's memory now (cudaMemGetInfo).
  virtual std::pair<std::size_t, std::size_t> memory_info(int device) = 0;
  /// Makes `device` current for the calling thread; returns a token of what was current before
  /// (Note [No stray contexts]) for restore_device.
  virtual std::uintptr_t enter_device(int device) = 0;
  virtual void restore_device(std::uintptr_t previous) noexcept = 0;

  // --- memory (setup time only) ---
  virtual void* allocate_device(int device, std::size_t bytes) = 0;
  virtual void free_device(int device, void* ptr) noexcept = 0;
  /// Pinned host memory of exactly `bytes`, resident (pre-faulted) on return.
  virtual void* allocate_pinned_host(std::size_t bytes) = 0;
  virtual void free_pinned_host(void* ptr, std::size_t bytes) noexcept = 0;

  // --- streams and events ---
  /// A stream of `device`; `high_priority` gives it the highest stream priority (which orders
  /// kernels, not copies: Note [Lanes] in copy_engine.hpp).
  virtual stream_t create_stream(int device, bool high_priority = false) = 0;
  virtual void destroy_stream(stream_t stream) noexcept = 0;
  virtual void synchronize_stream(stream_t stream) = 0;
  virtual event_t create_event(int device) = 0;
  virtual void destroy_event(event_t event) noexcept = 0;
  virtual void record(event_t event, stream_t stream) = 0;
  virtual bool query(event_t event) = 0;
  virtual void wait(event_t event) = 0;  ///< blocks the calling thread
  virtual void stream_wait(stream_t stream, event_t event) = 0;

  // --- copies ---
  /// Enqueues one copy of `bytes` on `stream` (the copy engine does any chunking).
  virtual void copy_async(void* dst, const void* src, std::size_t bytes, stream_t stream) = 0;
  /// Enqueues `count` independent copies on `stream`; returns how: in one batched submission
  /// (cudaMemcpyBatchAsync, CUDA >= 12.8; one task on emulation), by one kernel launch
  /// (CUDA, small pieces, opt-in, only where `own`: every pointer is the store's own, its
  /// device's tensors and its pools; cuda/copy_kernel.hpp), or one copy each (the default, and
  /// where the runtime refused the batch).
  virtual batch_submit copy_batch_async(void* const* dsts, const void* const* srcs,
                                        const std::size_t* sizes, std::size_t count,
                                        stream_t stream, bool own = false) {
    (void)own;
    for (std::size_t i = 0; i < count; ++i) copy_async(dsts[i], srcs[i], sizes[i], stream);
    return batch_submit::per_copy;
  }

  /// Whether copy_batch_async can submit one batch on `stream`. Not on CUDA's legacy default
  /// stream (torch's default stream), which cudaMemcpyBatchAsync refuses outright: the copy
  /// engine relays a batch for it through a stream of its own (Note [Relay] in
  /// copy_engine.hpp).
  virtual bool batches_on(stream_t stream) const noexcept {
    (void)stream;
    return true;
  }

  // --- testing ---
  /// Makes batches_on(0) false on emulation (its host stream 0 standing in for CUDA's legacy
  /// default stream), so that the copy engine's relay runs there. Emulation only.
  virtual void refuse_host_stream_batches(bool refuse);
  /// Makes the next `count` copy submissions fail with a backend_error, to exercise failure
  /// paths (migration, reclaim). Only the emulation backend supports it.
  virtual void inject_copy_faults(int count);
  /// Pretends `device` has `bytes` of memory (its allocations then count against it), so the
  /// peer budgets of OffloadManager(peers="auto") are testable. Emulation only; 0 undoes it.
  virtual void set_device_memory(int device, std::size_t bytes);
};

/// Makes a device current for a scope and restores the thread's previous context on exit,
/// creating none (Note [No stray contexts]; a no-op on emulation).
class device_guard {
 public:
  device_guard(backend& b, int device) : backend_(b), previous_(b.enter_device(device)) {}
  ~device_guard() { backend_.restore_device(previous_); }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;

 private:
  backend& backend_;
  std::uintptr_t previous_;
};

/// Whether the CUDA backend was compiled into this build.
bool cuda_compiled() noexcept;
/// Whether batches of small copies take the CUDA copy kernel (Note [Copy kernel] in
/// cuda/copy_kernel.hpp): read from AQUA_COPY_KERNEL=1 on first use, or set here (tests,
/// profiles). Returns the setting in force. Without the CUDA backend: always false.
bool copy_kernel(std::optional<bool> set = std::nullopt);
/// Runs every thread of the copy kernel's launches for these pieces on the host, one after
/// the other (tests: the kernel's arithmetic, checked bitwise without a GPU). Returns false,
/// copying nothing, when a piece does not fit the kernel (DMA's, then).
bool copy_kernel_on_host(void* const* dsts, const void* const* srcs, const std::size_t* sizes,
                         std::size_t count);

/// The process-wide backend of that name ("cuda" or "emulation"), created on first use and
/// shared by every store; destroyed when the last store using it goes.
std::shared_ptr<backend> make_backend(const std::string& name);

}  // namespace aqua
