// The emulation backend: what CI and machines without a GPU run.
//
// Devices are host-memory arenas (device 0 plays the compute device, whose tensors are CPU
// tensors; 1..N-1 play peers), streams are worker_stream FIFOs, events are completion flags
// with generations. It keeps the asynchrony of the real thing, so races in the core show up in
// CPU tests: a copy runs on a worker thread after the call returned.
//
// Note [Emulated events]
// An event counts its records (`recorded`, the generation of the latest) and keeps the
// generations still queued on some stream (`pending`). query() asks whether the latest record
// ran: like cudaEventQuery it reflects the most recent record only. stream_wait() and wait()
// capture the generation current at the call and wait for *that* record, however often the
// event is re-recorded later, on whatever stream: a recycled event must never release an
// earlier waiter (records on different streams complete out of order). Stream 0 is the calling
// thread: recording on it completes at once and waiting on it blocks the caller.
//
// Memory: arenas come from the host. memory_info() reports the host's available memory, unless
// a test pretends a device is smaller (set_device_memory): then its allocations count against
// that size and fail beyond it, as cudaMalloc does, so peer budgets are testable here. The
// pretended sizes are process-wide (like a GPU's), so they outlive any one backend instance,
// and count only allocations made after they were set.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "aqua/backend.hpp"

namespace aqua::host {

class emulation_backend final : public backend {
 public:
  explicit emulation_backend(int devices);
  ~emulation_backend() override = default;

  std::string name() const override { return "emulation"; }
  bool is_emulation() const noexcept override { return true; }
  int device_count() const override { return devices_; }
  std::string device_name(int device) const override;
  std::string device_label(int device) const override;
  bool can_access_peer(int device, int peer) const override;
  void enable_peer_access(int device, int peer) override;
  std::pair<std::size_t, std::size_t> memory_info(int device) override;
  std::uintptr_t enter_device(int) override { return 0; }
  void restore_device(std::uintptr_t) noexcept override {}

  void* allocate_device(int device, std::size_t bytes) override;
  void free_device(int device, void* ptr) noexcept override;
  void* allocate_pinned_host(std::size_t bytes) override;
  void free_pinned_host(void* ptr, std::size_t bytes) noexcept override;

  stream_t create_stream(int device, bool high_priority = false) override;
  void destroy_stream(stream_t stream) noexcept override;
  void synchronize_stream(stream_t stream) override;
  event_t create_event(int device) override;
  void destroy_event(event_t event) noexcept override;
  void record(event_t event, stream_t stream) override;
  bool query(event_t event) override;
  void wait(event_t event) override;
  void stream_wait(stream_t stream, event_t event) override;
  void copy_async(void* dst, const void* src, std::size_t bytes, stream_t stream) override;
  batch_submit copy_batch_async(void* const* dsts, const void* const* srcs,
                                const std::size_t* sizes, std::size_t count, stream_t stream,
                                bool own) override;
  bool batches_on(stream_t stream) const noexcept override {
    return stream != 0 || !refuse_host_batches_.load();
  }
  void inject_copy_faults(int count) override;
  void refuse_host_stream_batches(bool refuse) override { refuse_host_batches_.store(refuse); }
  void set_device_memory(int device, std::size_t bytes) override;

 private:
  void take_fault();

  struct flag_event {
    std::mutex mutex;
    std::condition_variable cv;
    std::uint64_t recorded = 0;          // LOCK: mutex
    std::vector<std::uint64_t> pending;  // LOCK: mutex (records not yet reached by their stream)
    bool done(std::uint64_t generation) const {  // LOCK: mutex
      return std::find(pending.begin(), pending.end(), generation) == pending.end();
    }
  };
  static flag_event& as_event(event_t e);
  void check_device(int device, const char* what) const;
  static void* allocate_arena(std::size_t bytes);
  static void wait_for(flag_event& ev, std::uint64_t generation);

  int devices_;
  std::atomic<int> faults_{0};
  // refuse_host_stream_batches (tests): process-wide, as a test may set it before any store
  // exists (the backend is made with the first store and goes with the last)
  static inline std::atomic<bool> refuse_host_batches_{false};

};

}  // namespace aqua::host
