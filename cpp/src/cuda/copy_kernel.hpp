// One kernel launch for a batch of small copies (Note [Copy kernel]).
//
// Note [Copy kernel]
// A DMA copy has a fixed cost per copy on the device, however small (the H200 run measured a
// batch of 64 pieces at ~0.5 ms whether the pieces were 4 KiB or 64 KiB: ~7 us a piece, a
// cudaMemcpyBatchAsync of them included). A kernel copies many small pieces in one launch:
// one grid row per piece, its blocks striding over the piece in 16-byte units where both
// pointers are 16-byte aligned (bytes otherwise). Every pointer must be one this device's SMs
// can reach: its own memory, a peer's with peer access enabled, or pinned host memory (under
// unified addressing a host pointer is also the device's) -- which is what the copy engine
// copies between (the tiers' pools and the device) and the remote tier's staging (pinned).
// Opt-in (AQUA_COPY_KERNEL=1, read once; _core.copy_kernel() switches it) until a GPU run has
// checked its bytes and its speed against cudaMemcpyBatchAsync; only batches of pieces up to
// `copy_kernel_max_piece` take it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace aqua::cuda {

/// Pieces above this size go to the DMA engines (their fixed cost is small next to the bytes).
constexpr std::size_t copy_kernel_max_piece = std::size_t{1} << 20;

/// Enqueues `count` copies on `stream` as kernel launches (one per 128 pieces); returns the
/// launch error, if any.
cudaError_t launch_copy_pieces(void* const* dsts, const void* const* srcs,
                               const std::size_t* sizes, std::size_t count, cudaStream_t stream);

}  // namespace aqua::cuda
