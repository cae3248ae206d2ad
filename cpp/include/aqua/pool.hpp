// Pool: a best-fit suballocator over the segments of one location (a peer GPU, pinned host).
//
// It hands out offsets, not pointers, and owns no memory: the store maps offsets to the memory
// of each segment. That keeps it testable with fake memory (the bindings expose it as
// _core.Pool).
//
// Note [Pool invariants]
//  - Every block offset and size is a multiple of block_alignment (256 B). Requests are rounded
//    up to that and no further: no power-of-two classes, so a 3 GiB + 1 B request costs
//    3 GiB + 256 B.
//  - Segments (one per lend) sit in the offset space with a gap between them, so no block and
//    no free range ever spans two segments. Free ranges never touch: release() coalesces with
//    both neighbours at once.
//  - used + free == capacity at all times (capacity: the sum of the segments' sizes).
//  - A draining segment (being reclaimed) takes no new block: its free ranges are kept out of
//    the best-fit index; once it holds no block and no fence it can be removed.
//  - Not thread-safe: the store serialises every call under its own lock.
//
// Note [Ordered reuse]
// A block whose last copy may still be running is released *with a fence*: a token naming the
// event of that copy. Its bytes are free at once, but whoever is handed any of them later gets
// the fence tokens back from allocate() and must order its own copy after those events (a
// stream wait, no host sync). The store clears a fence once its event has completed. This is
// deferred reuse without ever blocking the host: the device, not the CPU, waits.
// Fence ranges may overlap (bytes re-allocated and released again before an older fence
// cleared). They are indexed by offset within power-of-two size classes (a range of class k is
// shorter than 2^(k+1), which bounds how far before an offset an overlapping range of that
// class can start, whatever the sizes of other classes), and by token, so allocate() and
// clear_fence() cost O(classes * log n + overlaps).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

namespace aqua {

struct pool_stats {
  std::size_t capacity = 0;
  std::size_t used = 0;
  std::size_t peak = 0;
  std::size_t free = 0;
  std::size_t largest_free = 0;  ///< largest block allocate() could hand out now
  std::size_t blocks = 0;        ///< live (allocated) blocks
  std::size_t free_ranges = 0;   ///< number of disjoint free ranges
  std::size_t segments = 0;
  std::size_t fenced = 0;  ///< free bytes whose last copy may still run (Note [Ordered reuse])
  /// 1 - largest_free / free: 0 when all free space is one range (or none is free).
  double fragmentation = 0.0;
};

class pool {
 public:
  /// A pool with one segment of `capacity` bytes (none if 0).
  explicit pool(std::size_t capacity = 0);

  // --- segments ---
  /// Adds a segment of `bytes` (rounded down to 256) and returns its base offset.
  std::size_t add_segment(std::size_t bytes);
  /// Stops handing out blocks from the segment at `base` (the first step of a reclaim).
  void drain_segment(std::size_t base);
  /// Takes a drained segment back into service (a reclaim that failed).
  void undrain_segment(std::size_t base);
  /// Removes the drained segment at `base`; it must hold no block and no fence. Returns its size.
  std::size_t remove_segment(std::size_t base);
  /// Base offsets of the segments, oldest first, with their sizes.
  std::vector<std::pair<std::size_t, std::size_t>> segments() const;
  /// Live blocks (offset, size) inside the segment at `base`.
  std::vector<std::pair<std::size_t, std::size_t>> blocks_in(std::size_t base) const;
  /// The lowest live block inside the segment at `base`, if any (O(log n)).
  std::optional<std::size_t> first_block_in(std::size_t base) const;
  /// Whether any fence overlaps the segment at `base`.
  bool fenced(std::size_t base) const;

  // --- blocks ---
  /// Best-fit block of at least `bytes` (rounded up to 256); nullopt when no range fits. Fence
  /// tokens overlapping the block are appended to `fences` (Note [Ordered reuse]).
  std::optional<std::size_t> allocate(std::size_t bytes,
                                      std::vector<std::uint64_t>* fences = nullptr);
  /// Returns the block at `offset`, fenced by each of `fences` (non-zero tokens). Throws
  /// invalid_argument_error for an offset that is not a live block.
  void release(std::size_t offset, const std::vector<std::uint64_t>& fences = {});
  /// The copy behind `fence` has completed.
  void clear_fence(std::uint64_t fence);
  /// Size of the live block at `offset` (rounded), or 0 if there is none.
  std::size_t block_size(std::size_t offset) const;

  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t used() const noexcept { return used_; }
  pool_stats stats() const;

 private:
  struct segment {
    std::size_t size;
    bool draining;
  };
  struct fence_range {
    std::size_t size;
    std::uint64_t token;
  };
  using fence_map = std::multimap<std::size_t, fence_range>;  // offset -> range
  /// Calls f(range) for every fence overlapping [offset, offset + size).
  template <class F>
  void for_fences(std::size_t offset, std::size_t size, F&& f) const;
  const segment& segment_at(std::size_t offset) const;  // the segment containing offset
  void insert_free(std::size_t offset, std::size_t size);
  void erase_free(std::map<std::size_t, std::size_t>::iterator it);

  std::size_t capacity_ = 0;
  std::size_t used_ = 0;
  std::size_t peak_ = 0;
  std::size_t next_base_ = 0;
  std::map<std::size_t, segment> segments_;                     // base -> segment
  std::map<std::size_t, std::size_t> free_by_offset_;           // offset -> size
  std::set<std::pair<std::size_t, std::size_t>> free_by_size_;  // (size, offset), allocatable
  std::map<std::size_t, std::size_t> live_;                     // offset -> size
  static constexpr int size_classes = 64;
  std::array<fence_map, size_classes> fences_;  // by floor(log2(size))
  std::unordered_map<std::uint64_t, std::vector<std::pair<int, fence_map::iterator>>>
      fences_by_token_;
  std::size_t fenced_bytes_ = 0;
};

}  // namespace aqua
