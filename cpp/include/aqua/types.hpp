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

/// The copy streams of one tier (Note [Lanes] in copy_engine.hpp).
enum class lane : std::uint8_t {
  to_tier,   ///< offloads: compute device -> tier
  prefetch,  ///< prefetches: tier -> compute device, normal priority
  demand,    ///< fetches: tier -> compute device (never behind a prefetch)
  migrate,   ///< moves down the cascade: this tier -> a lower one
};
inline constexpr std::size_t lane_count = 4;

/// How a backend submitted a batch of copies (backend::copy_batch_async).
enum class batch_submit : std::uint8_t {
  per_copy,  ///< one copy each (no batch API, or the runtime refused it)
  batched,   ///< one batched submission (cudaMemcpyBatchAsync; one task on emulation)
  kernel,    ///< one kernel launch (CUDA, small pieces, opt-in)
};

/// Alignment of every pool block: 256 bytes, what cudaMalloc guarantees and what keeps copies
/// on the fast path for every dtype.
inline constexpr std::size_t block_alignment = 256;

/// Copies larger than this are enqueued in pieces by default, so a demand fetch is never stuck
/// behind one huge copy on a shared copy engine. The one source of this default.
inline constexpr std::size_t default_chunk_bytes = std::size_t{32} << 20;

constexpr std::size_t align_up(std::size_t n, std::size_t a) noexcept {
  return (n + a - 1) / a * a;
}

}  // namespace aqua
