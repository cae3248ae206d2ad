"""Hypothesis stateful test of the public API, one TestCase per backend (emulation always, CUDA
when a GPU is present: ``TestOffloadMachineCuda`` is marked ``cuda``).

Note [Stateful model]
The machine owns a few *groups*: one random storage and several tensors viewing it (the
contiguous tensor handed out, the whole storage as bytes, slices, transposes, strided and empty
views). A group is resident, paged out (offloaded with release=True) or dead (its release handle
was freed: its data is gone). For every live handle the model keeps a bitwise reference of what
was offloaded, and checks every fetch against it byte for byte. After each step the manager's
counters and pool accounting must agree with the model exactly:
  per tier  used == sum(block of the live handles there)
A block released while a copy may still touch it is free at once (reusable in stream order,
Note [Ordered reuse] in pool.hpp): it is counted in the tier's ``fenced`` bytes, never in
``used``; after synchronize() no byte is fenced. A handle's block is align256(nbytes), except
after an incremental offload (base=): the grown handle keeps its base's block, or gets a fresh
one with 2x headroom. Handles move down the cascade (eviction when the peer tier is full,
reclaim): the model follows ``h.location``, and a migrated handle's block is align256(nbytes)
again. The peer tier's capacity changes with lend
and reclaim (whole segments, newest first); the model keeps the list of segments.

A paged-out tensor is never read by the model: touching it crashes the process (DESIGN.md §5).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

import aqua_offload as aq
from aqua_offload import storage, storage_pins
from conftest import Backend
from helpers import align
from helpers import bits as tensor_bytes
from helpers import storage_bits as storage_bytes
from stateful_helpers import (DTYPES, HOST_BYTES, PEER_BYTES, Group, OffloadModel, Rec, esize,
                              group_specs, random_storage, same_bytes)


class OffloadMachine(OffloadModel, RuleBasedStateMachine):
    backend: Backend  # set by machine_for(): one subclass (and one TestCase) per backend

    # -- rules ----------------------------------------------------------------------------
    @initialize(specs=st.lists(group_specs, min_size=1, max_size=3))
    def first_groups(self, specs):
        self.groups += [Group(*spec, device=self.dev) for spec in specs]

    @precondition(lambda self: len(self.groups) < 10)
    @rule(spec=group_specs)
    def new_group(self, spec):
        self.groups.append(Group(*spec, device=self.dev))

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def offload_release(self, data):
        g = data.draw(st.sampled_from(self.resident()))
        v = data.draw(st.sampled_from(g.views))
        self.do_offload_release(g, v, default=data.draw(st.booleans()))

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def offload_snapshot(self, data):
        g = data.draw(st.sampled_from(self.resident()))
        i = data.draw(st.integers(0, len(g.views) - 1))
        self.do_offload_snapshot(g, i)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def snapshot_burst(self, data):
        """Several snapshots in a row: fills the pools until OutOfMemoryError."""
        for _ in range(data.draw(st.integers(2, 8))):
            g = data.draw(st.sampled_from(self.resident()))
            if self.do_offload_snapshot(g, 0) is None:
                break

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), seed=st.integers(0, 2**31 - 1))
    def overwrite(self, data, seed):
        """Write new bytes into a resident storage: snapshots taken before must not see them."""
        g = data.draw(st.sampled_from(self.resident()))
        s = g.views[0].untyped_storage()
        dst = torch.empty(0, dtype=torch.uint8, device=s.device).set_(s, 0, (s.nbytes(),), (1,))
        dst.copy_(random_storage(s.nbytes(), seed, g.dtype, s.device))
        g.snap()

    @precondition(lambda self: self.paged_out())
    @rule(data=st.data())
    def offload_paged_out_is_refused(self, data):
        g = data.draw(st.sampled_from(self.paged_out()))
        v = data.draw(st.sampled_from(g.views))
        release = data.draw(st.booleans())
        before = self.m.stats()
        with pytest.raises(aq.InvalidArgumentError):
            self.m.offload(v, release=release)
        g.check_paged_out()
        after = self.m.stats()
        for k in ("offloads", "live_handles", "bytes_offloaded"):
            assert after[k] == before[k]

    @precondition(lambda self: self.fetchable())
    @rule(data=st.data())
    def fetch(self, data):
        rec = data.draw(st.sampled_from(self.fetchable()))
        h = rec.handle
        how = data.draw(st.sampled_from(["manager", "module", "by_tensor", "out"]))
        if how == "module":
            out = aq.fetch(h)
        elif how == "by_tensor" and h.release:
            # any view of the paged-out storage finds its handle
            out = self.m.fetch(data.draw(st.sampled_from(rec.group.views)))
        elif how == "out" and not h.release:
            given = torch.empty(h.shape, dtype=h.dtype, device=self.dev)
            out = self.m.fetch(h, out=given)
            assert out is given
        else:
            out = self.m.fetch(h)
        self.check_fetched(rec, out, how)

    @precondition(lambda self: self.recs)
    @rule(data=st.data())
    def free(self, data):
        rec = data.draw(st.sampled_from(self.recs))
        h = rec.handle
        if data.draw(st.booleans()):
            h.free()
        else:
            self.m.free(h)
        assert h.state == "freed"
        self.recs.remove(rec)
        self.counts["frees"] += 1
        if h.release and not rec.kept:
            g = rec.group
            for v in g.views:  # the data is gone: empty storage, no longer paged out
                assert not aq.is_offloaded(v)
                assert v.untyped_storage().nbytes() == 0
            g.state = "dead"
            self.groups.remove(g)
        with pytest.raises(aq.InvalidHandleError):
            self.m.free(h)
        with pytest.raises(aq.InvalidHandleError):
            self.m.fetch(h)

    @precondition(lambda self: self.recs)
    @rule(data=st.data())
    def wait_and_ready(self, data):
        h = data.draw(st.sampled_from(self.recs)).handle
        first = h.ready()
        assert isinstance(first, bool)
        h.wait()
        assert h.ready()
        assert h.state == "offloaded"
        assert "offloaded" in repr(h)

    @rule()
    def synchronize(self):
        self.m.synchronize()
        s = self.m.stats()
        self.follow_migrations()
        for t in s["tiers"]:
            assert t["used"] == self.used_by_model(t["location"])
            assert t["blocks"] == sum(1 for r in self.recs
                                      if r.loc == t["location"] and r.handle.nbytes > 0)
            assert t["fenced"] == 0, t  # every copy completed: nothing is fenced any more
        for r in self.recs:
            assert r.handle.ready()
            assert r.handle.state == "offloaded"

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def offload_many(self, data):
        groups = data.draw(st.lists(st.sampled_from(self.resident()), min_size=1, max_size=3,
                                    unique_by=id))
        release = data.draw(st.booleans())
        idx = [data.draw(st.integers(0, len(g.views) - 1)) for g in groups]
        tensors = [g.views[i] for g, i in zip(groups, idx)]
        sizes = [g.nbytes() if release else g.view_refs[i].numel() for g, i in zip(groups, idx)]
        before = self.m.stats()
        try:
            hs = self.m.offload_many(tensors, release=release)
        except aq.OutOfMemoryError as e:
            # all or nothing, in one call into the core: no handle was created, no counter moved
            # (victims evicted while looking for room may have moved down a tier, intact)
            after = self.m.stats()
            assert after["live_handles"] == before["live_handles"]
            for k in ("offloads", "bytes_offloaded", "fetches", "frees"):
                assert after[k] == before[k], k
            assert e.requested in sizes
            for g in groups:
                g.check_intact()
            return
        assert len(hs) == len(tensors)
        for g, i, t, h, n in zip(groups, idx, tensors, hs, sizes):
            assert h.release == release and h.nbytes == n
            if release:
                g.state = "offloaded"
                self.recs.append(Rec(h, tensor=t, group=g, ref=None))
            else:
                self.recs.append(Rec(h, tensor=t, group=None, ref=g.view_refs[i]))
            self.note_offload(h)
        for g in groups:
            if release:
                g.check_paged_out()
            else:
                g.check_intact()

    @precondition(lambda self: any(len(g.views) >= 2 for g in self.resident()))
    @rule(data=st.data())
    def offload_many_rolls_back(self, data):
        """Two views of one storage in one release batch: the second is refused and the first
        is paged back in, bytes intact."""
        g = data.draw(st.sampled_from([g for g in self.resident() if len(g.views) >= 2]))
        i, j = data.draw(st.lists(st.integers(0, len(g.views) - 1), min_size=2, max_size=2,
                                  unique=True))
        before = self.m.stats()
        with pytest.raises((aq.InvalidArgumentError, aq.OutOfMemoryError)) as info:
            self.m.offload_many([g.views[i], g.views[j]], release=True)
        event(f"offload_many rollback: {type(info.value).__name__}")
        after = self.m.stats()
        g.check_intact()
        assert after["live_handles"] == before["live_handles"]
        for k in ("offloads", "bytes_offloaded", "fetches", "bytes_fetched"):
            assert after[k] == before[k], k  # refused before anything was offloaded

    @precondition(lambda self: self.fetchable())
    @rule(data=st.data())
    def fetch_many(self, data):
        recs = data.draw(st.lists(st.sampled_from(self.fetchable()), min_size=1, max_size=4,
                                  unique_by=id))
        if data.draw(st.booleans()):
            before = self.m.stats()
            with pytest.raises(aq.InvalidArgumentError):
                self.m.fetch_many([r.handle for r in recs] + [recs[0].handle])
            after = self.m.stats()
            assert after["fetches"] == before["fetches"]  # checked before any fetch
            for r in recs:
                assert r.handle.state in ("in_flight", "offloaded")
        outs = self.m.fetch_many([r.handle for r in recs])
        assert len(outs) == len(recs)
        for r, out in zip(recs, outs):
            self.check_fetched(r, out, "fetch_many")

    @rule(data=st.data(), release=st.booleans(), dtype=st.sampled_from(DTYPES),
          extra=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
    def offload_too_big(self, data, release, dtype, extra, seed):
        """Bigger than every tier's capacity: OutOfMemoryError, nothing changed (no eviction is
        even tried), tensor untouched. (Smaller requests may succeed by evicting down the
        cascade: see test_cascade.py.)"""
        self.m.synchronize()
        before = self.m.stats()
        largest = max(t["capacity"] for t in before["tiers"])
        es = esize(dtype)
        n = -(-(largest + 1) // es) + extra
        t = random_storage(n * es, seed, dtype, self.dev).view(dtype)
        ref = storage_bytes(t)
        with pytest.raises(aq.OutOfMemoryError) as info:
            self.m.offload(t, release=release)
        assert info.value.requested == n * es
        assert "no tier has a free block" in str(info.value)
        assert not aq.is_offloaded(t)
        assert same_bytes(storage_bytes(t), ref)
        assert self.m.stats() == before

    # -- cascade, lending, prefetch, incremental offload --------------------------------------
    @rule(data=st.data(), nbytes=st.sampled_from([2 << 10, 4 << 10, 6 << 10, 8 << 10, 12 << 10,
                                                  16 << 10, 3000, 5000]),
          count=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
    def evict_pressure(self, data, nbytes, count, seed):
        """Offloads that exceed what the peer tier has free: the cascade moves victims down
        (lower priority first, then the policy; never a prefetched one) to make room."""
        for i in range(count):
            release = data.draw(st.booleans())
            priority = data.draw(st.sampled_from([0, 0, -1, 1, 2.5]))
            g = Group(torch.uint8, (nbytes,), 0, 0, seed + i, device=self.dev)
            before = self.m.stats()
            try:
                h = self.m.offload(g.views[0], release=release, priority=priority)
            except aq.OutOfMemoryError as e:
                g.check_intact()
                self.check_oom(e, nbytes)
                return
            after = self.m.stats()
            if after["evictions"] > before["evictions"]:
                event("evict_pressure: the cascade moved handles down")
                assert after["migrations"] > before["migrations"]
                assert after["bytes_migrated"] > before["bytes_migrated"]
            assert h.priority == priority and h.nbytes == nbytes
            if release:
                self.groups.append(g)
                g.state = "offloaded"
                g.check_paged_out()
                self.recs.append(Rec(h, tensor=g.views[0], group=g, ref=None))
            else:
                g.check_intact()
                self.recs.append(Rec(h, tensor=g.views[0], group=None, ref=g.view_refs[0]))
            self.note_offload(h)
            self.follow_migrations()

    @rule(nbytes=st.sampled_from([256, 1024, 4096, 8192]))
    def lend(self, nbytes):
        cap = self.m.lend(self.peer, nbytes)
        self.segments.append((nbytes, True))
        assert cap == self.peer_capacity()
        self.counts["lends"] += 1
        self.counts["bytes_lent"] += nbytes

    @rule(data=st.data())
    def reclaim(self, data):
        cap = self.peer_capacity()
        amount = data.draw(st.one_of(st.none(), st.integers(0, cap), st.integers(cap + 1,
                                                                                 cap + 5000)))
        self.m.synchronize()  # so that "nothing changed" compares settled numbers
        before = self.m.stats()
        if amount is not None and amount > cap:
            with pytest.raises(aq.InvalidArgumentError):
                self.m.reclaim(self.peer, amount)
            assert self.m.stats() == before
            return
        want = cap if amount is None else amount
        chosen, covered = 0, 0
        while covered < want:  # whole segments, newest first
            chosen += 1
            covered += self.segments[-chosen][0]
        try:
            got = self.m.reclaim(self.peer, amount)
        except aq.OutOfMemoryError as e:
            # the host tier could not take a handle: nothing reclaimed, no byte lost
            event("reclaim: OutOfMemoryError")
            assert e.requested > 0
            after = self.m.stats()
            assert after["tiers"][0]["capacity"] == cap
            assert after["tiers"][0]["segments"] == len(self.segments)
            for k in ("reclaims", "bytes_reclaimed", "live_handles", "offloads", "fetches"):
                assert after[k] == before[k], k
            return
        assert got == covered
        if chosen:
            event("reclaim: segments handed back")
            del self.segments[-chosen:]
            self.counts["reclaims"] += 1
            self.counts["bytes_reclaimed"] += covered
            s = self.m.stats()
            assert s["reclaim_last_s"] > 0
            assert s["reclaim_max_s"] >= s["reclaim_last_s"]
            assert s["reclaim_total_s"] >= s["reclaim_max_s"]
            assert s["tiers"][0]["used"] <= s["tiers"][0]["capacity"]
        else:
            assert self.m.stats() == before  # nothing asked: nothing done
        if not self.segments:  # everything taken back: every block left the peer
            for r in self.recs:
                assert r.handle.nbytes == 0 or r.handle.location == "cpu"

    @precondition(lambda self: self.fetchable())
    @rule(data=st.data())
    def prefetch(self, data):
        rec = data.draw(st.sampled_from(self.fetchable()))
        h = rec.handle
        assert self.m.prefetch(h) is h
        if not rec.prefetched:
            rec.prefetched = True
            if h.nbytes > 0:  # a zero-byte handle has nothing to copy
                self.counts["prefetches"] += 1
                self.counts["bytes_fetched"] += h.nbytes

    @precondition(lambda self: self.fetchable())
    @rule(data=st.data(), grow=st.sampled_from([None, 0, 1, 200, 256, 3000, 9000]),
          release=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def fetch_keep_then_incremental(self, data, grow, release, seed):
        """fetch(keep=True) leaves the tier copy alive; offload(t, base=h) of a tensor whose
        bytes extend h's copies only the suffix when h's block has room, else a full copy into
        a block with 2x headroom; h is consumed."""
        rec = data.draw(st.sampled_from(self.fetchable()))
        h = rec.handle
        live_before = self.m.stats()["live_handles"]
        out = self.m.fetch(h, keep=True)
        self.note_fetch(rec)
        assert self.m.stats()["live_handles"] == live_before
        assert h.state in ("in_flight", "offloaded")
        if h.release:
            assert out is rec.tensor
            rec.group.state = "resident"
            rec.group.check_intact()
            rec.kept = True
            rec.ref = rec.group.storage_ref
            rec.group = rec.tensor = None
            with pytest.raises(aq.InvalidHandleError):
                self.m.fetch(h)
        else:
            assert same_bytes(tensor_bytes(out), rec.ref)
        if grow is None:
            return
        prefix = rec.ref
        base_n = h.nbytes
        assert prefix.numel() == base_n
        if base_n > 0 and data.draw(st.booleans()):
            self.m.synchronize()
            before = self.m.stats()
            with pytest.raises(aq.InvalidArgumentError):  # the base holds more bytes
                self.m.offload(prefix[:-1].to(self.dev, copy=True), release=False, base=h)
            assert self.m.stats() == before
        suffix = random_storage(grow, seed, torch.uint8)
        g = Group(torch.uint8, (base_n + grow,), 0, 0, seed, device=self.dev)
        dst = g.views[0]
        dst.copy_(torch.cat([prefix, suffix]))
        g.snap()
        n = base_n + grow
        self.follow_migrations()
        room, loc = rec.block, rec.loc
        try:
            h2 = self.m.offload(dst, release=release, base=h)
        except aq.OutOfMemoryError as e:
            g.check_intact()
            self.check_oom(e, n)
            assert h.state in ("in_flight", "offloaded")  # the base is still there
            return
        assert h.state == "freed"
        with pytest.raises(aq.InvalidHandleError):
            self.m.free(h)
        self.recs.remove(rec)
        self.counts["offloads"] += 1
        self.counts["incremental_offloads"] += 1
        if release:
            self.groups.append(g)
            g.state = "offloaded"
            g.check_paged_out()
            new = Rec(h2, tensor=dst, group=g, ref=None)
        else:
            g.check_intact()
            new = Rec(h2, tensor=dst, group=None, ref=g.view_refs[0])
        assert h2.nbytes == n
        self.follow_migrations()
        if base_n > 0 and room >= n:
            event("incremental offload: suffix only")
            assert h2.location == loc
            new.block = room
            self.counts["bytes_offloaded"] += grow
            self.counts["incremental_bytes_saved"] += base_n
        else:
            event("incremental offload: growth")
            self.counts["bytes_offloaded"] += n
            if n > 0:  # 2x headroom, or the exact size when only that fitted
                t = next(t for t in self.m.stats()["tiers"] if t["location"] == h2.location)
                new.block = t["used"] - self.used_by_model(h2.location)
                assert new.block in (align(max(n, 2 * room)), align(n)), (new.block, n, room)
        self.recs.append(new)

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def accounting(self):
        s = self.m.stats()
        assert s["live_handles"] == len(self.recs)
        for k, v in self.counts.items():
            assert s[k] == v, k
        assert s["prefetched_bytes"] == sum(r.handle.nbytes for r in self.recs if r.prefetched)
        caps = [self.peer_capacity(), HOST_BYTES]
        self.follow_migrations()
        for i, kind in enumerate(self.kinds):
            t = s["tiers"][i]
            assert t["capacity"] == caps[i]
            assert t["used"] + t["free"] == t["capacity"]
            assert t["largest_free"] <= t["free"]
            if i == 0:
                assert t["segments"] == len(self.segments)
                assert t["lent_segments"] == sum(lent for _, lent in self.segments)
            here = [r for r in self.recs if r.loc == t["location"]]
            assert all(r.handle.tier == kind for r in here)
            # a zero-byte handle holds no block and counts on tier 0 (its h.tier says so)
            assert t["handles"] == len(here)
            # fenced bytes are free (reusable in stream order), never part of used
            assert type(t["fenced"]) is int and t["fenced"] >= 0, t
            assert t["used"] == self.used_by_model(t["location"]), t
            assert t["blocks"] == sum(1 for r in here if r.handle.nbytes > 0)
        assert sum(t["handles"] for t in s["tiers"]) == len(self.recs)

    @invariant()
    def group_states(self):
        for g in self.groups:
            if g.state == "offloaded":
                g.check_paged_out()
            else:
                for v in g.views:
                    assert not aq.is_offloaded(v)

    def teardown(self):
        try:
            for rec in list(self.recs):
                if rec.kept:
                    self.m.free(rec.handle)
                    self.recs.remove(rec)
                else:
                    self.check_fetched(rec, self.m.fetch(rec.handle), "teardown")
            self.m.synchronize()
            s = self.m.stats()
            assert s["live_handles"] == 0 and s["prefetched_bytes"] == 0
            for t in s["tiers"]:
                assert t["used"] == 0 and t["fenced"] == 0 and t["blocks"] == 0, t
                assert t["handles"] == 0
                assert t["free_ranges"] == t["segments"]
            peer = s["tiers"][0]
            assert peer["largest_free"] == max((n for n, _ in self.segments), default=0)
            for g in self.groups:
                g.check_intact()
        finally:
            self.m.close()


SETTINGS = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)


def machine_for(name: str):
    """The machine's TestCase on one backend (a subclass with ``backend`` set); the CUDA one is
    marked ``cuda`` (skipped with a reason when no GPU is usable, see conftest.py)."""
    machine = type(f"OffloadMachine{name.capitalize()}", (OffloadMachine,),
                   {"backend": Backend(name), "__module__": __name__})
    case = machine.TestCase
    case.settings = SETTINGS
    if name == "cuda":
        case.pytestmark = [pytest.mark.cuda]
    return case


TestOffloadMachineEmulation = machine_for("emulation")
TestOffloadMachineCuda = machine_for("cuda")


class TestOffloadMachineOldTorch(machine_for("emulation")):
    """The machine with what torch 2.9 and older take, forced on whatever torch runs the suite:
    release without ``_swap_data_ptr_`` (Note [Without _swap_data_ptr_] in storage.py) and the
    registry holding storage objects, swept often (Note [Storage objects and the cyclic GC] in
    storage_pins.py; on torch 2.3 this machine lost a tensor's bytes before that note)."""

    def setUp(self) -> None:
        self._old = (storage.CAN_SWAP, storage_pins.ENABLED, storage_pins.MIN_SWEEP)
        storage.CAN_SWAP, storage_pins.ENABLED, storage_pins.MIN_SWEEP = False, True, 4

    def tearDown(self) -> None:
        storage.sweep_pins()
        storage.CAN_SWAP, storage_pins.ENABLED, storage_pins.MIN_SWEEP = self._old


def test_zero_byte_handles_live_on_tier_zero(backend):
    """The accounting invariant above relies on this: a handle with no bytes holds no block
    and is counted on the first tier."""
    with backend.manager(peer_bytes=PEER_BYTES, host_bytes=HOST_BYTES) as m:
        t = torch.empty(0, dtype=torch.float32, device=backend.device)
        h = m.offload(t, release=False)
        s = m.stats()
        assert h.nbytes == 0 and h.tier == "peer"
        assert s["tiers"][0]["handles"] == 1 and s["tiers"][0]["blocks"] == 0
        assert m.fetch(h).shape == (0,)
