// Fetch and prefetch: copies from a handle's block back to the caller's memory, in batches
// (one submission per call, one copy group per tier; Note [Submission] in copy_engine.hpp).
// Single fetches and prefetches are batches of one (store.cpp). The stream ordering of both is
// Note [Stream ordering] in store.cpp; a consuming fetch releases the block fenced by every
// touch of it (Note [Block release]).
#include <string>
#include <unordered_set>
#include <utility>

#include "aqua/error.hpp"
#include "aqua/store.hpp"

namespace aqua {

void store::fetch_many(const std::vector<std::uint64_t>& ids, const std::vector<void*>& dsts,
                       stream_t user, bool keep) {
  call_scope call(*this);
  AQUA_EXPECTS(ids.size() == dsts.size(), invalid_argument_error,
               "fetch_many: as many destinations as handles are needed");
  {
    std::unordered_set<std::uint64_t> seen(ids.size() * 2);
    for (std::uint64_t id : ids)
      AQUA_EXPECTS(seen.insert(id).second, invalid_argument_error,
                   "fetch_many: handle " + std::to_string(id) + " is listed twice");
  }
  struct job {
    std::size_t tier;
    event_ref prefetched;
    handle_state was;
  };
  std::vector<job> jobs;
  jobs.reserve(ids.size());
  submission sub;
  sub.user = user;
  sub.fence_user = true;
  std::vector<std::size_t> group_of(tier_count_, submission::no_group);
  {
    std::unique_lock<std::mutex> lock(mutex_);
    claim_all_locked(lock, ids, "fetch");  // every handle is checked before any is claimed
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const entry& e = entries_.at(ids[i]);
      AQUA_EXPECTS(e.nbytes == 0 || e.prefetched || dsts[i] != nullptr, invalid_argument_error,
                   "fetch: null destination pointer");
    }
    for (std::size_t i = 0; i < ids.size(); ++i) {
      entry& e = entries_.at(ids[i]);
      unlist_locked(ids[i], e);
      jobs.push_back(job{e.tier, e.prefetched, e.state});
      e.state = handle_state::fetching;
      if (e.prefetched) {
        sub.user_waits.push_back(e.prefetched);
        continue;
      }
      if (e.nbytes == 0) continue;
      copy_group& g = sub.group_for(group_of, e.tier, lane::demand);
      g.after.push_back(e.done);  // the offload (or migration) that wrote it
      g.ops.push_back(copy_op{dsts[i], e.ptr, e.nbytes});
    }
  }
  std::vector<event_ref> copied;
  try {
    copied = engine_->submit(sub);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (std::size_t i = 0; i < ids.size(); ++i) {  // handles stay valid: blocks were only read
      entry& e = entries_.at(ids[i]);
      e.state = jobs[i].was;
      list_locked(ids[i], e);
    }
    changed_.notify_all();
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    entry& e = entries_.at(ids[i]);
    const job& j = jobs[i];
    event_ref read;
    if (!j.prefetched && e.nbytes > 0) read = copied[group_of[j.tier]];
    ++counters_.fetches;
    if (!j.prefetched) counters_.bytes_fetched += e.nbytes;
    if (keep) {  // the block stays a clean copy (Note [Block release])
      if (read) e.read[demand_read] = read;
      e.prefetched.reset();
      e.state = j.was;
      list_locked(ids[i], e);
      continue;
    }
    std::vector<event_ref> fences = touches(e);
    fences.push_back(read);
    retire_locked(ids[i], e, std::move(fences));
  }
  changed_.notify_all();
}

std::vector<std::size_t> store::prefetch_many(const std::vector<std::uint64_t>& ids,
                                              const std::vector<void*>& dsts, stream_t user) {
  call_scope call(*this);
  AQUA_EXPECTS(ids.size() == dsts.size(), invalid_argument_error,
               "prefetch_many: as many destinations as handles are needed");
  std::vector<std::uint64_t> unique;  // a handle listed twice is prefetched once
  std::vector<void*> unique_dsts;
  {
    std::unordered_set<std::uint64_t> seen(ids.size() * 2);
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (seen.insert(ids[i]).second) {
        unique.push_back(ids[i]);
        unique_dsts.push_back(dsts[i]);
      }
  }
  std::vector<std::size_t> tiers(ids.size());
  std::vector<std::uint64_t> started;
  submission sub;
  sub.user = user;  // the destinations were allocated there: the copies follow it
  std::vector<std::size_t> group_of(tier_count_, submission::no_group);
  {
    std::unique_lock<std::mutex> lock(mutex_);
    claim_all_locked(lock, unique, "prefetch");
    for (std::size_t i = 0; i < unique.size(); ++i) {
      const entry& e = entries_.at(unique[i]);
      AQUA_EXPECTS(e.prefetched || e.nbytes == 0 || unique_dsts[i] != nullptr,
                   invalid_argument_error, "prefetch: null destination pointer");
    }
    for (std::size_t i = 0; i < ids.size(); ++i) tiers[i] = entries_.at(ids[i]).tier;
    for (std::size_t i = 0; i < unique.size(); ++i) {
      entry& e = entries_.at(unique[i]);
      if (e.prefetched || e.nbytes == 0) continue;  // already on its way, or nothing to move
      unlist_locked(unique[i], e);
      e.busy = true;
      started.push_back(unique[i]);
      copy_group& g = sub.group_for(group_of, e.tier, lane::prefetch);
      g.after.push_back(e.done);
      g.ops.push_back(copy_op{unique_dsts[i], e.ptr, e.nbytes});
    }
  }
  std::vector<event_ref> landed;
  try {
    landed = engine_->submit(sub);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (std::uint64_t id : started) {
      entry& e = entries_.at(id);
      e.busy = false;
      list_locked(id, e);
    }
    changed_.notify_all();
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::uint64_t id : started) {
    entry& e = entries_.at(id);
    const event_ref& ev = landed[group_of[e.tier]];
    e.prefetched = ev;  // the user stream waits on it at fetch
    e.read[prefetch_read] = ev;
    e.busy = false;
    e.last_use = clock_++;
    ++counters_.prefetches;
    counters_.bytes_fetched += e.nbytes;
  }
  changed_.notify_all();
  return tiers;
}

}  // namespace aqua
