"""Hypothesis stateful test of the manager's remote tier (issue 16): random sequences of
offloads, fetches, prefetches, frees, incremental offloads, lender reclaims and grows, and a
lender's death, over in-process lenders, checked against a model after every step.

Note [Remote stateful model]
Each example builds fresh in-process lenders (16 MiB of host memory in 8 MiB segments, so a
block holds a tensor of more than ``DIRECT_BYTES`` = 4 MiB, which moves in place) and one
emulation manager with a 1 MiB host tier and no peers: anything larger spills or goes to a
lender directly, small batches share the open slabs, large ones get packed blocks. The model
keeps, for every live handle, a bitwise copy of what was offloaded (the ideas of Note [Stateful
model] in test_stateful.py: every fetch is compared byte for byte; bad input changes nothing).
It does not predict placement; it follows ``h.tier``/``h.location`` and checks them against the
manager's tiers. What it does predict:
  - every live handle not *lost* fetches bitwise, whatever reclaims and grows happened;
  - a handle is lost only when every lender holding a copy of it died (the copies are read from
    the tier's entries: one lender, or two with ``remote_copies=2``), and only if it was not
    prefetched (the prefetch buffer holds its bytes); a lost handle raises ``RemoteLostError``
    on fetch at once, alone or in a batch, which then changes nothing; it can be freed;
  - ``stats()``: live handles, the handles each tier counts, ``remote.lost_handles`` and
    ``lost_bytes``;
  - every block a lender lends this manager is accounted for: after ``synchronize()`` each live
    lender's ``blocks`` / ``used_bytes`` are exactly the blocks of the live handles' copies, the
    open slab and the block cache (Note [Slabs], Note [Block cache]): nothing leaked, nothing
    given back twice;
  - a reclaim either completes or is refused (``reclaim_refusals``), and a refused one completes
    once the handles on that lender are fetched, or at the latest when the manager closes;
  - ``close()`` restores every released tensor that is not lost, bitwise, and every lender gets
    every block back (``blocks`` and ``used_bytes`` 0).
Three configurations, one TestCase each: one copy below the host tier (the default order),
one copy above it, and two copies above it (``remote_copies=2``). Every call that could hang
runs under :func:`conftest.run_with_timeout`; the file takes ~25-40 s on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from remote_helpers import TOKEN, needs_nixl

import aqua_offload as aq
from aqua_offload.errors import InvalidArgumentError, OutOfMemoryError, RemoteLostError
from aqua_offload.remote import Lender
from aqua_offload.remote.arena import ALIGN
from conftest import random_tensor, run_with_timeout, wait_until

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20
SEGMENT = 8 * MiB
LENDER_BYTES = 2 * SEGMENT
MAX_ARENA = 3 * SEGMENT  # a lender grows up to this
HOST_BYTES = 1 * MiB
LIVE_LIMIT = 20 * MiB  # the model offloads more only below this many live bytes
DEADLINE_S = 10.0  # generous: the 2-core machine is shared; a death is seen at once
HANG_S = 60.0  # no single call may take longer

SIZES = st.sampled_from([1, 3, 100, 4 * KiB, 40_000, 300 * KiB, MiB + 3, 2 * MiB,
                         4 * MiB, 5 * MiB + 1])
SMALL = st.sampled_from([1, 100, 4 * KiB, 40_000, 300 * KiB])
DTYPES = st.sampled_from([torch.uint8, torch.float32, torch.int16, torch.bfloat16, torch.int64])


def make_tensor(nbytes: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random non-zero bytes, about ``nbytes`` of them (whole elements, at least one)."""
    es = torch.empty((), dtype=dtype).element_size()
    return random_tensor((max(1, nbytes // es),), dtype,
                         generator=torch.Generator().manual_seed(seed))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (floats compared as bytes)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


class Rec:
    """A live handle in the model."""

    def __init__(self, h: aq.Handle, tensor: torch.Tensor, ref: torch.Tensor) -> None:
        self.h = h
        self.tensor = tensor  # release: the object fetch returns (paged out meanwhile)
        self.ref = ref        # the bytes offloaded
        self.kept = False     # a release fetched with keep=True: only base= or free now
        self.prefetched = False
        self.lost = False     # every lender with a copy died and no prefetch holds it


class RemoteMachine(RuleBasedStateMachine):
    """Over ``LENDERS`` lenders with the manager keywords ``KW`` (set by subclasses)."""

    LENDERS = 3
    KW: dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.lenders = [Lender(TOKEN, host_bytes=LENDER_BYTES, segment_bytes=SEGMENT).start()
                        for _ in range(self.LENDERS)]
        self.dead: set[int] = set()
        self.m = aq.OffloadManager("cpu", peers=None, host_bytes=HOST_BYTES,
                                   remote=[x.address for x in self.lenders], remote_token=TOKEN,
                                   remote_deadline_s=DEADLINE_S, **self.KW)
        self.asks = [0] * self.LENDERS  # RECLAIM asks each client received
        for i, c in enumerate(self.m._remote.clients):
            def counted(job, *a, _put=c._reclaims.put, _i=i, **k):
                if job is not None:
                    self.asks[_i] += 1
                return _put(job, *a, **k)
            c._reclaims.put = counted
        self.recs: list[Rec] = []
        self.tickets: list[tuple[int, object]] = []  # refused reclaims still pending
        self.copies = self.KW.get("remote_copies", 1)

    # -- helpers ------------------------------------------------------------------------------
    def call(self, fn):
        return run_with_timeout(fn, HANG_S)

    def live_bytes(self) -> int:
        return sum(r.h.nbytes for r in self.recs)

    def fetchable(self) -> list[Rec]:
        return [r for r in self.recs if not r.kept and not r.lost]

    def named_by(self, r: Rec) -> list[int]:
        """The lenders whose tier counts ``r`` (its entry's copies; a prefetched handle whose
        block a reclaim took still names its lender: its ``h.location``)."""
        e = self.m._remote._remote.get(r.h._id)
        if e is None:
            return []
        return [e.client] + ([e.mirror[0]] if e.mirror is not None else [])

    def lenders_of(self, r: Rec) -> set[int]:
        """The lenders holding a copy of ``r``'s bytes (empty while the core holds it)."""
        e = self.m._remote._remote.get(r.h._id)
        if e is None or e.block is None:
            return set()
        return {e.client} | ({e.mirror[0]} if e.mirror is not None else set())

    def only_in_prefetch(self, r: Rec) -> bool:
        """A reclaim took the block of a prefetched handle, or every lender with a copy died:
        its buffer holds the only copy."""
        e = self.m._remote._remote.get(r.h._id)
        return e is not None and e.nbytes > 0 and r.prefetched and (
            e.block is None or self.lenders_of(r) <= self.dead)

    def settle_reclaims(self) -> None:
        """Wait until every live client answered every RECLAIM it got: a ticket can be done
        (the blocks came back) while the callback still writes new mirrors (Note [Replicas]),
        and the model reads where copies are."""
        def answered() -> bool:
            for i, c in enumerate(self.m._remote.clients):
                s = c.stats()
                if c.lost is None and s["reclaims"] + s["reclaim_refusals"] != self.asks[i]:
                    return False
            return True
        wait_until(answered, HANG_S, "every reclaim answered")

    def tensors(self, sizes: list[int], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
        return [make_tensor(n, dtype, seed + k) for k, n in enumerate(sizes)]

    def check_unchanged(self, ts, refs, before) -> None:
        for t, ref in zip(ts, refs):
            assert not aq.is_offloaded(t) and same(t, ref)
        assert self.m.stats()["live_handles"] == before

    def offloaded(self, hs, ts, refs, release: bool) -> None:
        for h, t, ref in zip(hs, ts, refs):
            assert h.release == release and h.nbytes == ref.numel() * ref.element_size()
            assert h.state in ("in_flight", "offloaded")
            if release:
                assert aq.is_offloaded(t)
            else:
                assert same(t, ref)  # a snapshot leaves its source alone
            self.recs.append(Rec(h, t, ref))
            event(f"placed on {h.tier}")

    def check_fetched(self, r: Rec, out: torch.Tensor, given: torch.Tensor | None = None) -> None:
        if r.h.release:
            assert out is r.tensor and not aq.is_offloaded(out)
        elif given is not None:
            assert out is given
        assert same(out, r.ref), (r.h, r.h.tier, r.h.location)
        assert r.h.state == "fetched"
        self.recs.remove(r)

    def do_offload(self, sizes: list[int], dtype, seed: int, release: bool, many: bool) -> None:
        ts = self.tensors(sizes, dtype, seed)
        refs = [t.clone() for t in ts]
        before = self.m.stats()["live_handles"]
        try:
            if many:
                hs = self.call(lambda: self.m.offload_many(ts, release=release))
            else:
                hs = [self.call(lambda: self.m.offload(ts[0], release=release))]
        except OutOfMemoryError as e:
            event("OutOfMemoryError")
            assert e.requested and e.requested > 0
            self.check_unchanged(ts, refs, before)
            return
        self.offloaded(hs, ts, refs, release)

    # -- offloads -------------------------------------------------------------------------
    @precondition(lambda self: self.live_bytes() < LIVE_LIMIT)
    @rule(size=SIZES, dtype=DTYPES, seed=st.integers(0, 2**31 - 1), release=st.booleans())
    def offload(self, size, dtype, seed, release):
        self.do_offload([size], dtype, seed, release, many=False)

    @precondition(lambda self: self.live_bytes() < LIVE_LIMIT)
    @rule(sizes=st.lists(SMALL, min_size=1, max_size=6), dtype=DTYPES,
          seed=st.integers(0, 2**31 - 1), release=st.booleans())
    def offload_many_small(self, sizes, dtype, seed, release):
        """A batch of at most a few hundred KiB: the open slab once the host tier is full."""
        self.do_offload(sizes, dtype, seed, release, many=True)

    @precondition(lambda self: self.live_bytes() < LIVE_LIMIT)
    @rule(sizes=st.lists(SIZES, min_size=2, max_size=3), dtype=DTYPES,
          seed=st.integers(0, 2**31 - 1), release=st.booleans())
    def offload_many_large(self, sizes, dtype, seed, release):
        """Mixed sizes up to 5 MiB: packed blocks, pieces of 4 MiB and more moved in place."""
        self.do_offload(sizes, dtype, seed, release, many=True)

    @precondition(lambda self: any(not r.h.release and not r.prefetched and not r.lost
                                   for r in self.recs)
                  or any(r.kept and not r.lost for r in self.recs))
    @rule(data=st.data(), grow=st.sampled_from([1, 256, 5000, 300 * KiB, 5 * MiB]),
          seed=st.integers(0, 2**31 - 1), release=st.booleans())
    def incremental(self, data, grow, seed, release):
        """``offload(t, base=h)`` with ``t``'s bytes extending ``h``'s: ``h`` is consumed."""
        r = data.draw(st.sampled_from([r for r in self.recs if not r.lost and (
            r.kept or (not r.h.release and not r.prefetched))]))
        prefix = r.ref.reshape(-1).view(torch.uint8)
        t = torch.cat([prefix, make_tensor(grow, torch.uint8, seed)])
        ref = t.clone()
        before = self.m.stats()["live_handles"]
        try:
            h2 = self.call(lambda: self.m.offload(t, release=release, base=r.h))
        except OutOfMemoryError:
            event("incremental: OutOfMemoryError")
            self.check_unchanged([t], [ref], before)
            assert r.h.state in ("in_flight", "offloaded")  # the base is still there
            return
        assert r.h.state == "freed"
        event(f"incremental: {r.h.tier} base")
        self.recs.remove(r)
        self.offloaded([h2], [t], [ref], release)

    # -- fetches --------------------------------------------------------------------------
    @precondition(lambda self: self.fetchable())
    @rule(data=st.data(), into_out=st.booleans())
    def fetch(self, data, into_out):
        r = data.draw(st.sampled_from(self.fetchable()))
        given = None
        if into_out and not r.h.release:
            given = torch.empty(r.h.shape, dtype=r.h.dtype)
        out = self.call(lambda: self.m.fetch(r.h, out=given))
        self.check_fetched(r, out, given)

    @precondition(lambda self: self.fetchable())
    @rule(data=st.data(), into_out=st.booleans())
    def fetch_many(self, data, into_out):
        recs = data.draw(st.lists(st.sampled_from(self.fetchable()), min_size=1, max_size=5,
                                  unique_by=id))
        outs = [torch.empty(r.h.shape, dtype=r.h.dtype) if into_out and not r.h.release
                else None for r in recs]
        got = self.call(lambda: self.m.fetch_many([r.h for r in recs], outs))
        assert len(got) == len(recs)
        for r, out, given in zip(recs, got, outs):
            self.check_fetched(r, out, given)

    @precondition(lambda self: self.fetchable())
    @rule(data=st.data())
    def fetch_keep(self, data):
        """``keep=True``: the tier's copy stays. A kept snapshot can be fetched again; a kept
        release restores its tensor and can then only be a base or freed."""
        r = data.draw(st.sampled_from(self.fetchable()))
        if self.only_in_prefetch(r):  # keeping it would hand out the only copy: refused
            assert r.prefetched
            with pytest.raises(InvalidArgumentError, match="prefetch"):
                self.call(lambda: self.m.fetch(r.h, keep=True))
            event("fetch_keep: refused, only the prefetch holds the bytes")
            assert r.h.state in ("in_flight", "offloaded")
            return
        out = self.call(lambda: self.m.fetch(r.h, keep=True))
        assert same(out, r.ref)
        assert r.h.state in ("in_flight", "offloaded")
        r.prefetched = False  # the prefetch buffer was handed out
        if r.h.release:
            assert out is r.tensor
            r.kept = True

    @precondition(lambda self: self.fetchable())
    @rule(data=st.data())
    def prefetch(self, data):
        r = data.draw(st.sampled_from(self.fetchable()))
        assert self.call(lambda: self.m.prefetch(r.h)) is r.h
        r.prefetched = True

    @precondition(lambda self: self.recs)
    @rule(data=st.data())
    def free(self, data):
        r = data.draw(st.sampled_from(self.recs))
        self.call(lambda: self.m.free(r.h))
        assert r.h.state == "freed"
        self.recs.remove(r)

    # -- the lenders ----------------------------------------------------------------------
    def alive(self) -> list[int]:
        return [i for i in range(len(self.lenders)) if i not in self.dead]

    @precondition(lambda self: self.alive())
    @rule(data=st.data(), segments=st.integers(1, 3), fetch_stuck=st.booleans())
    def lender_reclaim(self, data, segments, fetch_stuck):
        """A lender takes segments back: the handles there move (to the host tier or another
        lender) and the reclaim completes, or it is refused (no room anywhere) and completes
        once the handles left there are fetched."""
        i = data.draw(st.sampled_from(self.alive()))
        lender = self.lenders[i]
        refusals = self.m.stats()["remote"]["reclaim_refusals"]
        ticket = lender.reclaim(segments * SEGMENT)
        wait_until(lambda: ticket.done.is_set()
                   or self.m.stats()["remote"]["reclaim_refusals"] > refusals, HANG_S,
                   "the reclaim completed or was refused")
        self.settle_reclaims()
        if ticket.done.is_set():
            event("lender reclaim completed")
            return
        event("lender reclaim refused")
        if not fetch_stuck:
            self.tickets.append((i, ticket))
            return
        for r in [r for r in self.fetchable() if i in self.lenders_of(r)]:
            self.check_fetched(r, self.call(lambda r=r: self.m.fetch(r.h)))
        for r in [r for r in self.recs if i in self.lenders_of(r)]:  # kept: can only go
            self.call(lambda r=r: self.m.free(r.h))
            self.recs.remove(r)
        assert ticket.wait(HANG_S), "the reclaim completes once the handles let go"
        self.settle_reclaims()

    @precondition(lambda self: self.alive())
    @rule(data=st.data())
    def lender_grow(self, data):
        i = data.draw(st.sampled_from(self.alive()))
        lender = self.lenders[i]
        arena = lender.stats()["arena_bytes"]
        added = lender.grow(SEGMENT) if arena < MAX_ARENA else 0
        assert lender.stats()["arena_bytes"] == arena + added

    @precondition(lambda self: len(self.alive()) >= 2)
    @rule(really=st.integers(0, 2))
    def lender_dies(self, really):
        """Rarely (one draw in three, at most all but one lender): a lender closes. Its
        client is lost within the deadline; every handle only it held is lost."""
        if really:
            return
        # the lender holding the most handles, so that handles are lost (one copy)
        self.settle_reclaims()  # (a pending reclaim may complete on a fetch or free)
        held = [sum(i in self.lenders_of(r) for r in self.recs) for i in range(self.LENDERS)]
        i = max(self.alive(), key=lambda i: held[i])
        lender = self.lenders[i]
        lender.close()
        self.dead.add(i)
        wait_until(lambda: self.m.stats()["tiers"][1 + i]["lost"] is not None, HANG_S,
                   "the lender's client lost")
        for r in self.recs:
            holders = self.lenders_of(r)
            if holders and holders <= self.dead and not r.prefetched:
                r.lost = True
        event(f"lender died: {sum(r.lost for r in self.recs)} handles lost")

    @precondition(lambda self: any(r.lost for r in self.recs))
    @rule(data=st.data())
    def fetch_lost(self, data):
        """A lost handle raises RemoteLostError at once, alone and in a batch with others,
        and nothing changes."""
        r = data.draw(st.sampled_from([r for r in self.recs if r.lost]))
        if r.kept:  # a kept release cannot be fetched at all: only freed
            with pytest.raises(aq.InvalidHandleError):
                self.call(lambda: self.m.fetch(r.h))
            return
        others = data.draw(st.lists(st.sampled_from(self.fetchable()), max_size=3,
                                    unique_by=id)) if self.fetchable() else []
        batch = [r] + others
        before = self.m.stats()
        with pytest.raises(RemoteLostError):
            self.call(lambda: self.m.fetch_many([x.h for x in batch]))
        keep = data.draw(st.booleans())  # (drawn here: never in another thread)
        with pytest.raises(RemoteLostError):
            self.call(lambda: self.m.fetch(r.h, keep=keep))
        after = self.m.stats()
        assert after["live_handles"] == before["live_handles"]
        assert after["fetches"] == before["fetches"]
        for x in batch:
            assert x.h.state in ("in_flight", "offloaded")
            if x.h.release and not x.kept:
                assert aq.is_offloaded(x.tensor)

    @rule()
    def synchronize(self):
        """Every block each live lender lends this manager is accounted for."""
        self.m.synchronize()
        t = self.m._remote
        with t._lock:
            entries = list(t._remote.values())
            slabs = {i: s.block for i, s in t._slabs.items()}
            cache = {i: list(bs) for i, bs in t._cache.items()}
        for i in self.alive():
            blocks = {}
            for e in entries:
                for c, b in ((e.client, e.block),) + ((e.mirror[:2],) if e.mirror else ()):
                    if c == i and b is not None:
                        blocks[b.id] = b.nbytes
            for b in ([slabs[i]] if i in slabs else []) + cache.get(i, []):
                assert b.id not in blocks or b.id == slabs.get(i, b).id, "cached and used"
                blocks[b.id] = b.nbytes
            s = self.lenders[i].stats()
            used = sum(-(-n // ALIGN) * ALIGN for n in blocks.values())  # the lender aligns
            assert (s["blocks"], s["used_bytes"]) == (len(blocks), used), i

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def accounting(self):
        s = self.m.stats()
        assert s["live_handles"] == len(self.recs)
        tiers = {t["location"]: t for t in s["tiers"]}
        for r in self.recs:
            assert r.h.tier in ("host", "remote")
            assert r.h.location in tiers and tiers[r.h.location]["tier"] == r.h.tier
        host = [t for t in s["tiers"] if t["tier"] == "host"]
        assert host[0]["handles"] == sum(r.h.tier == "host" for r in self.recs)
        remote = [t for t in s["tiers"] if t["tier"] == "remote"]
        assert len(remote) == len(self.lenders)
        on = [0] * len(self.lenders)
        for r in self.recs:
            for i in self.named_by(r):
                on[i] += 1
        assert [t["handles"] for t in remote] == on, (
            on, [t["handles"] for t in remote], list(self.m._remote._remote.values()))
        assert [t["lost"] is not None for t in remote] == [
            i in self.dead for i in range(len(self.lenders))]
        lost = [r for r in self.recs if r.lost]
        assert s["remote"]["lost_handles"] == len(lost)
        assert s["remote"]["lost_bytes"] == sum(r.h.nbytes for r in lost)

    def teardown(self):
        try:
            self.call(self.m.close)
            for r in self.recs:
                if r.h.release and not r.kept and not r.lost:  # close restores them
                    # (an empty storage first: reading a discarded tensor would crash)
                    assert r.tensor.untyped_storage().nbytes() == r.h.nbytes, (
                        "close left a release discarded", r.prefetched)
                    assert not aq.is_offloaded(r.tensor) and same(r.tensor, r.ref)
            for _, ticket in self.tickets:  # the manager let go of everything
                assert ticket.wait(HANG_S), "a refused reclaim completes at close"
            for i in self.alive():
                lender = self.lenders[i]
                wait_until(lambda: lender.stats()["blocks"] == 0, HANG_S, "every block back")
                assert lender.stats()["used_bytes"] == 0
        finally:
            for x in self.lenders:
                x.close()


SETTINGS = settings(max_examples=30, stateful_step_count=40, deadline=None, derandomize=True,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


class OneCopy(RemoteMachine):
    """Three lenders below the host tier (the default order), one copy of each handle."""


class TwoCopiesAboveHost(RemoteMachine):
    """Three lenders before host memory, every handle on two of them: one lender's death
    loses nothing that still has its second copy."""

    KW = {"remote_copies": 2, "remote_order": "above_host"}


class OneCopyAboveHost(RemoteMachine):
    """Three lenders before host memory, one copy: a batch goes to a lender directly and to
    the host tier only when no lender holds it; a lender's death loses what only it held."""

    KW = {"remote_order": "above_host"}


TestRemoteOneCopy = OneCopy.TestCase
TestRemoteOneCopy.settings = SETTINGS
TestRemoteTwoCopies = TwoCopiesAboveHost.TestCase
TestRemoteTwoCopies.settings = SETTINGS
TestRemoteAboveHost = OneCopyAboveHost.TestCase
TestRemoteAboveHost.settings = SETTINGS
