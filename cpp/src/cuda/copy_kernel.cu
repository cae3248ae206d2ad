// The notes this file implements are at the top of copy_kernel.hpp; what each thread does is
// copy_kernel_body.hpp.
#include <algorithm>
#include <cstdint>

#include "cuda/copy_kernel.hpp"
#include "cuda/copy_kernel_body.hpp"

namespace aqua::cuda {

namespace {

namespace ck = aqua::kernel_copy;

struct piece {
  unsigned char* dst;
  const unsigned char* src;
  std::size_t bytes;
};

struct pieces {
  piece p[ck::max_pieces];
};

// One grid row (blockIdx.x) per piece, gridDim.y blocks striding over it.
__global__ void copy_pieces(const __grid_constant__ pieces a) {  // (read in place: no copy)
  const piece pc = a.p[blockIdx.x];
  ck::copy_part<uint4>(pc.dst, pc.src, pc.bytes,
                       static_cast<std::size_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                       static_cast<std::size_t>(gridDim.y) * blockDim.x);
}

}  // namespace

bool copy_kernel_fits(void* const* dsts, const void* const* srcs, const std::size_t* sizes,
                      std::size_t count) {
  for (std::size_t i = 0; i < count; ++i)
    if (!ck::fits(dsts[i], srcs[i], sizes[i])) return false;
  return true;
}

cudaError_t launch_copy_pieces(void* const* dsts, const void* const* srcs,
                               const std::size_t* sizes, std::size_t count, cudaStream_t stream,
                               std::size_t* launched) {
  *launched = 0;
  for (std::size_t first = 0; first < count; first += ck::max_pieces) {
    const std::size_t n = std::min<std::size_t>(ck::max_pieces, count - first);
    pieces a{};
    std::size_t most = 0;
    for (std::size_t i = 0; i < n; ++i) {
      a.p[i] = piece{static_cast<unsigned char*>(dsts[first + i]),
                     static_cast<const unsigned char*>(srcs[first + i]), sizes[first + i]};
      most = std::max(most, sizes[first + i]);
    }
    void* args[] = {&a};
    // (cudaLaunchKernel returns this launch's error, not an earlier one of this thread)
    const cudaError_t err = cudaLaunchKernel(
        reinterpret_cast<const void*>(&copy_pieces),
        dim3(static_cast<unsigned>(n), ck::blocks_per_piece(most)), dim3(ck::threads), args, 0,
        stream);
    if (err != cudaSuccess) return err;
    *launched = first + n;
  }
  return cudaSuccess;
}

}  // namespace aqua::cuda
