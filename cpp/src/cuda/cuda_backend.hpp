// The CUDA backend. Only this file's .cpp includes cuda_runtime.h; the runtime is linked
// statically (see CMakeLists.txt), so loading the extension needs no driver, and the first
// call reports a missing one as zero devices rather than failing to import.
//
// Note [CUDA streams and events]
// Copy streams are non-blocking streams of the compute device (they never synchronise with the
// legacy default stream implicitly; every dependency is an explicit event). Events are created
// with cudaEventDisableTiming, the cheapest kind to record and wait on. Streams and events made
// by torch's runtime and by ours are interchangeable: both are driver objects of the same
// primary context.
#pragma once

#include <optional>
#include <string>

#include "aqua/backend.hpp"

namespace aqua::cuda {

/// aqua::copy_kernel(): the process-wide setting of Note [Copy kernel] (copy_kernel.hpp).
bool copy_kernel_setting(std::optional<bool> set);

class cuda_backend final : public backend {
 public:
  cuda_backend();
  ~cuda_backend() override = default;

  std::string name() const override { return "cuda"; }
  bool is_emulation() const noexcept override { return false; }
  int device_count() const override { return devices_; }
  std::string status() const override { return status_; }
  std::string device_name(int device) const override;
  std::string device_label(int device) const override;
  bool can_access_peer(int device, int peer) const override;
  void enable_peer_access(int device, int peer) override;
  std::pair<std::size_t, std::size_t> memory_info(int device) override;
  std::uintptr_t enter_device(int device) override;
  void restore_device(std::uintptr_t previous) noexcept override;

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
                                const std::size_t* sizes, std::size_t count,
                                stream_t stream, bool own) override;
  bool batches_on(stream_t stream) const noexcept override;

 private:
  void check_device(int device, const char* what) const;
  int devices_ = 0;
  std::string status_;
  // Driver entry points for Note [No stray contexts] (resolved through the runtime, so the
  // extension never links libcuda); null when the driver lacks them.
  using ctx_get_fn = int (*)(void**);
  using ctx_set_fn = int (*)(void*);
  ctx_get_fn ctx_get_ = nullptr;
  ctx_set_fn ctx_set_ = nullptr;
};

}  // namespace aqua::cuda
