"""The producer side: offer spare device memory to other processes, and take it back.

Note [Reclaim protocol]
``reclaim(n)`` lowers the offer by ``n`` in one transaction and asks the consumers holding more
than the offer now covers for the excess (state.py, Note [Accounting]); no new lease can come
from the offer meanwhile. The consumers' background threads wake on a datagram, migrate their
data down a tier, shrink their leases in the ledger and send an ack; each ack wakes the producer,
which re-reads the ledger, and the reclaim is complete once the leases fit the offer. If the
unleased part already covers ``n``, nothing is asked and the call returns at once. A consumer
that dies mid-reclaim is recovered by the next transaction (its memory died with it), so the
producer also re-reads the ledger every ``LIVENESS_SLICE_S`` while waiting: a fallback for
deaths, not the normal path. On a timeout the reclaim stays in force (the offer stays lowered,
consumers keep returning) and :meth:`Offer.wait` waits for the rest.

Latency = from the call to the moment the producer sees the last byte returned.

Note [Offers and fork]
An offer belongs to the process that made it (its pid is in the ledger). A forked child
inherits the object, the ``_open`` set and the atexit handler, but not the promise: the child
must neither reclaim nor withdraw it, and its exit must not orphan the parent's offer. So every
offer records its owner pid; in another pid it reads as closed (``status()`` all zeros),
``reclaim``/``withdraw`` refuse, ``wait`` returns, and :meth:`Offer._abandon` does nothing. ``os.register_at_fork`` also empties ``_open`` in the child
and closes the child's copy of the socket (without unlinking it: the parent still listens).

Note [Abandon at exit]
At exit, open offers are orphaned (state.py, Note [Recovery]) without waiting. A daemon thread
may still be blocked in :meth:`Offer.reclaim` / :meth:`Offer.wait`, holding the offer's lock
for as long as the consumers take: the handler waits at most ``ABANDON_LOCK_S`` for it, then
orphans the offer anyway (the transaction itself is serialised by the ledger; the blocked
thread then finds its offer gone, which at exit nobody sees).
"""

from __future__ import annotations

import atexit
import math
import numbers
import os
import threading
import time
from typing import Any

from ..errors import InvalidArgumentError, LedgerError, ReclaimError, ReclaimTimeoutError
from ..sizes import format_size, parse_size
from . import notify
from .devkeys import device_key, device_label, resolve_offer_device
from .ledger import Ledger
from .liveness import identity

__all__ = ["Offer", "offer", "stats"]

LIVENESS_SLICE_S = 0.5
ABANDON_LOCK_S = 1.0  # Note [Abandon at exit]
# Strong references: an offer lives in the ledger until withdrawn, so its object (the only way to
# reclaim it) must not vanish with the caller's last reference; at exit it is abandoned.
_open: "set[Offer]" = set()
_totals = {"reclaims": 0, "bytes_reclaimed": 0, "reclaim_last_s": 0.0, "reclaim_max_s": 0.0,
           "reclaim_total_s": 0.0}
_totals_lock = threading.Lock()


def offer(device: Any, nbytes: int | str, *, ledger: str | None = None) -> "Offer":
    """Offer ``nbytes`` of ``device`` to consumers in other processes.

    The memory is not touched: this process promises not to use it until it takes it back
    with :meth:`Offer.reclaim` or :meth:`Offer.withdraw`; consumers allocate it themselves.

    Parameters
    ----------
    device : str, int or torch.device
        ``"cuda:N"`` (emulated device N without a GPU), ``"emu:N"`` or an index.
    nbytes : int or str
        Bytes offered (``"8GiB"``), more than 0.
    ledger : str, optional
        The ledger file (default: ``$AQUA_OFFLOAD_LEDGER`` or the per-user runtime directory).

    Raises
    ------
    InvalidArgumentError
        A bad device or size, or more than the GPU holds with the other offers on it.
    LedgerError
        The ledger is foreign, corrupt, newer or cannot be locked.
    """
    return Offer(device, nbytes, ledger=ledger)


