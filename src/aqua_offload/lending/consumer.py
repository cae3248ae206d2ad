"""The consumer side: an ``OffloadManager(peers="lent")`` leases what other processes offer.

Note [Consumer thread]
The manager is made with a 0-byte peer tier on every device it can reach (peers first, its own
device last). A :class:`Consumer` registers in the ledger with a datagram endpoint, leases what
is on offer at once (so the constructor returns with the memory already there), then a
background thread serves the ledger: it sleeps on the endpoint, and on any wake-up (an offer
appeared, a reclaim was asked, a slice of ``SLICE_S`` passed) runs :meth:`Consumer.sync`:
  1. returns first: for each device with bytes asked back, ``manager.reclaim`` migrates every
     handle in the newest segments down the cascade (while the user's threads keep offloading
     and fetching: the core is thread-safe), then one transaction charges the freed bytes to the
     leases (state.py, Note [Accounting]) and queues an ack to each producer waiting;
  2. then growth: the device with the most unleased bytes wins (own device last), a lease of at
     most one chunk is recorded *before* ``manager.lend`` allocates it (so the bytes cannot be
     granted twice), and is dropped again if the allocation fails.
Nothing slow runs under the ledger lock. Only this object lends or reclaims on the lent tiers,
so its per-device capacity always equals its leases in the ledger; do not call ``lend`` or
``reclaim`` on a lent manager yourself.

Failure: if the ledger becomes unusable (corrupt, removed, our entry gone), the consumer can no
longer hear reclaims, so it gives every lent byte back (data migrates to the host tier), stops
leasing, and reports the error in ``stats()["lending"]``: the safe side for the producers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Mapping

from ..devices import parse_peer
from ..errors import LedgerError, OffloadError
from ..sizes import format_size, parse_size
from . import notify
from .devkeys import device_key, device_label, reachable
from .ledger import Ledger
from .liveness import identity

__all__ = ["Consumer", "attach", "lent_peer_specs", "SLICE_S", "LEASE_CHUNK"]

log = logging.getLogger("aqua_offload.lending")
SLICE_S = 1.0  # housekeeping wake-up: dead producers, retries; not the reclaim path
# Leases are taken in segments of at most this (env AQUA_OFFLOAD_LEASE_CHUNK): a reclaim frees
# whole segments, so a chunk bounds how much more than asked a reclaim migrates.
LEASE_CHUNK = {"cuda": 1 << 30, "emulation": 16 << 20}
_ALIGN = 256


def lent_peer_specs(backend: str, index: int) -> list[tuple[int, int]]:
    """Peer tiers of a lent manager: every reachable device, 0 bytes until leased."""
    return [(j, 0) for j in reachable(backend, index)]


def attach(manager: Any, peer_bytes: Any = None) -> "Consumer":
    """Make the consumer of a new ``peers="lent"`` manager; close the manager if that fails."""
    try:
        return Consumer(manager, cap=peer_bytes)
    except BaseException:
        manager.close(restore=False)
        raise


class Consumer:
    """Leases offered memory for one manager and serves reclaims (Note [Consumer thread]).

    Parameters
    ----------
    manager : OffloadManager
        A manager made with ``peers="lent"``.
    cap : int, str or mapping, optional
        Most bytes to lease per device (or per device as ``{"cuda:1": "20GiB"}``); no limit
        when None.
    chunk : int or str, optional
        Largest lease segment (default ``LEASE_CHUNK``).
    ledger : str, optional
        The ledger file.
    """

    def __init__(self, manager: Any, cap: Any = None, chunk: Any = None,
                 ledger: str | None = None) -> None:
        self._m = manager
        backend = manager._store.backend
        index = manager.device.index or 0 if backend == "cuda" else 0
        devs = reachable(backend, index)
        self._local = {device_key(backend, j): j for j in devs}
        self._label = {k: device_label(backend, j) for k, j in self._local.items()}
        self._rank = {k: r for r, k in enumerate(self._local)}
        self._cap = self._caps(cap, backend)
        env = os.environ.get("AQUA_OFFLOAD_LEASE_CHUNK")
        chunk = chunk if chunk is not None else env if env else LEASE_CHUNK[backend]
        self._chunk = max(_ALIGN, parse_size(chunk, name="lease chunk") // _ALIGN * _ALIGN)
        self._held = {k: 0 for k in self._local}
        self._ledger = Ledger(ledger)
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._state = "active"
        self._error: str | None = None
        self._stats = {"lends": 0, "bytes_leased": 0, "lease_failures": 0, "reclaims": 0,
                       "bytes_returned": 0, "reclaim_failures": 0, "reclaim_last_s": 0.0,
                       "reclaim_max_s": 0.0, "reclaim_total_s": 0.0, "reclaim_last_serve_s": 0.0,
                       "reclaim_last_asked": 0, "reclaim_last_freed": 0}
        self._endpoint = notify.Endpoint(self._ledger.directory, "consumer")
        try:
            me = identity()
            with self._ledger.transaction() as st:
                self.id = st.new_id()
                st.consumers.append({"id": self.id, "pid": me.pid, "start": me.start,
                                     "ns": me.ns, "sock": self._endpoint.address,
                                     "backend": backend, "device": str(manager.device),
                                     "keys": list(self._local), "since": time.time()})
            self.sync()
        except BaseException:
            self._endpoint.close()
            raise
        self._thread = threading.Thread(target=self._run, name="aqua-lending-consumer",
                                        daemon=True)
        self._thread.start()

    def _caps(self, cap: Any, backend: str) -> dict[str, int | None]:
        if cap is None:
            return {k: None for k in self._local}
        if isinstance(cap, Mapping):
            per = {parse_peer(d, backend): parse_size(v, name=f"peer_bytes[{d!r}]")
                   for d, v in cap.items()}
            return {k: per.get(j, 0) for k, j in self._local.items()}
        size = parse_size(cap, name="peer_bytes")
        return {k: size for k in self._local}

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._endpoint.wait(SLICE_S)
            if self._stop.is_set():
                break
            try:
                self.sync()
            except LedgerError as exc:
                self._fail(exc)
                return
            except Exception as exc:  # noqa: BLE001 - keep serving reclaims whatever happens
                self._error = f"{type(exc).__name__}: {exc}"
                log.warning("aqua_offload lending consumer: %s", self._error)

    def sync(self) -> None:
        """Serve asked returns, then lease what is on offer (the thread calls this on every
        wake-up; calling it directly is harmless)."""
        with self._sync_lock:
            for _ in range(64):  # bounded: each round returns or leases something
                if self._state != "active":
                    return
                if self._serve_returns():
                    continue
                if self._stop.is_set() or not self._grow():
                    return

    def _me(self, st: Any) -> dict[str, Any]:
        me = st.find("consumers", self.id)
        if me is None:
            raise LedgerError(f"lending ledger {self._ledger.path}: consumer #{self.id} of this "
                              "process is gone (was the ledger file removed or replaced?)",
                              path=self._ledger.path, reason="missing")
        return me

    def _serve_returns(self) -> bool:
        """Give back what producers asked for; True if anything was returned."""
        with self._ledger.transaction() as st:
            self._me(st)
            asks: dict[str, tuple[int, float]] = {}
            for le in st.leases:
                if le["consumer"] == self.id and le["return"] > 0:
                    n, t = asks.get(le["key"], (0, float("inf")))
                    asks[le["key"]] = (n + le["return"], min(t, le.get("asked") or time.monotonic()))
        progressed = False
        for key, (ask, asked_at) in asks.items():
            t = time.monotonic()
            try:
                freed = int(self._m.reclaim(self._local[key], ask))
            except OffloadError as exc:  # lower tiers full: nothing lost, tell the producer
                self._stats["reclaim_failures"] += 1
                self._error = f"{type(exc).__name__}: {exc}"
                with self._ledger.transaction() as st:
                    for le in st.leases:
                        if le["consumer"] == self.id and le["key"] == key and le["return"] > 0:
                            le["error"], le["error_t"] = self._error, time.monotonic()
                            st.notify(st.find("offers", le["offer"])["sock"], notify.WAKE_ACK)
                continue
            serve = time.monotonic() - t
            self._held[key] -= freed  # freed now, whatever happens to the ledger
            with self._ledger.transaction() as st:
                self._charge(st, key, freed)
            done = time.monotonic() - asked_at
            s = self._stats
            s["reclaims"] += 1
            s["bytes_returned"] += freed
            s["reclaim_last_s"] = done
            s["reclaim_max_s"] = max(s["reclaim_max_s"], done)
            s["reclaim_total_s"] += done
            s["reclaim_last_serve_s"] = serve
            s["reclaim_last_asked"], s["reclaim_last_freed"] = ask, freed
            progressed = True
        return progressed

    def _charge(self, st: Any, key: str, freed: int) -> None:
        """Charge ``freed`` bytes of ``key`` to this consumer's leases: those asked back first
        (newest first), the surplus of whole segments to the others (Note [Accounting])."""
        mine = sorted((le for le in st.leases if le["consumer"] == self.id and le["key"] == key),
                      key=lambda le: -le["id"])
        left = freed
        for le in mine:
            take = min(left, le["return"])
            if take > 0:
                st.shrink_lease(le, take)
                left -= take
        for le in mine:
            if le in st.leases and left > 0:
                take = min(left, le["bytes"])
                st.shrink_lease(le, take)
                left -= take

    def _grow(self) -> bool:
        """Lease one chunk on the best device; True if memory was added."""
        with self._ledger.transaction() as st:
            self._me(st)
            returning = {le["key"] for le in st.leases
                         if le["consumer"] == self.id and le["return"] > 0}
            avail: dict[str, list[tuple[int, dict[str, Any]]]] = {}
            for o in st.offers:
                a = st.available(o)
                if o["key"] in self._local and o["key"] not in returning and a > 0:
                    avail.setdefault(o["key"], []).append((a, o))
            best = None
            for key in sorted(avail, key=lambda k: (k == self._own_key(),
                                                    -sum(a for a, _ in avail[k]), self._rank[k])):
                cap = self._cap[key]
                room = self._chunk if cap is None else min(self._chunk, cap - self._held[key])
                n = min(room, sum(a for a, _ in avail[key])) // _ALIGN * _ALIGN
                if n > 0:
                    best = key, n
                    break
            if best is None:
                return False
            key, n = best
            left, made, now = n, [], time.time()
            for a, o in sorted(avail[key], key=lambda x: -x[0]):
                take = min(a, left)
                if take <= 0:
                    break
                made.append(st.new_id())
                st.leases.append({"id": made[-1], "consumer": self.id, "offer": o["id"],
                                  "key": key, "bytes": take, "return": 0, "asked": None,
                                  "error": None, "error_t": None, "since": now})
                left -= take
        try:
            self._m.lend(self._local[key], n)
        except Exception as exc:  # noqa: BLE001 - e.g. the device is really out of memory
            self._stats["lease_failures"] += 1
            self._error = f"lend of {format_size(n)} on {self._label[key]} failed: {exc}"
            with self._ledger.transaction() as st:
                for le in [le for le in st.leases if le["id"] in made]:
                    st.shrink_lease(le, le["bytes"])
            return False
        self._held[key] += n
        self._stats["lends"] += 1
        self._stats["bytes_leased"] += n
        return True

    def _own_key(self) -> str:
        return list(self._local)[-1]

    def _fail(self, exc: Exception) -> None:
        """The ledger is unusable: give everything back (Note [Consumer thread], Failure)."""
        with self._sync_lock:  # (sync() cannot run meanwhile; "failed" once it is all back)
            error = f"{type(exc).__name__}: {exc}"
            log.error("aqua_offload lending consumer gives back its leases: %s", error)
            for key, held in self._held.items():
                if held:
                    try:
                        self._m.reclaim(self._local[key], None)
                        self._held[key] = 0
                    except OffloadError as e:  # keep the data; the memory stays in use
                        log.error("aqua_offload lending: cannot give back %s: %s",
                                  self._label[key], e)
            self._error = error
            self._state = "failed"

    # -- lifetime ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The ``lending`` section of ``OffloadManager.stats()`` (docs/lending.md)."""
        leased = {self._label[k]: v for k, v in self._held.items() if v}
        return {"state": self._state, "error": self._error, "ledger": self._ledger.path,
                "consumer_id": self.id, "leased": leased, "leased_bytes": sum(leased.values()),
                **self._stats}

    def stop(self) -> None:
        """Stop the thread (first step of the manager's close)."""
        self._stop.set()
        notify.send(self._endpoint.address, notify.WAKE_STOP)
        if self._thread is not threading.current_thread():
            self._thread.join(60.0)

    def close(self) -> None:
        """Remove this consumer and its leases from the ledger, once the manager freed its
        memory (last step of the manager's close): producers waiting get their acks."""
        if self._state == "closed":
            return
        try:
            with self._ledger.transaction(create=False) as st:
                for le in [le for le in st.leases if le["consumer"] == self.id]:
                    st.shrink_lease(le, le["bytes"])
                me = st.find("consumers", self.id)
                if me is not None:
                    st.consumers.remove(me)
        except LedgerError as exc:  # nothing to tell anyone through a broken ledger
            log.warning("aqua_offload lending consumer close: %s", exc)
        finally:
            self._state = "closed"
            self._held = {k: 0 for k in self._held}
            self._endpoint.close()
