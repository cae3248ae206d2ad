"""Lending device memory to processes of this host through the ledger, driven like a lender.

:class:`LedgerLender` gives :class:`~.elastic.ReserveWatcher` the interface it uses of a NIXL
:class:`~.lender.Lender` (``segment_bytes``, ``grow``, ``reclaim`` returning a ticket with
``nbytes``, ``stats`` with ``arena_bytes``, ``lendable_bytes`` and ``reclaim_pending_bytes``),
but lends through the cross-process lending ledger (:mod:`aqua_offload.lending`): its memory is
leased by ``OffloadManager(..., peers="lent")`` in other processes of this host, not by NIXL
borrowers. ``aqua-offload lend --ledger`` runs one. Nothing here imports NIXL.

Note [Ledger lending]
    - **Offers, not allocations.** An offer is a promise: the consumers allocate leased bytes
      themselves. So the bytes offered but not leased are still free on the device, and a
      free-memory probe counts them: :meth:`LedgerLender.free_memory` subtracts them, so the
      watcher sees what a NIXL lender's arena would hide (otherwise every step would find the
      same spare memory and offer it again).
    - **grow(n)** makes one more :class:`~aqua_offload.lending.Offer` of whole segments (a
      consumer treats every offer on a device alike). **reclaim(n)** lowers the newest offers
      first, rounded up to whole segments, with ``Offer.reclaim(part, timeout=0)``: the offer
      is lowered and the consumers are asked at once, and a ``ReclaimTimeoutError`` only means
      they are still migrating (the reclaim stays in force). So a reclaim never blocks its
      caller on consumers; it waits at most for a collector's slice on the offer's lock.
    - **The collector** thread waits for the consumers' acks in slices of ``SLICE_S``
      (``Offer.wait(timeout=SLICE_S)``, which wakes on each ack), so it never holds an offer
      for long. A ticket is done (its latency recorded) once no offer it lowered has bytes
      pending; a later reclaim of the same offer thus also delays an earlier ticket. Offers
      lowered to nothing are withdrawn once nothing is pending on them.
    - **Latency** is from the reclaim call to the moment the collector saw its last byte
      returned. These reclaims end in ``Offer.wait``, so they are not in the offers' own
      ``Offer.stats()`` latency counters; they are in :meth:`LedgerLender.stats`.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InvalidArgumentError, LedgerError, ReclaimError, ReclaimTimeoutError
from ..lending import Ledger, Offer, offer
from ..lending.devkeys import device_label, resolve_offer_device
from ..sizes import parse_size

__all__ = ["LedgerLender", "LedgerReclaim", "SLICE_S"]

SLICE_S = 0.1  # Note [Ledger lending]: the longest the collector holds one offer


@dataclass
class LedgerReclaim:
    """A reclaim through the ledger: :meth:`wait` returns when the consumers gave it back."""

    id: int
    nbytes: int
    t0: float
    offers: set[int]
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float | None = None

    def wait(self, timeout: float | None = None) -> bool:
        """True when the reclaim completed within ``timeout`` seconds."""
        return self.done.wait(timeout)


class LedgerLender:
    """Device memory lent to processes of this host through the lending ledger.

    Parameters
    ----------
    device : str or int
        ``"cuda:N"`` (emulated device N without a GPU), ``"emu:N"`` or an index; not host
        memory (the ledger lends device memory only).
    nbytes : int or str
        Bytes offered at once (0: none until :meth:`grow`).
    segment_bytes : int or str
        Granule of :meth:`grow` and :meth:`reclaim`.
    ledger : str, optional
        The ledger file (default: ``$AQUA_OFFLOAD_LEDGER`` or the per-user runtime directory).

    Raises
    ------
    InvalidArgumentError
        A bad device or size; nothing is offered.
    LedgerError
        The ledger cannot be used (foreign, corrupt, newer, a bad directory).
    """

    def __init__(self, device: Any, *, nbytes: int | str = 0, segment_bytes: int | str = "64MiB",
                 ledger: str | None = None) -> None:
        if isinstance(device, str) and device.strip().lower() in ("cpu", "host"):
            raise InvalidArgumentError("host memory cannot be lent through the ledger (it lends "
                                       "device memory: 'cuda:N', 'emu:N' or an index)")
        backend, index = resolve_offer_device(device)
        self.device = device_label(backend, index)
        self.emulated = backend == "emulation"
        self.segment_bytes = parse_size(segment_bytes, name="segment_bytes")
        if self.segment_bytes <= 0:
            raise InvalidArgumentError("segment_bytes must be more than 0")
        start = parse_size(nbytes, name="nbytes")
        ledger_obj = Ledger(ledger)
        with ledger_obj.transaction(create=False):  # refuse a bad ledger before offering
            pass
        self.ledger = ledger_obj.path
        # Offers get the caller's argument, not the resolved path: the default ledger's
        # directory is checked to be private only when no path was named.
        self._ledger_arg = ledger
        self._op_lock = threading.Lock()  # one grow / reclaim / close at a time
        self._lock = threading.Lock()  # LOCK: _offers, _tickets, _stats (never held on the ledger)
        self._offers: list[Offer] = []
        self._tickets: dict[int, LedgerReclaim] = {}
        self._ids = itertools.count(1)
        self._stats: dict[str, Any] = {
            "grows": 0, "grown_bytes": 0, "reclaims": 0, "reclaims_done": 0,
            "reclaimed_bytes": 0, "reclaim_last_s": 0.0, "reclaim_max_s": 0.0,
            "reclaim_total_s": 0.0, "consumer_errors": 0, "last_error": None,
            "withdrawn_bytes": 0, "withdraw_s": 0.0, "withdraw_left_bytes": 0}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        if start > 0:
            self._offers.append(offer(self.device, start, ledger=self._ledger_arg))
        self._collector = threading.Thread(target=self._collect, name="aqua-ledger-lend",
                                           daemon=True)
        self._collector.start()

    # -- what the watcher uses -----------------------------------------------------------
    def free_memory(self, device_free: Callable[[], int]) -> Callable[[], int]:
        """A free-memory function for the watcher: ``device_free()`` less the bytes offered
        but not leased (Note [Ledger lending]: they look free on the device but are promised)."""
        def free() -> int:
            return int(device_free()) - sum(s["available"] for s in self._status())
        return free

    def grow(self, nbytes: int) -> int:
        """Offer ``nbytes`` more (rounded down to whole segments); returns the bytes added."""
        n = int(nbytes) // self.segment_bytes * self.segment_bytes
        if n <= 0:
            return 0
        with self._op_lock:
            self._check_open("grow")
            o = offer(self.device, n, ledger=self._ledger_arg)
            with self._lock:
                self._offers.append(o)
                self._stats["grows"] += 1
                self._stats["grown_bytes"] += n
            return n

    def reclaim(self, nbytes: int) -> LedgerReclaim:
        """Lower the offers by at least ``nbytes`` (whole segments, at most what is offered,
        newest offers first) and ask the consumers; returns at once (Note [Ledger lending])."""
        seg = self.segment_bytes
        with self._op_lock:
            self._check_open("reclaim")
            t0 = time.monotonic()
            with self._lock:
                offers = list(self._offers)
            offered = {o.id: o.status()["offered"] for o in offers}
            left = min(-(-int(nbytes) // seg) * seg, sum(offered.values()))
            want, lowered = left, set()
            try:
                for o in reversed(offers):
                    part = min(left, offered[o.id])
                    if part <= 0:
                        continue
                    try:
                        o.reclaim(part, timeout=0)
                    except ReclaimTimeoutError:
                        pass  # asked; the reclaim stays in force and the collector waits
                    except ReclaimError as exc:
                        self._error(exc)
                    lowered.add(o.id)
                    left -= part
                    if left <= 0:
                        break
            finally:  # (a ledger error midway: what was lowered is still waited for)
                ticket = LedgerReclaim(next(self._ids), want - max(left, 0), t0, lowered)
                with self._lock:
                    self._stats["reclaims"] += 1
                    self._tickets[ticket.id] = ticket
                self._wake.set()
            return ticket

    def stats(self) -> dict[str, Any]:
        """Counters and sizes: ``arena_bytes`` (offered plus still held by consumers for a
        pending reclaim), ``lendable_bytes`` (offered now), ``leased_bytes``,
        ``available_bytes`` (offered, not leased), ``reclaim_pending_bytes``, ``offers``,
        ``reclaims_pending``, and the counters of docs/remote.md."""
        status = self._status()
        with self._lock:
            out = dict(self._stats)
            out["reclaims_pending"] = sum(not t.done.is_set() for t in self._tickets.values())
        offered = sum(s["offered"] for s in status)
        pending = sum(s["pending"] for s in status)
        out.update({"offers": len(status), "lendable_bytes": offered,
                    "arena_bytes": offered + pending, "reclaim_pending_bytes": pending,
                    "leased_bytes": sum(s["leased"] for s in status),
                    "available_bytes": sum(s["available"] for s in status)})
        return out

    def counters(self) -> dict[str, Any]:
        """The counters of :meth:`stats` alone (no ledger transaction)."""
        with self._lock:
            return dict(self._stats)

    def offer_ids(self) -> list[int]:
        """Ids of this lender's offers in the ledger now."""
        with self._lock:
            return [o.id for o in self._offers if not o.closed]

    # -- stopping ------------------------------------------------------------------------
    def close(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """Withdraw every offer, waiting up to ``timeout`` s in all for the consumers.

        Every offer is lowered to nothing first, so all consumers migrate at once. Returns
        ``{"withdrawn": bytes taken back, "seconds": s, "left": bytes still with consumers}``;
        offers with bytes left stay in the ledger, asked back in full, and are handed to the
        ledger's recovery when this process exits, unless a later ``close()`` (which waits
        again, for them only) withdraws them first. Nothing else changes after the first call.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        self._collector.join(10)
        with self._op_lock:
            self._closed = True
            t0 = time.monotonic()
            with self._lock:
                offers = [o for o in self._offers if not o.closed]
            got = 0
            for o in offers:  # ask every consumer first
                try:
                    n = o.status()["offered"]
                    if n:
                        got += o.reclaim(n, timeout=0)
                except ReclaimTimeoutError:
                    got += n
                except (ReclaimError, LedgerError) as exc:
                    self._error(exc)
            left = 0
            for o in offers:
                rest = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    o.withdraw(rest)
                except ReclaimTimeoutError as exc:
                    left += exc.pending
                except (ReclaimError, LedgerError) as exc:
                    self._error(exc)
                    left += self._pending_of(o)
            seconds = time.monotonic() - t0
            with self._lock:
                self._offers = [o for o in self._offers if not o.closed]
                self._stats["withdrawn_bytes"] += got
                self._stats.update(withdraw_s=seconds, withdraw_left_bytes=left)
            return {"withdrawn": got, "seconds": seconds, "left": left}

    def __enter__(self) -> "LedgerLender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _status(self) -> list[dict[str, int]]:
        with self._lock:
            offers = list(self._offers)
        return [o.status() for o in offers if not o.closed]

    @staticmethod
    def _pending_of(o: Offer) -> int:
        try:
            return o.status()["pending"]
        except LedgerError:
            return 0

    def _error(self, exc: Exception) -> None:
        with self._lock:
            self._stats["consumer_errors"] += 1
            self._stats["last_error"] = str(exc)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise InvalidArgumentError(f"{what}: this ledger lender of {self.device} is closed")

    def _collect(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                waiting = [t for t in self._tickets.values() if not t.done.is_set()]
                by_id = {o.id: o for o in self._offers}
            if not waiting:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            busy: set[int] = set()
            for oid in sorted(set().union(*(t.offers for t in waiting))):
                o = by_id.get(oid)
                if o is None or self._stop.is_set():
                    continue
                try:
                    o.wait(timeout=SLICE_S)  # an offer withdrawn meanwhile returns at once
                except ReclaimTimeoutError:
                    busy.add(oid)
                except (ReclaimError, LedgerError) as exc:
                    self._error(exc)
                    busy.add(oid)
                    self._stop.wait(SLICE_S)  # it keeps retrying; do not spin on it
            now = time.monotonic()
            with self._lock:
                for t in waiting:
                    if not t.offers & busy:
                        t.seconds = now - t.t0
                        st = self._stats
                        st["reclaims_done"] += 1
                        st["reclaimed_bytes"] += t.nbytes
                        st["reclaim_last_s"] = t.seconds
                        st["reclaim_max_s"] = max(st["reclaim_max_s"], t.seconds)
                        st["reclaim_total_s"] += t.seconds
                        del self._tickets[t.id]
                        t.done.set()
            self._drop_empty()

    def _drop_empty(self) -> None:
        """Withdraw offers lowered to nothing once nothing is pending on them."""
        if not self._op_lock.acquire(blocking=False):
            return  # a grow or reclaim is running: next round
        try:
            if self._closed:
                return
            with self._lock:
                offers = list(self._offers)
                wanted = set().union(*(t.offers for t in self._tickets.values()))
            for o in offers:
                if o.closed or o.id in wanted:
                    continue
                try:
                    s = o.status()
                    if s["offered"] == 0 and s["pending"] == 0:
                        o.withdraw(0)
                except (ReclaimTimeoutError, ReclaimError, LedgerError):
                    continue
            with self._lock:
                self._offers = [o for o in self._offers if not o.closed]
        finally:
            self._op_lock.release()
