// What one thread of the copy kernel does (Note [Copy kernel] in copy_kernel.hpp), in a header
// with no CUDA dependency: the kernel runs it on the device, and the core's test hook
// (_core._copy_kernel_on_host) runs every thread of a launch on the host, so the arithmetic of
// the head, the unrolled body and the tail is checked bitwise where no GPU is.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define AQUA_HOST_DEVICE __host__ __device__
#else
#define AQUA_HOST_DEVICE
#endif

namespace aqua::kernel_copy {

constexpr std::size_t max_piece = std::size_t{1} << 20;  ///< larger pieces go to DMA
constexpr std::size_t max_pieces = 128;  ///< per launch: 3 KiB of parameters (4 KiB allowed)
constexpr unsigned threads = 256;
constexpr std::size_t bytes_per_block = 64 << 10;  ///< a piece gets a block per 64 KiB...
constexpr std::size_t max_blocks_per_piece = 16;   ///< ...up to 16

/// Blocks per piece of a launch whose largest piece is `most` bytes.
inline unsigned blocks_per_piece(std::size_t most) {
  const std::size_t b = (most + bytes_per_block - 1) / bytes_per_block;
  return static_cast<unsigned>(b < 1 ? 1 : b > max_blocks_per_piece ? max_blocks_per_piece : b);
}

/// Whether the kernel takes a piece: at most `max_piece`, dst and src equally aligned modulo 16.
inline bool fits(const void* dst, const void* src, std::size_t bytes) {
  const auto d = reinterpret_cast<std::uintptr_t>(dst);
  const auto s = reinterpret_cast<std::uintptr_t>(src);
  return bytes <= max_piece && ((d ^ s) & 15) == 0;
}

/// Thread `first` of `stride` threads copying one piece that fits: a byte head up to the
/// 16-byte boundary, the body in 16-byte units `V` with four loads in flight before their
/// stores (reads over PCIe or NVLink take a microsecond or two each), a byte tail.
template <class V>
AQUA_HOST_DEVICE inline void copy_part(unsigned char* dst, const unsigned char* src,
                                       std::size_t bytes, std::size_t first, std::size_t stride) {
  const std::size_t to_edge = (16 - (reinterpret_cast<std::uintptr_t>(dst) & 15)) & 15;
  const std::size_t head = to_edge < bytes ? to_edge : bytes;
  if (first < head) dst[first] = src[first];
  const std::size_t units = (bytes - head) / 16;
  V* d16 = reinterpret_cast<V*>(dst + head);
  const V* s16 = reinterpret_cast<const V*>(src + head);
  std::size_t i = first;
  for (; i + 3 * stride < units; i += 4 * stride) {
    const V v0 = s16[i], v1 = s16[i + stride], v2 = s16[i + 2 * stride], v3 = s16[i + 3 * stride];
    d16[i] = v0;
    d16[i + stride] = v1;
    d16[i + 2 * stride] = v2;
    d16[i + 3 * stride] = v3;
  }
  for (; i < units; i += stride) d16[i] = s16[i];
  const std::size_t done = head + units * 16;
  if (done + first < bytes) dst[done + first] = src[done + first];  // the tail is < 16 bytes
}

}  // namespace aqua::kernel_copy
