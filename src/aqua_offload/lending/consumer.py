"""The consumer side: an ``OffloadManager(peers="lent")`` leases what other processes offer.

Note [Consumer thread]
The manager is made with a 0-byte peer tier on every device it can reach (peers first, its own
device last). A :class:`Consumer` registers in the ledger with a datagram endpoint; its
:meth:`Consumer.start` leases what is on offer at once (so the manager's constructor returns
with the memory already there), then a background thread serves the ledger: it sleeps on the endpoint, and on any wake-up (an offer
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

Note [Consumer failures]
  - transient ``LedgerError`` (reason ``lock`` or ``io``): the round is retried after
    ``RETRY_S``. Bytes freed (or leased, not allocated) that a round could not record stay in
    ``_owed``, charged first by the next round: leases keep summing to the tier's capacity.
  - fatal (corrupt, foreign, newer, missing: reclaims can no longer be heard): every lent byte
    is given back (data moves to the host tier), leasing stops, ``stats()`` shows the error.
    Every ``SLICE_S`` it retries what it could not free, and drops the leases of freed devices
    once the ledger reads again.
  - in :func:`attach`: if :meth:`Consumer.start` fails, the manager is closed (its memory
    freed), then the close transaction drops the leases and the entry.
An entry is ours only with our id *and* our socket: a ledger made again may give our id away.

Note [Stop and close]
:meth:`Consumer.stop` sets ``_stopped`` under the sync lock: a round in progress finishes (a
migration is never cut short) and none starts after, whoever calls :meth:`sync`; then the
sleeping thread is joined. ``OffloadManager.close`` stops the consumer after the restore
fetches (the last step that can fail): a close that raises leaves it serving reclaims.

Note [Consumers and fork]
A consumer belongs to its pid. In a forked child it is *detached*: :meth:`sync`, :meth:`stop`
and :meth:`close` do nothing (the child's exit closes its managers: the parent's leases must
stay), and the child's copy of the socket is closed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

from ..errors import LedgerError, OffloadError
from ..sizes import format_size, parse_size
from . import notify
from .devkeys import device_key, device_label, lease_caps, reachable
from .ledger import Ledger
from .liveness import identity

__all__ = ["Consumer", "attach", "lent_peer_specs", "SLICE_S", "LEASE_CHUNK"]

log = logging.getLogger("aqua_offload.lending")
SLICE_S = 1.0  # housekeeping wake-up: dead producers, retries; not the reclaim path
RETRY_S = 0.1  # after a transient ledger error (Note [Consumer failures])
STOP_WARN_S = 60.0  # stop() waits for a round in progress, warning this often
STOP_JOIN_S = 10.0  # then joins a thread that can only be sleeping
_TRANSIENT = ("lock", "io")
_consumers: "weakref.WeakSet[Consumer]" = weakref.WeakSet()  # Note [Consumers and fork]
# Leases are taken in segments of at most this (env AQUA_OFFLOAD_LEASE_CHUNK): a reclaim frees
# whole segments, so a chunk bounds how much more than asked a reclaim migrates.
LEASE_CHUNK = {"cuda": 1 << 30, "emulation": 16 << 20}
_ALIGN = 256


def lent_peer_specs(backend: str, index: int) -> list[tuple[int, int]]:
    """Peer tiers of a lent manager: every reachable device, 0 bytes until leased."""
    return [(j, 0) for j in reachable(backend, index)]


def attach(manager: Any, peer_bytes: Any = None) -> "Consumer":
    """Make and start the consumer of a new ``peers="lent"`` manager; if that fails, close the
    manager, then drop whatever was leased (Note [Consumer failures])."""
    consumer = None
    try:
        consumer = Consumer(manager, cap=peer_bytes)
        consumer.start()
        return consumer
    except BaseException:
        if consumer is not None:
            consumer.stop()
        manager.close(restore=False)  # frees every pool, the leased segments included...
        if consumer is not None:
            consumer.close()  # ...so the leases can go (not if the close raised: leaked, safe)
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

    The constructor registers the consumer; :meth:`start` leases and starts its thread.
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
        self._cap = lease_caps(cap, backend, self._local)
        env = os.environ.get("AQUA_OFFLOAD_LEASE_CHUNK")
        what = "lease chunk" if chunk is not None or not env else "$AQUA_OFFLOAD_LEASE_CHUNK"
        chunk = chunk if chunk is not None else env if env else LEASE_CHUNK[backend]
        self._chunk = max(_ALIGN, parse_size(chunk, name=what) // _ALIGN * _ALIGN)
        self._held = {k: 0 for k in self._local}
        self._ledger = Ledger(ledger)
        self._sync_lock = threading.Lock()  # one round at a time; stop() takes it
        self._stop = threading.Event()  # wakes the thread out of its loop
        self._stopped = False  # no round after this (Note [Stop and close])
        self._pid = os.getpid()  # Note [Consumers and fork]
        self._owed = {k: 0 for k in self._local}  # Note [Consumer failures]
        self._dropped = False  # failed: leases of freed devices dropped
        self._thread: threading.Thread | None = None
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
        except BaseException:
            self._endpoint.close()
            raise
        _consumers.add(self)

    def start(self) -> None:
        """Lease what is on offer now, then serve the ledger in a background thread."""
        self.sync()
        self._thread = threading.Thread(target=self._run, name="aqua-lending-consumer",
                                        daemon=True)
        self._thread.start()

    # -- the loop ------------------------------------------------------------------------
    def _foreign(self) -> bool:
        return os.getpid() != self._pid

    def _run(self) -> None:
        pause = SLICE_S
        while not self._stop.is_set():
            self._endpoint.wait(pause)
            if self._stop.is_set():
                break
            pause = SLICE_S
            try:
                if self._state == "failed":
                    self._retry_give_back()
                else:
                    self.sync()
            except LedgerError as exc:
                if exc.reason not in _TRANSIENT:
                    self._fail(exc)
                    continue
                self._error = f"{type(exc).__name__}: {exc}"  # retried soon: nothing lost
                log.warning("aqua_offload lending consumer (retrying): %s", self._error)
                pause = RETRY_S
            except Exception as exc:  # noqa: BLE001 - keep serving reclaims whatever happens
                self._error = f"{type(exc).__name__}: {exc}"
                log.warning("aqua_offload lending consumer: %s", self._error)

    def sync(self) -> None:
        """Serve asked returns, then lease what is on offer (the thread calls this on every
        wake-up; calling it directly is harmless)."""
        if self._foreign():  # a forked child's copy (a parent thread may hold the lock)
            return
        with self._sync_lock:
            for _ in range(64):  # bounded: each round returns or leases something
                if self._stopped or self._state != "active":
                    return
                if self._serve_returns():
                    continue
                if self._stop.is_set() or not self._grow():
                    return

    def _mine(self, st: Any) -> dict[str, Any] | None:
        """Our entry, if it is ours (Note [Consumer failures]: id and socket)."""
        me = st.find("consumers", self.id)
        return me if me is not None and me["sock"] == self._endpoint.address else None

    def _me(self, st: Any) -> dict[str, Any]:
        me = self._mine(st)
        if me is None:
            raise LedgerError(f"lending ledger {self._ledger.path}: consumer #{self.id} of this "
                              "process is gone (was the ledger file removed or replaced?)",
                              path=self._ledger.path, reason="missing")
        return me

    def _serve_returns(self) -> bool:
        """Give back what producers asked for; True if anything was returned."""
        with self._ledger.transaction() as st:
            self._me(st)
            settled = {k: n for k, n in self._owed.items() if n}
            for key, n in settled.items():  # what an earlier round could not record
                st.charge(self.id, key, n)
            asks: dict[str, tuple[int, float]] = {}
            for le in st.leases:
                if le["consumer"] == self.id and le["return"] > 0:
                    n, t = asks.get(le["key"], (0, float("inf")))
                    asks[le["key"]] = (n + le["return"], min(t, le.get("asked") or time.monotonic()))
        for key, n in settled.items():
            self._owed[key] -= n
        progressed = False
        for key, (ask, asked_at) in asks.items():
            t = time.monotonic()
            try:
                freed = int(self._m._reclaim(self._local[key], ask))
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
            self._owed[key] += freed  # until the ledger records it
            # Taken before the charge commits: the producer may see the commit and return
            # before this thread runs again, and its own latency must not be the shorter one.
            done = time.monotonic() - asked_at
            with self._ledger.transaction() as st:
                st.charge(self.id, key, freed)
            self._owed[key] -= freed
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
            self._m._lend(self._local[key], n)
        except Exception as exc:  # noqa: BLE001 - e.g. the device is really out of memory
            self._stats["lease_failures"] += 1
            self._error = f"lend of {format_size(n)} on {self._label[key]} failed: {exc}"
            self._owed[key] += n  # leased, never allocated: until the ledger records it
            with self._ledger.transaction() as st:
                for le in [le for le in st.leases if le["id"] in made]:
                    st.shrink_lease(le, le["bytes"])
            self._owed[key] -= n
            return False
        self._held[key] += n
        self._stats["lends"] += 1
        self._stats["bytes_leased"] += n
        return True

    def _own_key(self) -> str:
        return list(self._local)[-1]

    def _fail(self, exc: Exception) -> None:
        """The ledger is unusable: give everything back (Note [Consumer failures])."""
        with self._sync_lock:  # (sync() cannot run meanwhile; "failed" once it is all back)
            if self._stopped or self._state != "active":
                return
            error = f"{type(exc).__name__}: {exc}"
            log.error("aqua_offload lending consumer gives back its leases: %s", error)
            self._give_back()
            self._error = error
            self._state = "failed"
            self._drop_leases()

    def _retry_give_back(self) -> None:
        with self._sync_lock:
            if not self._stopped and not self._dropped:
                self._give_back()
                self._drop_leases()

    def _give_back(self) -> None:
        """Free every lent byte (sync lock held); what cannot be freed is retried later."""
        for key, held in self._held.items():
            if held:
                try:
                    self._m._reclaim(self._local[key], None)
                    self._held[key] = 0
                except OffloadError as e:  # keep the data; the memory stays in use
                    log.error("aqua_offload lending: cannot give back %s: %s",
                              self._label[key], e)

    def _drop_leases(self) -> None:
        """Failed: drop our leases on the devices freed, if the ledger reads (sync lock held)."""
        try:
            with self._ledger.transaction(create=False) as st:
                if self._mine(st) is not None:
                    st.drop_leases(self.id, {k for k, held in self._held.items() if not held})
        except LedgerError:
            return  # still unreadable (or locked): the next slice retries
        self._owed = {k: 0 if not self._held[k] else n for k, n in self._owed.items()}
        self._dropped = not any(self._held.values())

    # -- lifetime ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The ``lending`` section of ``OffloadManager.stats()`` (docs/lending.md)."""
        leased = {self._label[k]: v for k, v in self._held.items() if v}
        state = "detached" if self._foreign() else self._state
        return {"state": state, "error": self._error, "ledger": self._ledger.path,
                "consumer_id": self.id, "leased": leased, "leased_bytes": sum(leased.values()),
                **self._stats}

    def stop(self) -> None:
        """No lend or reclaim after this returns (Note [Stop and close]); idempotent."""
        if self._foreign():
            return
        self._stop.set()
        notify.send(self._endpoint.address, notify.WAKE_STOP)
        if self._thread is threading.current_thread():  # (it never closes its manager)
            self._stopped = True
            return
        waited = 0.0
        while not self._sync_lock.acquire(timeout=STOP_WARN_S):
            waited += STOP_WARN_S
            log.warning("aqua_offload lending consumer: stop waits %.0f s for a return or a "
                        "lease in progress", waited)
        try:
            self._stopped = True
        finally:
            self._sync_lock.release()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S)  # only its sleep is left: the datagram ends it

    def close(self) -> None:
        """Remove this consumer and its leases from the ledger, once the manager freed its
        memory (last step of the manager's close): producers waiting get their acks. In a
        forked child, nothing (Note [Consumers and fork])."""
        if self._foreign() or self._state == "closed":
            return
        self.stop()  # (done already by the manager; no round may follow the drop)
        try:
            with self._ledger.transaction(create=False) as st:
                me = self._mine(st)
                if me is not None:  # else our id may be another process's now
                    st.drop_leases(self.id)
                    st.consumers.remove(me)
        except LedgerError as exc:  # nothing to tell anyone through a broken ledger
            log.warning("aqua_offload lending consumer close: %s", exc)
        finally:
            self._state = "closed"
            self._held = {k: 0 for k in self._held}
            self._endpoint.close()


def _after_fork_in_child() -> None:
    for c in list(_consumers):  # Note [Consumers and fork]
        if c._state != "closed":
            c._endpoint.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
