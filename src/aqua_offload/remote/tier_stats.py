"""The remote tier's ``stats()``: the core's, with a ``remote`` entry per lender in ``tiers``
and the tier's own counters in ``remote`` (docs/stats.md).

A handle counts in the tier of each lender holding a copy of it (two with ``remote_copies=2``);
a lender's ``used`` is the bytes of the distinct blocks those copies sit in. A handle is *lost*
when no live copy of its bytes is left (``RemoteTier._gone``: a prefetch buffer counts), and
*degraded* when, with two copies asked for, fewer than two live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import replicas

if TYPE_CHECKING:
    from .tier import RemoteTier

__all__ = ["stats"]


def stats(t: "RemoteTier") -> dict[str, Any]:
    """The core's stats, a ``remote`` entry per lender in ``tiers``, and ``remote``."""
    s = t._core.stats()
    with t._lock:
        entries = list(t._remote.values())
        out = dict(t._stats)
        for key, n in t._counts.items():  # the calls on the lenders' handles, as the core's
            s[key] += n
        s["offloads"] += t._stats["direct_offloads"]
    out.update(t._stage.stats)
    copies = [(r.client, r.block) for r in entries] + [r.mirror[:2] for r in entries
                                                       if r.mirror is not None]
    gone = [r for r in entries if t._gone(r)]
    gone_ids = {id(r) for r in gone}
    degraded = sum(1 for r in entries if t.copies > 1 and id(r) not in gone_ids and (
        r.mirror is None or not (replicas.alive(t, r.client)
                                 and replicas.alive(t, r.mirror[0]))))
    remote_tiers = []
    for i, c in enumerate(t.clients):
        mine = [b for ci, b in copies if ci == i]
        blocks = {b.id: b.nbytes for b in mine if b is not None}
        used = sum(blocks.values())
        capacity = int(c.lender.get("arena_bytes", 0))
        remote_tiers.append({
            "tier": "remote", "location": c.address, "capacity": capacity, "used": used,
            "peak": used, "free": max(0, capacity - used), "largest_free": 0,
            "fragmentation": 0.0, "blocks": len(blocks), "free_ranges": 0, "segments": 0,
            "lent_segments": 0, "fenced": 0, "handles": len(mine),
            "lost": c.lost})
    s["tiers"] = list(s["tiers"]) + remote_tiers
    s["live_handles"] += len(entries)  # the core counts only the handles it holds
    with t._lock:
        cached = sum(b.nbytes for bs in t._cache.values() for b in bs)
    out.update(order=t.order, copies=t.copies, cached_bytes=cached,
               lost_handles=len(gone),
               lost_bytes=sum(r.nbytes for r in gone), degraded_handles=degraded,
               lenders=[c.stats() for c in t.clients])
    s["remote"] = out
    return s
