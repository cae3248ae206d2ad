#include "aqua/eviction_policy.hpp"

#include "aqua/error.hpp"

namespace aqua {

namespace {

class lru final : public eviction_policy {
 public:
  std::string name() const override { return "lru"; }
  bool before(const victim_info& a, const victim_info& b) const noexcept override {
    return a.last_use < b.last_use;
  }
};

class fifo final : public eviction_policy {
 public:
  std::string name() const override { return "fifo"; }
  bool before(const victim_info& a, const victim_info& b) const noexcept override {
    return a.inserted < b.inserted;
  }
};

class largest final : public eviction_policy {
 public:
  std::string name() const override { return "largest"; }
  bool before(const victim_info& a, const victim_info& b) const noexcept override {
    return a.bytes > b.bytes;
  }
};

}  // namespace

std::vector<std::string> eviction_policy_names() { return {"lru", "fifo", "largest"}; }

std::unique_ptr<eviction_policy> make_eviction_policy(const std::string& name) {
  if (name == "lru") return std::make_unique<lru>();
  if (name == "fifo") return std::make_unique<fifo>();
  if (name == "largest") return std::make_unique<largest>();
  throw invalid_argument_error("unknown eviction policy '" + name +
                               "' (available: lru, fifo, largest)");
}

bool evict_before(const eviction_policy& p, const victim_info& a, const victim_info& b) noexcept {
  if (a.priority != b.priority) return a.priority < b.priority;
  if (p.before(a, b)) return true;
  if (p.before(b, a)) return false;
  return a.inserted < b.inserted;
}

}  // namespace aqua
