"""Link model: channels (one direction of a link) shared by transfers as a fluid.

Note [Bandwidth sharing]
A transfer first waits out its path's latency (a fixed delay: DMA setup, the first bytes'
flight), then its bytes flow at a rate the network assigns. Each *channel* is one direction
of one link (PCIe device-to-host and host-to-device are two channels; a GPU's NVLink port has
an egress and an ingress channel), so opposite directions never contend. A transfer uses every
channel on its path (GPU->GPU over NVLink: the sender's egress and the receiver's ingress).
Rates are max-min fair (progressive filling): the most contended channel is split equally
among its transfers, those are frozen at that rate, their share is subtracted from every other
channel they cross, and so on. On a single channel this is processor sharing: n transfers
each get bandwidth / n. Rates are recomputed whenever a transfer starts flowing or finishes,
and the next completion is rescheduled; between those instants rates are constant, so
completion times are exact (up to float rounding).

Only the transfers connected to the change (sharing a channel, transitively) are recomputed;
each transfer keeps its bytes-left as of its last rate change and a predicted completion time
in a heap (stale predictions are skipped by a version number). A change thus costs the size of
its component, not of the whole machine.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Sequence

from ..errors import InvalidArgumentError
from .engine import Event, EventEngine

__all__ = ["Channel", "Transfer", "Network"]

class Channel:
    """One direction of a link.

    Parameters
    ----------
    name : str
    bandwidth : float
        Bytes per second.
    latency_s : float
        Added once to every transfer whose path crosses this channel.
    """

    def __init__(self, name: str, bandwidth: float, latency_s: float = 0.0) -> None:
        if not bandwidth > 0 or bandwidth == float("inf"):
            raise InvalidArgumentError(f"channel {name}: bandwidth must be > 0 and finite, "
                                       f"got {bandwidth!r}")
        if not latency_s >= 0:
            raise InvalidArgumentError(f"channel {name}: latency must be >= 0, got {latency_s!r}")
        self.name = name
        self.bandwidth = float(bandwidth)
        self.latency_s = float(latency_s)
        self.bytes_moved = 0   # bytes of completed transfers that crossed this channel

    def __repr__(self) -> str:
        return f"<Channel {self.name} {self.bandwidth / 1e9:.1f} GB/s>"


class Transfer:
    """A copy of ``nbytes`` over ``path``; ``on_done(transfer)`` runs when it completes."""

    __slots__ = ("nbytes", "path", "on_done", "tag", "issued", "started", "finished",
                 "remaining", "rate", "since", "version")

    def __init__(self, nbytes: int, path: tuple[Channel, ...],
                 on_done: Callable[["Transfer"], Any] | None, tag: Any, issued: float) -> None:
        self.nbytes = nbytes
        self.path = path
        self.on_done = on_done
        self.tag = tag
        self.issued = issued
        self.started: float | None = None   # when bytes began to flow (after the latency)
        self.finished: float | None = None
        self.remaining = float(nbytes)      # as of ``since``
        self.rate = 0.0
        self.since = issued
        self.version = 0

    @property
    def duration_s(self) -> float | None:
        """Issue to completion (latency and sharing included)."""
        return None if self.finished is None else self.finished - self.issued

    def __repr__(self) -> str:
        return (f"<Transfer {self.nbytes} B over {'+'.join(c.name for c in self.path)} "
                f"tag={self.tag!r}>")


class Network:
    """The set of channels of one simulated machine and the transfers on them."""

    def __init__(self, engine: EventEngine) -> None:
        self.engine = engine
        self.channels: dict[str, Channel] = {}
        self._users: dict[Channel, dict[Transfer, None]] = {}  # flowing transfers, ordered
        self._heap: list[tuple[float, int, int, Transfer]] = []  # (done at, seq, version, t)
        self._seq = 0
        self._next: Event | None = None

    def add_channel(self, name: str, bandwidth: float, latency_s: float = 0.0) -> Channel:
        if name in self.channels:
            raise InvalidArgumentError(f"channel {name!r} exists already")
        ch = self.channels[name] = Channel(name, bandwidth, latency_s)
        self._users[ch] = {}
        return ch

    def transfer(self, nbytes: int, path: Sequence[Channel | str],
                 on_done: Callable[[Transfer], Any] | None = None, tag: Any = None) -> Transfer:
        """Start copying ``nbytes`` along ``path`` now; returns the transfer."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidArgumentError(f"nbytes must be an int >= 0, got {nbytes!r}")
        chans = tuple(self.channels[c] if isinstance(c, str) else c for c in path)
        if not chans:
            raise InvalidArgumentError("a transfer needs at least one channel")
        t = Transfer(nbytes, chans, on_done, tag, self.engine.now)
        latency = sum(c.latency_s for c in chans)
        self.engine.schedule(latency, self._begin, t, priority=-1)
        return t

    def active(self) -> list[Transfer]:
        """Transfers whose bytes are flowing now (in start order)."""
        seen: dict[Transfer, None] = {}
        for users in self._users.values():
            seen.update(users)
        return sorted(seen, key=lambda t: (t.started, t.issued))

    # -- fluid model ----------------------------------------------------------------------------
    def _begin(self, t: Transfer) -> None:
        t.started = t.since = self.engine.now
        if t.nbytes == 0:
            self._finish(t)
            return
        for c in t.path:
            self._users[c][t] = None
        self._update(t.path)

    def _component(self, seeds: tuple[Channel, ...]) -> list[Transfer]:
        """The flowing transfers connected to ``seeds`` through shared channels."""
        found: dict[Transfer, None] = {}
        todo, seen = list(seeds), set(seeds)
        while todo:
            for t in self._users[todo.pop()]:
                if t not in found:
                    found[t] = None
                    for c in t.path:
                        if c not in seen:
                            seen.add(c)
                            todo.append(c)
        return list(found)

    def _update(self, seeds: tuple[Channel, ...]) -> None:
        now = self.engine.now
        comp = self._component(seeds)
        for t in comp:  # bring bytes-left up to now at the old rate
            t.remaining -= t.rate * (now - t.since)
            t.since = now
        _max_min_rates(comp)
        for t in comp:
            t.version += 1
            self._seq += 1
            heapq.heappush(self._heap, (now + max(0.0, t.remaining) / t.rate, self._seq,
                                        t.version, t))
        self._reschedule()

    def _top(self) -> tuple[float, int, int, Transfer] | None:
        while self._heap and self._heap[0][2] != self._heap[0][3].version:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None

    def _reschedule(self) -> None:
        top = self._top()
        if top is None:
            self.engine.cancel(self._next)
            self._next = None
        elif self._next is None or self._next.time != top[0]:
            self.engine.cancel(self._next)
            self._next = self.engine.schedule_at(top[0], self._complete, priority=-1)

    def _complete(self) -> None:
        self._next = None
        now = self.engine.now
        done: list[Transfer] = []
        while (top := self._top()) is not None and top[0] <= now:
            heapq.heappop(self._heap)
            done.append(top[3])
        touched: dict[Channel, None] = {}
        for t in done:
            t.version += 1
            for c in t.path:
                del self._users[c][t]
                touched[c] = None
        self._update(tuple(touched))
        for t in done:  # callbacks last: they may start new transfers
            self._finish(t)

    def _finish(self, t: Transfer) -> None:
        t.remaining = 0.0
        t.rate = 0.0
        t.finished = self.engine.now
        for c in t.path:
            c.bytes_moved += t.nbytes
        if t.on_done is not None:
            t.on_done(t)


