"""The model of test_stateful.py's machine (Note [Stateful model] there): groups of tensors
viewing one random storage, the record of a live handle, the Hypothesis menus of dtypes and
shapes the groups are drawn from, and ``OffloadModel``, the machine's state and shared checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event
from hypothesis import strategies as st

import aqua_offload as aq
from conftest import Backend
from helpers import align
from helpers import bits as tensor_bytes
from helpers import storage_bits as storage_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
          torch.complex64, torch.int16, torch.float64]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)

PEER_BYTES = 16 << 10  # the machine's tiers: small, so eviction and OOM happen often
HOST_BYTES = 64 << 10


def esize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def random_storage(nbytes: int, seed: int, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Random bytes on ``device``; for bool, random 0/1 so every byte is a valid bool."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw &= 1
    return raw.to(device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two byte tensors (tensor_bytes/storage_bytes: on the CPU) are equal."""
    return a.shape == b.shape and torch.equal(a, b)


class Group:
    """A storage and the tensors viewing it (Note [Stateful model], test_stateful.py)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], front: int, back: int,
                 seed: int, *, device: torch.device) -> None:
        es = esize(dtype)
        n = math.prod(shape)
        raw = random_storage((front + n + back) * es, seed, dtype, device)
        base = raw[front * es:(front + n) * es].view(dtype).reshape(shape)
        self.dtype = dtype
        self.views = [base, raw]
        flat = base.view(-1)
        self.views += [flat[::3], flat[:0]]
        if base.dim() >= 1 and base.shape[0] > 1:
            self.views.append(base[1:])
        if base.dim() >= 2:
            self.views += [base.transpose(0, 1), base[:, 1::2]]
        if base.dim() >= 3:
            self.views.append(base.permute(2, 0, 1)[..., ::2])
        self.state = "resident"
        self.snap()

    def snap(self) -> None:
        """Record the reference bytes of the storage and of every view (resident only)."""
        assert self.state == "resident"
        self.storage_ref = storage_bytes(self.views[0])
        self.view_refs = [tensor_bytes(v) for v in self.views]

    def nbytes(self) -> int:
        return self.views[0].untyped_storage().nbytes()

    def check_intact(self) -> None:
        assert self.state == "resident"
        for v in self.views:
            assert not aq.is_offloaded(v)
        assert same_bytes(storage_bytes(self.views[0]), self.storage_ref)
        for v, ref in zip(self.views, self.view_refs):
            assert same_bytes(tensor_bytes(v), ref)

    def check_paged_out(self) -> None:
        # Metadata only: reading the data of a paged-out tensor would crash.
        for v in self.views:
            assert aq.is_offloaded(v)
            assert v.untyped_storage().nbytes() == 0


class Rec:
    """A live handle in the model."""

    def __init__(self, handle: aq.Handle, *, tensor: torch.Tensor, group: Group | None,
                 ref: torch.Tensor | None) -> None:
        self.handle = handle
        self.tensor = tensor  # release: the object fetch must return
        self.group = group    # release: the group paged out
        self.ref = ref        # snapshot: the bytes fetch must return; kept: the bytes held
        self.loc = handle.location  # where the model last saw it
        self.block = align(handle.nbytes)  # bytes of its pool block (0: none)
        self.kept = False        # a release fetched with keep=True: only base= or free
        self.prefetched = False  # a prefetch of it was started and not yet fetched


# Hypothesis favours small integers; sizes drawn from fixed menus reach full pools too.
_dim = st.sampled_from([1, 2, 3, 5, 8, 13, 0, 31, 64, 100])
group_specs = st.tuples(
    st.sampled_from(DTYPES),
    st.one_of(
        st.lists(_dim, min_size=0, max_size=3).map(tuple),
        st.tuples(st.sampled_from([700, 1500, 2500, 3999, 1]), st.sampled_from([1, 2, 3])),
    ),
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(0, 2**31 - 1),
)


class OffloadModel:
    """What the machine knows of the manager it drives: its groups, the records of live handles,
    the counters and the peer tier's segments, and the checks every rule shares. ``backend`` is
    set by the machine's subclass (test_stateful.machine_for)."""

    backend: Backend

    def __init__(self) -> None:
        super().__init__()
        self.dev = self.backend.device
        self.peer = self.backend.peer_label
        self.m = aq.OffloadManager(self.dev, peers=[self.backend.peer], peer_bytes=PEER_BYTES,
                                   host_bytes=HOST_BYTES)
        self.kinds = [t["tier"] for t in self.m.stats()["tiers"]]
        assert self.kinds == ["peer", "host"]
        self.groups: list[Group] = []
        self.recs: list[Rec] = []
        self.counts = {"offloads": 0, "fetches": 0, "frees": 0,
                       "bytes_offloaded": 0, "bytes_fetched": 0, "prefetches": 0,
                       "incremental_offloads": 0, "incremental_bytes_saved": 0,
                       "lends": 0, "bytes_lent": 0, "reclaims": 0, "bytes_reclaimed": 0}
        self.segments = [(PEER_BYTES, False)]  # the peer tier's (size, lent), oldest first

    # -- helpers --------------------------------------------------------------------------
    def resident(self) -> list[Group]:
        return [g for g in self.groups if g.state == "resident"]

    def paged_out(self) -> list[Group]:
        return [g for g in self.groups if g.state == "offloaded"]

    def check_oom(self, exc: aq.OutOfMemoryError, nbytes: int) -> None:
        """An OOM is only allowed when, with every copy done, no tier has a range that big."""
        event("OutOfMemoryError with the pools nearly full")
        assert isinstance(exc, MemoryError) and isinstance(exc, aq.OffloadError)
        assert exc.requested == nbytes
        self.m.synchronize()
        for t in self.m.stats()["tiers"]:
            assert t["largest_free"] < align(nbytes), (t, nbytes)

    def note_offload(self, h: aq.Handle) -> None:
        self.counts["offloads"] += 1
        self.counts["bytes_offloaded"] += h.nbytes

    def note_fetch(self, rec: Rec) -> None:
        self.counts["fetches"] += 1
        if not rec.prefetched:  # a prefetch counted its bytes already
            self.counts["bytes_fetched"] += rec.handle.nbytes
        rec.prefetched = False

    def fetchable(self) -> list[Rec]:
        return [r for r in self.recs if not r.kept]

    def peer_capacity(self) -> int:
        return sum(size for size, _ in self.segments)

    def follow_migrations(self) -> None:
        """Handles only move down (peer -> host); a moved handle has an exact-size block."""
        for r in self.recs:
            loc = r.handle.location
            if loc != r.loc:
                assert (r.loc, loc) == (self.peer, "cpu"), (r.loc, loc)
                r.loc = loc
                r.block = align(r.handle.nbytes)

    def used_by_model(self, location: str, but: Rec | None = None) -> int:
        return sum(r.block for r in self.recs if r.loc == location and r is not but)

    def do_offload_release(self, g: Group, v: torch.Tensor,
                           default: bool = False) -> aq.Handle | None:
        nbytes = g.nbytes()
        try:
            h = self.m.offload(v) if default else self.m.offload(v, release=True)
        except aq.OutOfMemoryError as e:
            g.check_intact()
            self.check_oom(e, nbytes)
            return None
        assert h.release and h.nbytes == nbytes
        assert h.shape == v.shape and h.dtype == v.dtype
        assert h.tier in ("peer", "host")
        assert h.location == ("cpu" if h.tier == "host" else self.peer)
        assert h.state in ("in_flight", "offloaded")
        g.state = "offloaded"
        g.check_paged_out()
        self.recs.append(Rec(h, tensor=v, group=g, ref=None))
        self.note_offload(h)
        return h

    def do_offload_snapshot(self, g: Group, i: int) -> aq.Handle | None:
        v = g.views[i]
        ref = g.view_refs[i]
        try:
            h = self.m.offload(v, release=False)
        except aq.OutOfMemoryError as e:
            g.check_intact()
            self.check_oom(e, ref.numel())
            return None
        assert not h.release and h.nbytes == ref.numel()
        assert h.shape == v.shape and h.dtype == v.dtype
        g.check_intact()  # a snapshot leaves its source alone
        self.recs.append(Rec(h, tensor=v, group=None, ref=ref))
        self.note_offload(h)
        return h

    def check_fetched(self, rec: Rec, out: torch.Tensor, how: str) -> None:
        h = rec.handle
        if h.release:
            assert out is rec.tensor, how
            rec.group.state = "resident"
            rec.group.check_intact()  # storage and every view see the restored bytes
        else:
            assert out.shape == h.shape and out.dtype == h.dtype and out.is_contiguous()
            assert out.untyped_storage().data_ptr() != rec.tensor.untyped_storage().data_ptr() \
                or out.numel() == 0
            assert same_bytes(tensor_bytes(out), rec.ref), how
        assert h.state == "fetched"
        assert h.ready()
        h.wait()  # a no-op once fetched
        self.recs.remove(rec)
        self.note_fetch(rec)
        with pytest.raises(aq.InvalidHandleError):
            self.m.fetch(h)
        with pytest.raises(aq.InvalidHandleError):
            self.m.free(h)
