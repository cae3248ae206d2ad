// Pool: a best-fit suballocator over one reserved region [0, capacity).
//
// It hands out offsets, not pointers, and owns no memory: the store adds the region's base.
// That keeps it testable with fake memory (the bindings expose it as _core.Pool).
//
// Note [Pool invariants]
//  - Every block offset and size is a multiple of block_alignment (256 B). Requests are rounded
//    up to that and no further: no power-of-two classes, so a 3 GiB + 1 B request costs
//    3 GiB + 256 B.
//  - Free ranges never touch: release() coalesces with both neighbours at once.
//  - used + free == capacity at all times; used counts blocks still awaiting deferred reuse
//    (the store releases a block only once the copies that touched it completed).
//  - Not thread-safe: the store serialises every call under its own lock.
#pragma once

#include <cstddef>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <utility>

namespace aqua {

struct pool_stats {
  std::size_t capacity = 0;
  std::size_t used = 0;
  std::size_t peak = 0;
  std::size_t free = 0;
  std::size_t largest_free = 0;
  std::size_t blocks = 0;       ///< live (allocated) blocks
  std::size_t free_ranges = 0;  ///< number of disjoint free ranges
  /// 1 - largest_free / free: 0 when all free space is one range (or none is free).
  double fragmentation = 0.0;
};

class pool {
 public:
  explicit pool(std::size_t capacity);

  /// Best-fit block of at least `bytes` (rounded up to 256); nullopt when no range fits.
  /// A request of 0 bytes is an error of the caller (the store never makes one).
  std::optional<std::size_t> allocate(std::size_t bytes);
  /// Returns the block at `offset` (exactly as allocate returned it). Throws
  /// invalid_argument_error for an offset that is not a live block.
  void release(std::size_t offset);
  /// Size of the live block at `offset` (rounded), or 0 if there is none.
  std::size_t block_size(std::size_t offset) const;

  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t used() const noexcept { return used_; }
  pool_stats stats() const;

 private:
  void insert_free(std::size_t offset, std::size_t size);
  void erase_free(std::map<std::size_t, std::size_t>::iterator it);

  std::size_t capacity_;
  std::size_t used_ = 0;
  std::size_t peak_ = 0;
  std::map<std::size_t, std::size_t> free_by_offset_;         // offset -> size
  std::set<std::pair<std::size_t, std::size_t>> free_by_size_;  // (size, offset): best fit
  std::map<std::size_t, std::size_t> live_;                     // offset -> size
};

}  // namespace aqua