class Offer:
    """An offer of device memory in the lending ledger (see :func:`offer`)."""

    def __init__(self, device: Any, nbytes: int | str, *, ledger: str | None = None) -> None:
        backend, index = resolve_offer_device(device)
        n = parse_size(nbytes, name="offer nbytes")
        if n <= 0:
            raise InvalidArgumentError(f"offer: nbytes must be more than 0, got {nbytes!r}")
        self.backend = backend
        self.device = device_label(backend, index)
        self.key = device_key(backend, index)
        self._ledger = Ledger(ledger)
        self._lock = threading.RLock()  # one reclaim/withdraw of this offer at a time
        self._closed = False
        self._pid = os.getpid()  # Note [Offers and fork]
        self._stats = {"reclaims": 0, "bytes_reclaimed": 0, "reclaim_last_s": 0.0,
                       "reclaim_max_s": 0.0, "reclaim_total_s": 0.0, "reclaim_last_consumers": 0,
                       "reclaim_last_asked": 0}
        limit = _device_total(backend, index)
        self._endpoint = notify.Endpoint(self._ledger.directory, "producer")
        try:
            me = identity()
            with self._ledger.transaction() as st:
                if limit is not None:
                    others = sum(o["bytes"] + st.pending(o) for o in st.offers if o["key"] == self.key)
                    if others + n > limit:
                        raise InvalidArgumentError(
                            f"offer: {format_size(n)} on {self.device} plus {format_size(others)} "
                            f"already offered there exceeds its {format_size(limit)}")
                self.id = st.new_id()
                st.offers.append({"id": self.id, "pid": me.pid, "start": me.start, "ns": me.ns,
                                  "sock": self._endpoint.address, "backend": backend,
                                  "key": self.key, "label": self.device, "bytes": n,
                                  "state": "live", "since": time.time(), "reclaim": None})
                st.notify_consumers(self.key, notify.WAKE_OFFER)
        except BaseException:
            self._endpoint.close()
            raise
        _open.add(self)

    # -- queries -------------------------------------------------------------------------
    def _find(self, st: Any) -> dict[str, Any] | None:
        """This offer's entry; the socket tells it from another process's offer that got our
        id in a ledger that was removed and made again."""
        entry = st.find("offers", self.id)
        return entry if entry is not None and entry["sock"] == self._endpoint.address else None

    def _entry(self, st: Any) -> dict[str, Any]:
        entry = self._find(st)
        if entry is None or entry["state"] != "live":
            raise LedgerError(f"lending ledger {self._ledger.path}: offer #{self.id} of this "
                              "process is gone (was the ledger file removed or replaced?)",
                              path=self._ledger.path, reason="missing")
        return entry

    @property
    def closed(self) -> bool:
        """Withdrawn, abandoned, or inherited by a forked child (Note [Offers and fork])."""
        return self._closed or os.getpid() != self._pid

    def status(self) -> dict[str, int]:
        """``offered`` (bytes promised now), ``leased`` (held by consumers), ``available``
        (unleased), ``pending`` (still to be returned by a pending reclaim)."""
        if self.closed:
            return {"offered": 0, "leased": 0, "available": 0, "pending": 0}
        with self._ledger.transaction() as st:
            if self._closed:
                return {"offered": 0, "leased": 0, "available": 0, "pending": 0}
            o = self._entry(st)
            return {"offered": o["bytes"], "leased": st.leased(self.id),
                    "available": st.available(o), "pending": st.pending(o)}

    def stats(self) -> dict[str, Any]:
        """The offer's :meth:`status` plus reclaim counters: ``reclaims``, ``bytes_reclaimed``,
        ``reclaim_last_s`` / ``reclaim_max_s`` / ``reclaim_total_s`` (latency from the call to
        the last consumer's return), ``reclaim_last_consumers`` (consumers asked),
        ``reclaim_last_asked`` (bytes asked of them; 0 when the unleased part covered it)."""
        return {"id": self.id, "device": self.device, "closed": self.closed, **self.status(),
                **self._stats}

    # -- taking memory back --------------------------------------------------------------
    def reclaim(self, nbytes: int | str | None = None, timeout: float | None = None) -> int:
        """Take ``nbytes`` of the offer back (all of it when None); block until the consumers
        have migrated their data off and returned the memory.

        Parameters
        ----------
        nbytes : int, str or None
            Bytes to take back (``"8GiB"``); None: all that is offered.
        timeout : float, optional
            Seconds to wait for the consumers (0: do not wait); None or ``math.inf``: no limit.

        Returns
        -------
        int
            Bytes this process may use again (``nbytes``). Consumers return whole segments,
            so they may free more; the surplus stays offered (see ``stats()``).

        Raises
        ------
        InvalidArgumentError
            0 bytes, more than offered, a bad ``timeout`` (negative, NaN, not a number), or a
            withdrawn offer; nothing changed.
        ReclaimTimeoutError
            Not done within ``timeout`` s: the reclaim stays in force, ``pending`` bytes are
            still with consumers; :meth:`wait` waits for them.
        ReclaimError
            A consumer reported that it cannot return the memory (its lower tiers are full);
            it keeps retrying, the reclaim stays in force.
        """
        # Every argument is checked before the offer is lowered: a bad one changes nothing.
        timeout = check_timeout(timeout, "reclaim")
        if nbytes is not None:
            n = parse_size(nbytes, name="reclaim nbytes")
            if n <= 0:
                raise InvalidArgumentError("reclaim: nbytes must be more than 0 (or None for all)")
        self._check_open("reclaim")  # (before the lock: a forked child's copy may be held)
        with self._lock:
            self._check_open("reclaim")
            t0 = time.monotonic()
            with self._ledger.transaction() as st:
                o = self._entry(st)
                n = o["bytes"] if nbytes is None else n
                if n > o["bytes"]:
                    raise InvalidArgumentError(
                        f"reclaim: {format_size(n)} asked but offer #{self.id} on {self.device} "
                        f"holds only {format_size(o['bytes'])}; nothing changed")
                o["bytes"] -= n
                mine = [le for le in st.leases if le["offer"] == self.id]
                # A reclaim that timed out already asked for part of the excess.
                asked = st.ask_return(o, st.pending(o) - sum(le["return"] for le in mine), t0)
                consumers = {le["consumer"] for le in mine if le["return"] > 0}
                waiting = st.pending(o) > 0
                if waiting:
                    old = o.get("reclaim")
                    o["reclaim"] = {"bytes": n + (old["bytes"] if old else 0),
                                    "t0": old["t0"] if old else t0, "wall": time.time()}
            self._stats["reclaim_last_consumers"] = len(consumers)
            self._stats["reclaim_last_asked"] = asked
            if waiting:
                self._wait(t0, None if timeout is None else t0 + timeout)
            self._record(n, time.monotonic() - t0)
            return n

    def wait(self, timeout: float | None = None) -> None:
        """Wait until a pending reclaim (one that timed out) is complete (``timeout`` as for
        :meth:`reclaim`)."""
        timeout = check_timeout(timeout, "wait")
        if self.closed:
            return
        with self._lock:
            if not self._closed:
                self._wait(time.monotonic(), None if timeout is None else time.monotonic() + timeout)

    def _wait(self, t0: float, deadline: float | None) -> None:
        while True:
            with self._ledger.transaction() as st:
                o = self._entry(st)
                pending = st.pending(o)
                errors = [le["error"] for le in st.leases if le["offer"] == self.id
                          and le.get("error") and (le.get("error_t") or 0) >= t0]
                if pending == 0:
                    o["reclaim"] = None
                    return
            if errors:
                raise ReclaimError(f"reclaim on {self.device}: a consumer cannot return "
                                   f"{format_size(pending)}: {errors[0]}; it keeps retrying")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise ReclaimTimeoutError(
                    f"reclaim on {self.device}: {format_size(pending)} still held by consumers "
                    f"after {now - t0:.3f} s; the reclaim stays in force (Offer.wait)",
                    pending=pending)
            left = LIVENESS_SLICE_S if deadline is None else min(LIVENESS_SLICE_S, deadline - now)
            self._endpoint.wait(left)  # an ack, or a slice to notice a consumer's death

    def _record(self, n: int, seconds: float) -> None:
        for d, lock in ((self._stats, self._lock), (_totals, _totals_lock)):
            with lock:
                d["reclaims"] += 1
                d["bytes_reclaimed"] += n
                d["reclaim_last_s"] = seconds
                d["reclaim_max_s"] = max(d["reclaim_max_s"], seconds)
                d["reclaim_total_s"] += seconds

    def withdraw(self, timeout: float | None = None) -> int:
        """Reclaim everything still offered, then remove the offer from the ledger.

        Returns
        -------
        int
            Bytes taken back by this call.

        Raises
        ------
        InvalidArgumentError
            A bad ``timeout`` (as for :meth:`reclaim`) or an offer already withdrawn; nothing
            changed.
        """
        timeout = check_timeout(timeout, "withdraw")
        self._check_open("withdraw")
        with self._lock:
            self._check_open("withdraw")
            left = self.status()["offered"]
            got = self.reclaim(None, timeout) if left else 0
            if not left:
                self._wait(time.monotonic(), None if timeout is None else time.monotonic() + timeout)
            with self._ledger.transaction() as st:
                st.offers.remove(self._entry(st))
            self._close()
            return got

    def _abandon(self) -> None:
        """At exit: hand the offer to recovery, as if this process had died (no waiting); in
        a forked child, nothing (Notes [Offers and fork], [Abandon at exit])."""
        if os.getpid() != self._pid or self._closed:
            return
        locked = self._lock.acquire(timeout=ABANDON_LOCK_S)
        try:
            if self._closed:
                return
            try:
                with self._ledger.transaction() as st:
                    o = self._find(st)
                    if o is not None and o["state"] == "live":
                        st.orphan(o, "exited")
            finally:
                self._close()
        finally:
            if locked:
                self._lock.release()

    def _close(self) -> None:
        self._closed = True
        self._endpoint.close()
        _open.discard(self)

    def _detach(self) -> None:
        """In a forked child (Note [Offers and fork]): forget the parent's offer, touching
        neither the ledger nor the socket's name; no lock (a parent thread may hold it)."""
        self._closed = True
        self._endpoint.forget()

    def _check_open(self, what: str) -> None:
        if os.getpid() != self._pid:
            raise InvalidArgumentError(f"{what}: offer #{self.id} on {self.device} belongs to "
                                       f"process {self._pid}; this forked child cannot use it")
        if self._closed:
            raise InvalidArgumentError(f"{what}: offer #{self.id} on {self.device} was already "
                                       "withdrawn")

    def __enter__(self) -> "Offer":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.withdraw()

    def __repr__(self) -> str:
        state = "withdrawn" if self.closed else "open"
        return f"<aqua_offload.lending.Offer #{self.id} {self.device} {state}>"


