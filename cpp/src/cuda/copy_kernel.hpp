// One kernel launch for a batch of small copies (Note [Copy kernel]).
//
// Note [Copy kernel]
// A DMA copy has a fixed cost per copy on the device, however small (the H200 run measured a
// batch of 64 pieces at ~0.5 ms whether the pieces were 4 KiB or 64 KiB: ~7 us a piece, a
// cudaMemcpyBatchAsync of them included). A kernel copies many small pieces in one launch:
// one grid row per piece, its blocks striding over the piece in 16-byte units (a byte head
// and tail around them; pieces whose dst and src are not equally aligned modulo 16 go to DMA).
// Every pointer must be one this device's SMs can reach: its own memory, a peer's with peer
// access enabled, or memory from cudaHostAlloc (under unified addressing a host pointer is
// also the device's). Only the store's own copies take it -- between the device's tensors
// (checked to be on it) and the tiers' pools (cudaMalloc, peer access enabled before a peer
// tier exists, cudaHostAlloc) -- never raw copies, whose pointers come from the caller: a
// pointer the SMs cannot reach is a sticky fault that ends the CUDA context, where DMA
// reports an error. A kernel competes for SMs where DMA does not: it waits for free SMs behind
// a long kernel of another workload, and takes some from it (and stream priorities order it,
// unlike copies: Note [Lanes]). On a GPU without this build's kernel image (below sm_80) the
// first launch fails, the setting switches off and the batch goes to DMA.
// Opt-in (AQUA_COPY_KERNEL=1, read once; _core.copy_kernel() switches it) until a GPU run has
// checked its bytes and its speed against cudaMemcpyBatchAsync; only batches of pieces up to
// `kernel_copy::max_piece` (1 MiB) take it (copy_kernel_body.hpp).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace aqua::cuda {

/// Whether the kernel takes these pieces: each at most `kernel_copy::max_piece`, its dst and
/// src equally aligned modulo 16 (else its bytes would go one at a time, slower than DMA).
bool copy_kernel_fits(void* const* dsts, const void* const* srcs, const std::size_t* sizes,
                      std::size_t count);

/// Enqueues `count` copies that fit on `stream` as kernel launches (one per 128 pieces);
/// returns the first launch error, with `*launched` the pieces enqueued before it.
cudaError_t launch_copy_pieces(void* const* dsts, const void* const* srcs,
                               const std::size_t* sizes, std::size_t count, cudaStream_t stream,
                               std::size_t* launched);

}  // namespace aqua::cuda
