"""Spilling: when the core's tiers are full, handles of their bottom tier move to a lender, the
lowest priority first, then the least recently offloaded (Note [Remote placement] in
tier.py)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterator

import torch

from ..errors import InvalidHandleError, OffloadError
from . import placement, replicas

if TYPE_CHECKING:
    from .tier import RemoteTier

__all__ = ["could_fit", "spill", "SpillOrder"]


class SpillOrder:
    """The core-held handles in spill order: by priority (lowest first), then oldest first.
    One insertion-ordered dict per distinct priority, so a spill walks only as far as it needs
    (a few priorities, not a sort of every handle). Not thread-safe: the tier's lock guards it.
    """

    def __init__(self) -> None:
        self._prio: dict[int, float] = {}  # id -> its priority
        self._by_prio: dict[float, dict[int, None]] = {}  # priority -> ids, oldest first

    def __setitem__(self, hid: int, prio: float) -> None:
        self.pop(hid)
        self._prio[hid] = prio
        self._by_prio.setdefault(prio, {})[hid] = None

    def pop(self, hid: int, default: object = None) -> object:
        prio = self._prio.pop(hid, None)
        if prio is None:
            return default
        bucket = self._by_prio[prio]
        del bucket[hid]
        if not bucket:
            del self._by_prio[prio]
        return prio

    def __len__(self) -> int:
        return len(self._prio)

    def in_order(self) -> Iterator[tuple[int, float]]:
        """(id, priority), lowest priority first, then oldest, without a copy: nothing may be
        added or popped until the walk ends."""
        for prio in sorted(self._by_prio):
            for hid in self._by_prio[prio]:
                yield hid, prio

    def clear(self) -> None:
        self._prio.clear()
        self._by_prio.clear()


def could_fit(t: "RemoteTier", sizes: list[int]) -> bool:
    """Whether the core's tiers, emptied, could hold the batch (else spilling is no use). The
    capacities are read once and again only after a lend or reclaim changed them (every
    offload asks)."""
    caps = t._capacities
    if caps is None:
        caps = t._capacities = [x["capacity"] for x in t._core.stats()["tiers"]]
    return bool(caps) and sum(sizes) <= sum(caps) and max(sizes, default=0) <= max(caps)


def spill(t: "RemoteTier", need: int, stream: int, exclude: set[int]) -> bool:
    """Move at least ``need`` bytes of the core's bottom tier to a lender; False if none
    could be moved."""
    bottom = t._base - 1
    victims: list[tuple[int, int, int, float]] = []  # (id, core id, bytes, priority)
    total = 0
    gone: list[int] = []
    with t._lock:
        for hid, prio in t._lru.in_order():
            if hid in t._busy or hid in exclude:
                continue
            cid = t._alias.get(hid, hid)
            try:
                state, tier, n, prefetched = t._core.info(cid)
            except InvalidHandleError:  # fetched or freed meanwhile
                gone.append(hid)
                continue
            if tier != bottom or prefetched or n == 0 or state not in ("offloaded",
                                                                        "in_flight"):
                continue
            victims.append((hid, cid, n, prio))
            t._busy.add(hid)
            total += n
            if total >= need:
                break
        for hid in gone:
            t._lru.pop(hid)
    if not victims:
        return False
    from .tier import _Remote  # (tier.py imports this module)

    try:
        try:
            got = _copy(t, victims, total, stream)
        except (OffloadError, TimeoutError):  # nothing moved: they stay in the core
            return False
        client, blocks, where = got[0]
        mirrors = got[1][2] if len(got) > 1 else [None] * len(victims)
        with t._lock:  # remote first: info() of a victim never sees it nowhere
            for (hid, _, n, prio), (b, off), m in zip(victims, where, mirrors):
                t._remote[hid] = _Remote(client, b, n, prio, off,
                                         mirror=m and (got[1][0], m[0], m[1]))
                t._lru.pop(hid, None)
            t._stats["spills"] += 1
            t._stats["spilled_handles"] += len(victims)
            t._stats["spilled_bytes"] += total
        for p in got:
            placement.settled(t, p[0], p[1])
        for hid, cid, _, _ in victims:
            t._core.free(cid)
            with t._lock:
                t._alias.pop(hid, None)
        return True
    finally:
        with t._cv:
            t._busy -= {v[0] for v in victims}
            t._cv.notify_all()


def _copy(t: "RemoteTier", victims: list[tuple[int, int, int, float]], total: int, stream: int
          ) -> list[placement.Placement]:
    """Place the victims and copy them there: the core copies them out (keeping them)
    straight into staging and one write sends them, when one copy fits staging; through a
    temporary buffer otherwise (Note [Replicas]: each copy written from it)."""
    cids, sizes = [v[1] for v in victims], [v[2] for v in victims]
    if t.copies == 1 and total <= t._stage.nbytes:
        got = placement.place(t, sizes)
        try:
            t._stage.write_fetched(got[0], got[2], sizes, lambda ptrs: (
                t._core.fetch_many(cids, ptrs, stream, True)), stream)
        except BaseException:
            placement.discard(t, got, sizes)
            raise
        return [got]
    buf = torch.empty(total, dtype=torch.uint8, device=t.device)
    ptrs = list(itertools.accumulate(sizes, initial=buf.data_ptr()))[:-1]
    t._core.fetch_many(cids, ptrs, stream, True)
    t._stage.sync(stream)
    return replicas.place_and_write(t, sizes, lambda client, where: (
        t._stage.write_from(client, [(b, off, p, n) for (b, off), p, n
                                     in zip(where, ptrs, sizes)], stream)))
