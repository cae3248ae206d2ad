// Small value types shared by the core and the backends.
#pragma once

#include <cstddef>
#include <cstdint>

namespace aqua {

/// Opaque backend stream. For CUDA it is a cudaStream_t; 0 is the legacy default stream on
/// CUDA and "the calling host thread" on the emulation backend (where torch runs on the host).
using stream_t = std::uintptr_t;
/// Opaque backend event (cudaEvent_t or an emulation completion flag).
using event_t = std::uintptr_t;

/// Where a pool's memory lives.
enum class memory_kind : std::uint8_t {
  device,       ///< device memory of a (peer) GPU
  pinned_host,  ///< page-locked host memory
};

/// Copy direction relative to the compute device.
enum class direction : std::uint8_t {
  to_tier,    ///< D2X: compute device -> tier (offload)
  from_tier,  ///< X2D: tier -> compute device (fetch)
};

/// Alignment of every pool block: 256 bytes, what cudaMalloc guarantees and what keeps copies
/// on the fast path for every dtype.
inline constexpr std::size_t block_alignment = 256;

constexpr std::size_t align_up(std::size_t n, std::size_t a) noexcept {
  return (n + a - 1) / a * a;
}

}  // namespace aqua
