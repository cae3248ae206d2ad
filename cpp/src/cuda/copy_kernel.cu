// The notes this file implements are at the top of copy_kernel.hpp.
#include <algorithm>
#include <cstdint>

#include "cuda/copy_kernel.hpp"

namespace aqua::cuda {

namespace {

constexpr int max_pieces = 128;  // per launch: 3 KiB of parameters (every arch takes 4 KiB)
constexpr int threads = 256;
constexpr std::size_t bytes_per_block = 64 << 10;  // a piece gets a block per 64 KiB, up to 16

struct piece {
  unsigned char* dst;
  const unsigned char* src;
  std::size_t bytes;
};

struct pieces {
  piece p[max_pieces];
};

__global__ void copy_pieces(const __grid_constant__ pieces a) {  // (read in place: no copy)
  const piece pc = a.p[blockIdx.x];
  const std::size_t first = static_cast<std::size_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const std::size_t stride = static_cast<std::size_t>(gridDim.y) * blockDim.x;
  const auto d = reinterpret_cast<std::uintptr_t>(pc.dst);
  const auto s = reinterpret_cast<std::uintptr_t>(pc.src);
  std::size_t done = 0;
  if (((d | s) & 15) == 0) {
    const std::size_t units = pc.bytes / 16;
    auto* d16 = reinterpret_cast<uint4*>(pc.dst);
    const auto* s16 = reinterpret_cast<const uint4*>(pc.src);
    for (std::size_t i = first; i < units; i += stride) d16[i] = s16[i];
    done = units * 16;
  }
  for (std::size_t i = done + first; i < pc.bytes; i += stride) pc.dst[i] = pc.src[i];
}

}  // namespace

cudaError_t launch_copy_pieces(void* const* dsts, const void* const* srcs,
                               const std::size_t* sizes, std::size_t count, cudaStream_t stream) {
  for (std::size_t first = 0; first < count; first += max_pieces) {
    const std::size_t n = std::min<std::size_t>(max_pieces, count - first);
    pieces a{};
    std::size_t most = 0;
    for (std::size_t i = 0; i < n; ++i) {
      a.p[i] = piece{static_cast<unsigned char*>(dsts[first + i]),
                     static_cast<const unsigned char*>(srcs[first + i]), sizes[first + i]};
      most = std::max(most, sizes[first + i]);
    }
    const auto per_piece = static_cast<unsigned>(
        std::clamp<std::size_t>((most + bytes_per_block - 1) / bytes_per_block, 1, 16));
    copy_pieces<<<dim3(static_cast<unsigned>(n), per_piece), threads, 0, stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace aqua::cuda
