#include "aqua/pool.hpp"

#include <algorithm>
#include <string>

#include "aqua/error.hpp"
#include "aqua/types.hpp"

namespace aqua {

pool::pool(std::size_t capacity) {
  if (capacity >= block_alignment) add_segment(capacity);
}

std::size_t pool::add_segment(std::size_t bytes) {
  const std::size_t size = bytes / block_alignment * block_alignment;
  AQUA_EXPECTS(size > 0, invalid_argument_error,
               "pool: a segment must hold at least one 256-byte block");
  const std::size_t base = next_base_;
  next_base_ = base + size + block_alignment;  // the gap keeps segments from coalescing
  segments_.emplace(base, segment{size, false});
  capacity_ += size;
  insert_free(base, size);
  return base;
}

const pool::segment& pool::segment_at(std::size_t offset) const {
  auto it = segments_.upper_bound(offset);
  AQUA_EXPECTS(it != segments_.begin(), invalid_argument_error, "pool: offset outside every segment");
  --it;
  AQUA_EXPECTS(offset < it->first + it->second.size, invalid_argument_error,
               "pool: offset outside every segment");
  return it->second;
}

void pool::drain_segment(std::size_t base) {
  auto it = segments_.find(base);
  AQUA_EXPECTS(it != segments_.end(), invalid_argument_error,
               "pool: no segment at offset " + std::to_string(base));
  if (it->second.draining) return;
  it->second.draining = true;
  // Pull its free ranges out of the best-fit index (they stay in free_by_offset_ to coalesce).
  for (auto f = free_by_offset_.lower_bound(base);
       f != free_by_offset_.end() && f->first < base + it->second.size; ++f)
    free_by_size_.erase({f->second, f->first});
}

void pool::undrain_segment(std::size_t base) {
  auto it = segments_.find(base);
  AQUA_EXPECTS(it != segments_.end(), invalid_argument_error,
               "pool: no segment at offset " + std::to_string(base));
  if (!it->second.draining) return;
  it->second.draining = false;
  for (auto f = free_by_offset_.lower_bound(base);
       f != free_by_offset_.end() && f->first < base + it->second.size; ++f)
    free_by_size_.emplace(f->second, f->first);
}

std::size_t pool::remove_segment(std::size_t base) {
  auto it = segments_.find(base);
  AQUA_EXPECTS(it != segments_.end() && it->second.draining, invalid_argument_error,
               "pool: segment at offset " + std::to_string(base) + " is not draining");
  const std::size_t size = it->second.size;
  AQUA_EXPECTS(blocks_in(base).empty() && !fenced(base), invalid_argument_error,
               "pool: segment at offset " + std::to_string(base) + " is still in use");
  auto f = free_by_offset_.find(base);
  AQUA_EXPECTS(f != free_by_offset_.end() && f->second == size, invalid_argument_error,
               "pool: segment free list is inconsistent");
  free_by_offset_.erase(f);
  segments_.erase(it);
  capacity_ -= size;
  return size;
}

std::vector<std::pair<std::size_t, std::size_t>> pool::segments() const {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  for (const auto& [base, s] : segments_) out.emplace_back(base, s.size);
  return out;
}

std::vector<std::pair<std::size_t, std::size_t>> pool::blocks_in(std::size_t base) const {
  auto it = segments_.find(base);
  AQUA_EXPECTS(it != segments_.end(), invalid_argument_error,
               "pool: no segment at offset " + std::to_string(base));
  std::vector<std::pair<std::size_t, std::size_t>> out;
  for (auto b = live_.lower_bound(base); b != live_.end() && b->first < base + it->second.size; ++b)
    out.emplace_back(b->first, b->second);
  return out;
}

namespace {
int size_class(std::size_t size) { return 63 - __builtin_clzll(static_cast<unsigned long long>(size)); }
}  // namespace

template <class F>
void pool::for_fences(std::size_t offset, std::size_t size, F&& f) const {
  for (int k = 0; k < size_classes; ++k) {
    const fence_map& m = fences_[k];
    if (m.empty()) continue;
    const std::size_t reach = std::size_t{2} << k;  // no range of class k starting before this
    auto it = m.lower_bound(offset >= reach ? offset - reach + 1 : 0);  // overlaps the query
    for (; it != m.end() && it->first < offset + size; ++it)
      if (it->first + it->second.size > offset) f(it->second);
  }
}

std::optional<std::size_t> pool::first_block_in(std::size_t base) const {
  auto it = segments_.find(base);
  AQUA_EXPECTS(it != segments_.end(), invalid_argument_error,
               "pool: no segment at offset " + std::to_string(base));
  auto b = live_.lower_bound(base);
  if (b == live_.end() || b->first >= base + it->second.size) return std::nullopt;
  return b->first;
}

bool pool::fenced(std::size_t base) const {
  auto it = segments_.find(base);
  if (it == segments_.end()) return false;
  bool any = false;
  for_fences(base, it->second.size, [&](const fence_range&) { any = true; });
  return any;
}

void pool::insert_free(std::size_t offset, std::size_t size) {
  free_by_offset_.emplace(offset, size);
  if (!segment_at(offset).draining) free_by_size_.emplace(size, offset);
}

void pool::erase_free(std::map<std::size_t, std::size_t>::iterator it) {
  free_by_size_.erase({it->second, it->first});  // no-op for ranges of draining segments
  free_by_offset_.erase(it);
}

std::optional<std::size_t> pool::allocate(std::size_t bytes, std::vector<std::uint64_t>* fences) {
  AQUA_EXPECTS(bytes > 0, invalid_argument_error, "pool: cannot allocate 0 bytes");
  if (bytes > capacity_) return std::nullopt;  // also keeps align_up below from wrapping
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
  if (fences) for_fences(offset, size, [&](const fence_range& f) { fences->push_back(f.token); });
  return offset;
}

void pool::release(std::size_t offset, const std::vector<std::uint64_t>& fences) {
  auto it = live_.find(offset);
  AQUA_EXPECTS(it != live_.end(), invalid_argument_error,
               "pool: offset " + std::to_string(offset) + " is not a live block");
  std::size_t start = offset;
  std::size_t size = it->second;
  live_.erase(it);
  used_ -= size;
  for (std::uint64_t token : fences) {
    if (token == 0) continue;
    const int k = size_class(size);
    fences_by_token_[token].emplace_back(k, fences_[k].emplace(offset, fence_range{size, token}));
    fenced_bytes_ += size;
  }

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

void pool::clear_fence(std::uint64_t fence) {
  auto found = fences_by_token_.find(fence);
  if (found == fences_by_token_.end()) return;
  for (auto [k, it] : found->second) {
    fenced_bytes_ -= it->second.size;
    fences_[k].erase(it);
  }
  fences_by_token_.erase(found);
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
  s.segments = segments_.size();
  s.fenced = fenced_bytes_;
  s.fragmentation =
      s.free == 0 ? 0.0 : 1.0 - static_cast<double>(s.largest_free) / static_cast<double>(s.free);
  return s;
}

}  // namespace aqua
