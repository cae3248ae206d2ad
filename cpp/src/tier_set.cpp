// The notes this file implements are at the top of include/aqua/tier_set.hpp.
#include "aqua/tier_set.hpp"

#include <algorithm>
#include <iterator>

#include "aqua/error.hpp"

namespace aqua {

std::size_t tier_set::add_tier(std::string kind, std::string location, int device) {
  tiers_.push_back(tier{std::move(kind), std::move(location), device, pool(), {}, {},
                        std::set<victim_info, victim_order>(victim_order{&policy_})});
  return tiers_.size() - 1;
}

std::size_t tier_set::add_segment(std::size_t t, std::byte* ptr, std::size_t bytes, bool lent) {
  tier& tr = tiers_.at(t);
  const std::size_t base = tr.blocks.add_segment(bytes);
  tr.segments.emplace(base, lent_memory{ptr, bytes, lent});
  return base;
}

std::optional<std::size_t> tier_set::peer_tier(int device) const {
  for (std::size_t t = 0; t < tiers_.size(); ++t)
    if (tiers_[t].kind == "peer" && tiers_[t].device == device) return t;
  return std::nullopt;
}

tier_stats tier_set::stats(std::size_t t) const {
  const tier& tr = tiers_.at(t);
  std::size_t lent = 0;
  for (const auto& kv : tr.segments) lent += kv.second.lent ? 1 : 0;
  return tier_stats{tr.kind, tr.location, tr.device, tr.blocks.stats(), tr.handles, lent};
}

std::vector<segment_memory> tier_set::take_all() {
  std::vector<segment_memory> out;
  for (tier& tr : tiers_) {
    for (const auto& kv : tr.segments) out.push_back({tr.device, kv.second.ptr, kv.second.bytes});
    tr.segments.clear();
    tr.blocks = pool();
    tr.owner.clear();
    tr.candidates.clear();
    tr.handles = 0;
  }
  fences_.clear();
  token_of_.clear();
  return out;
}

std::optional<placement> tier_set::try_allocate(std::size_t t, std::size_t nbytes,
                                                std::uint64_t owner) {
  tier& tr = tiers_[t];
  std::vector<std::uint64_t> tokens;
  auto offset = tr.blocks.allocate(nbytes, &tokens);
  if (!offset) return std::nullopt;
  auto seg = std::prev(tr.segments.upper_bound(*offset));
  placement p{t, *offset, seg->second.ptr + (*offset - seg->first), {}};
  for (std::uint64_t token : tokens) {
    auto f = fences_.find(token);
    if (f != fences_.end()) p.fences.push_back(f->second);  // else: completed meanwhile
  }
  tr.owner[*offset] = owner;
  return p;
}

void tier_set::release(std::size_t t, std::size_t offset, const std::vector<event_ref>& fences) {
  tier& tr = tiers_[t];
  tr.owner.erase(offset);
  std::vector<std::uint64_t> tokens;
  for (const event_ref& e : fences) {
    if (!e) continue;
    auto [it, fresh] = token_of_.emplace(e.get(), next_token_);
    if (fresh) fences_.emplace(next_token_++, e);
    if (std::find(tokens.begin(), tokens.end(), it->second) == tokens.end())
      tokens.push_back(it->second);
  }
  tr.blocks.release(offset, tokens);
}

std::string tier_set::oom_message(std::size_t nbytes) const {
  std::string msg = "cannot offload " + format_bytes(nbytes) + ": no tier has a free block that large";
  if (tiers_.size() > 1) msg += " and eviction could not make room";
  msg += " (";
  for (std::size_t t = 0; t < tiers_.size(); ++t) {
    const auto s = tiers_[t].blocks.stats();
    if (t) msg += "; ";
    msg += tiers_[t].kind + " " + tiers_[t].location + ": " + format_bytes(s.free) + " free of " +
           format_bytes(s.capacity) + ", largest free block " + format_bytes(s.largest_free);
  }
  return msg + ")";
}

std::optional<std::uint64_t> tier_set::victim(std::size_t t) const {
  const auto& c = tiers_[t].candidates;
  if (c.empty()) return std::nullopt;
  return c.begin()->id;
}

std::vector<std::pair<std::uint64_t, event_ref>> tier_set::fences() const {
  return {fences_.begin(), fences_.end()};
}

void tier_set::clear_fence(std::uint64_t token) {
  auto f = fences_.find(token);
  if (f == fences_.end()) return;  // another reaper was first
  for (tier& tr : tiers_) tr.blocks.clear_fence(token);
  token_of_.erase(f->second.get());
  fences_.erase(f);
}

std::vector<std::size_t> tier_set::newest_segments(std::size_t t, std::size_t want) const {
  std::vector<std::size_t> chosen;
  std::size_t covered = 0;
  const auto& segs = tiers_[t].segments;
  for (auto it = segs.rbegin(); it != segs.rend() && covered < want; ++it) {
    chosen.push_back(it->first);
    covered += it->second.bytes / block_alignment * block_alignment;
  }
  return chosen;
}

void tier_set::drain(std::size_t t, const std::vector<std::size_t>& bases) {
  for (std::size_t base : bases) tiers_[t].blocks.drain_segment(base);
}

void tier_set::undrain(std::size_t t, const std::vector<std::size_t>& bases) {
  for (std::size_t base : bases) tiers_[t].blocks.undrain_segment(base);
}

bool tier_set::fenced(std::size_t t, const std::vector<std::size_t>& bases) const {
  return std::any_of(bases.begin(), bases.end(),
                     [&](std::size_t base) { return tiers_[t].blocks.fenced(base); });
}

std::vector<segment_memory> tier_set::remove(std::size_t t, const std::vector<std::size_t>& bases) {
  tier& tr = tiers_[t];
  std::vector<segment_memory> out;
  for (std::size_t base : bases) {
    tr.blocks.remove_segment(base);
    auto seg = tr.segments.find(base);
    out.push_back({tr.device, seg->second.ptr, seg->second.bytes});
    tr.segments.erase(seg);
  }
  return out;
}

}  // namespace aqua
