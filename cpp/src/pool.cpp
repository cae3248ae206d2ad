#include "aqua/pool.hpp"

#include <string>

#include "aqua/error.hpp"
#include "aqua/types.hpp"

namespace aqua {

pool::pool(std::size_t capacity) : capacity_(capacity / block_alignment * block_alignment) {
  if (capacity_ > 0) insert_free(0, capacity_);
}

void pool::insert_free(std::size_t offset, std::size_t size) {
  free_by_offset_.emplace(offset, size);
  free_by_size_.emplace(size, offset);
}

void pool::erase_free(std::map<std::size_t, std::size_t>::iterator it) {
  free_by_size_.erase({it->second, it->first});
  free_by_offset_.erase(it);
}

std::optional<std::size_t> pool::allocate(std::size_t bytes) {
  AQUA_EXPECTS(bytes > 0, invalid_argument_error, "pool: cannot allocate 0 bytes");
  if (bytes > capacity_) return std::nullopt;
  const std::size_t size = align_up(bytes, block_alignment);
  // Smallest range that fits; among equals the lowest offset (keeps the low end dense).
  auto fit = free_by_size_.lower_bound({size, 0});
  if (fit == free_by_size_.end()) return std::nullopt;
  const std::size_t offset = fit->second;
  const std::size_t range = fit->first;
  erase_free(free_by_offset_.find(offset));
  if (range > size) insert_free(offset + size, range - size);
  live_.emplace(offset, size);
  used_ += size;
  if (used_ > peak_) peak_ = used_;
  return offset;
}

void pool::release(std::size_t offset) {
  auto it = live_.find(offset);
  AQUA_EXPECTS(it != live_.end(), invalid_argument_error,
               "pool: offset " + std::to_string(offset) + " is not a live block");
  std::size_t start = offset;
  std::size_t size = it->second;
  live_.erase(it);
  used_ -= size;

  auto next = free_by_offset_.lower_bound(offset);
  if (next != free_by_offset_.end() && next->first == start + size) {
    size += next->second;
    erase_free(next);
  }
  auto after = free_by_offset_.lower_bound(start);
  if (after != free_by_offset_.begin()) {
    auto prev = std::prev(after);
    if (prev->first + prev->second == start) {
      start = prev->first;
      size += prev->second;
      erase_free(prev);
    }
  }
  insert_free(start, size);
}

std::size_t pool::block_size(std::size_t offset) const {
  auto it = live_.find(offset);
  return it == live_.end() ? 0 : it->second;
}

pool_stats pool::stats() const {
  pool_stats s;
  s.capacity = capacity_;
  s.used = used_;
  s.peak = peak_;
  s.free = capacity_ - used_;
  s.largest_free = free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first;
  s.blocks = live_.size();
  s.free_ranges = free_by_offset_.size();
  s.fragmentation =
      s.free == 0 ? 0.0 : 1.0 - static_cast<double>(s.largest_free) / static_cast<double>(s.free);
  return s;
}

}  // namespace aqua