def _max_min_rates(transfers: list[Transfer]) -> None:
    """Max-min fair rates by progressive filling (Note [Bandwidth sharing]). A heap keyed by
    (fair share, channel order) finds the most contended channel; entries go stale when a
    channel's share changes and are skipped (checked against the live share)."""
    capacity: dict[Channel, float] = {}
    count: dict[Channel, int] = {}          # unfrozen transfers per channel
    users: dict[Channel, list[Transfer]] = {}
    order: dict[Channel, int] = {}
    shared = False
    for t in transfers:
        t.rate = -1.0  # unfrozen
        for c in t.path:
            if c not in order:
                order[c] = len(order)
                capacity[c], count[c], users[c] = c.bandwidth, 0, []
            else:
                shared = True
            count[c] += 1
            users[c].append(t)
    if not shared:  # the common case: no channel carries two transfers
        for t in transfers:
            t.rate = min(c.bandwidth for c in t.path)
        return
    heap = [(capacity[c] / count[c], order[c], c) for c in order]
    heapq.heapify(heap)
    while heap:
        share, _, best = heapq.heappop(heap)
        if count[best] == 0 or share != capacity[best] / count[best]:
            continue  # stale entry
        for t in users[best]:
            if t.rate >= 0:
                continue
            t.rate = share
            for c in t.path:
                capacity[c] = max(0.0, capacity[c] - share)
                count[c] -= 1
                if count[c] and c is not best:
                    heapq.heappush(heap, (capacity[c] / count[c], order[c], c))
