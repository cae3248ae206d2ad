// Eviction policies: which handle leaves a full tier first.
//
// The store asks only for an order: before(a, b) is true when a should be evicted before b.
// A handle's priority always comes first (lower priority is evicted first); the policy orders
// handles of equal priority; the store breaks remaining ties by age (older first).
//
//   lru      least recently used first: offloaded or prefetched longest ago. The default; right
//            when recently paged-out state is the likeliest to come back soon.
//   fifo     first offloaded first, ignoring later use. Predictable; right for strict rotations.
//   largest  largest first: frees a contiguous range with the fewest migrations; right when
//            sizes vary a lot and migration count matters more than recency.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace aqua {

struct victim_info {
  std::uint64_t id;
  std::size_t bytes;
  double priority;
  std::uint64_t inserted;  ///< offload order
  std::uint64_t last_use;  ///< offload or prefetch order
};

class eviction_policy {
 public:
  virtual ~eviction_policy() = default;
  virtual std::string name() const = 0;
  /// Strict weak order among handles of equal priority: true if a goes before b.
  virtual bool before(const victim_info& a, const victim_info& b) const noexcept = 0;
};

/// "lru", "fifo" or "largest"; throws invalid_argument_error otherwise.
std::unique_ptr<eviction_policy> make_eviction_policy(const std::string& name);
/// The names make_eviction_policy accepts.
std::vector<std::string> eviction_policy_names();

/// Full order used by the store: priority, then the policy, then age.
bool evict_before(const eviction_policy& p, const victim_info& a, const victim_info& b) noexcept;

}  // namespace aqua