def check_timeout(timeout: Any, what: str) -> float | None:
    """A timeout in seconds: None (no limit), or a real number >= 0; ``math.inf`` reads as None.
    Anything else (a string, a bool, NaN, a negative number) is an :class:`InvalidArgumentError`
    raised before anything is done."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise InvalidArgumentError(f"{what}: timeout must be a number of seconds or None, got "
                                   f"{type(timeout).__name__} {_show(timeout)}")
    try:
        seconds = float(timeout)
    except (OverflowError, TypeError, ValueError):  # an int beyond any float: as inf
        seconds = -math.inf if timeout < 0 else math.inf
    if math.isnan(seconds) or seconds < 0:
        raise InvalidArgumentError(f"{what}: timeout must be >= 0 seconds (or None for no "
                                   f"limit), got {_show(timeout)}")
    return None if math.isinf(seconds) else seconds


def _show(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


def stats() -> dict[str, Any]:
    """Reclaim counters over every offer this process made, and the open offers' stats."""
    with _totals_lock:
        totals = dict(_totals)
    return {**totals, "offers": [o.stats() for o in list(_open) if not o.closed]}


def _device_total(backend: str, index: int) -> int | None:
    if backend != "cuda":
        return None  # emulated devices have no fixed size
    import torch

    return int(torch.cuda.get_device_properties(index).total_memory)


def _after_fork_in_child() -> None:
    global _totals_lock
    _totals_lock = threading.Lock()  # a parent thread may have held it at the fork
    for o in list(_open):
        o._detach()
    _open.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _abandon_all() -> None:
    for o in list(_open):
        try:
            o._abandon()
        except Exception:  # noqa: BLE001 - at exit; recovery covers it when the pid is gone
            pass
