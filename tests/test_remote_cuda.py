"""A lender registering GPU memory (``device="cuda:N"``), borrowed into host and GPU memory.
Marked ``cuda``: skipped with a reason where no GPU is usable (as on the 2-core CI machine)."""

from __future__ import annotations

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

import aqua_offload as aq
from aqua_offload.remote import Lender
from conftest import random_tensor

pytestmark = [*needs_nixl, pytest.mark.cuda]
MiB = 1 << 20


def test_gpu_arena_round_trip_from_host_and_gpu(remote_clients) -> None:
    dev = torch.cuda.device_count() - 1  # the last GPU lends (on one GPU: the same one)
    with Lender(TOKEN, device=f"cuda:{dev}", nbytes="16MiB", segment_bytes="4MiB") as lender:
        assert lender.kind == "VRAM" and lender.stats()["arena_bytes"] == 16 * MiB
        c = remote_clients(lender.address)
        host = random_tensor((4 * MiB,), torch.uint8, generator=torch.Generator().manual_seed(1))
        gpu = random_tensor((4 * MiB,), torch.uint8, device="cuda:0",
                            generator=torch.Generator().manual_seed(2))
        rh, rg = c.register(host), c.register(gpu)
        a, b = c.allocate([4 * MiB, 4 * MiB])
        torch.cuda.synchronize()  # NIXL reads `gpu` outside torch's streams: fill it first
        c.write([(rh, a, 0, 4 * MiB), (rg, b, 0, 4 * MiB)])  # DRAM and VRAM in one call
        torch.cuda.synchronize()
        back_h = torch.zeros(4 * MiB, dtype=torch.uint8)
        back_g = torch.zeros(4 * MiB, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()  # the zeros are written before NIXL writes over them
        c.read([(c.register(back_h), b, 0, 4 * MiB), (c.register(back_g), a, 0, 4 * MiB)])
        torch.cuda.synchronize()
        assert torch.equal(back_h, gpu.cpu()) and torch.equal(back_g.cpu(), host)
        ticket = lender.reclaim(4 * MiB)  # an empty segment: released at once
        assert ticket.wait(20) and lender.stats()["arena_bytes"] == 12 * MiB


@pytest.fixture
def remote_managers_cuda():
    """Factory of managers of cuda:0 over lenders (``make(*lenders, host="4KiB")``: every
    tensor above 4 KiB goes to a lender), closed at teardown."""
    made: list[aq.OffloadManager] = []

    def make(*lenders, host: str = "4KiB") -> aq.OffloadManager:
        m = aq.OffloadManager("cuda:0", peers=None, host_bytes=host,
                              remote=[lender.address for lender in lenders], remote_token=TOKEN)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def _gpu_rand(n: int, seed: int) -> torch.Tensor:
    return random_tensor((n,), torch.uint8, device="cuda:0",
                         generator=torch.Generator().manual_seed(seed))


def test_a_cuda_manager_pages_through_host_and_gpu_lenders(remote_managers_cuda) -> None:
    """The remote tier on the CUDA backend (pinned staging, raw_copy_many): releases and
    snapshots of GPU tensors spill to a host-memory and a GPU-memory lender and come back
    bitwise, through batches, a prefetch fetched on another stream, and a reclaim that moves
    one lender's handles to the other."""
    with Lender(TOKEN, host_bytes="32MiB", segment_bytes="8MiB") as host_lender, \
            Lender(TOKEN, device="cuda:0", nbytes="32MiB", segment_bytes="8MiB") as gpu_lender:
        m = remote_managers_cuda(host_lender, gpu_lender)
        sizes = [4096, 1, 300 * 1024, 5 * MiB, 64 * 1024, 2 * MiB + 3]
        ts = [_gpu_rand(n, 10 + i) for i, n in enumerate(sizes)]
        refs = [t.clone() for t in ts]
        hs = m.offload_many(ts)  # release: 4 KiB of host tier, so nearly all go remote
        assert {h.tier for h in hs} >= {"remote"}
        assert all(aq.is_offloaded(t) for t in ts)
        back = m.fetch_many(hs)
        assert all(b is t and torch.equal(t, r) for b, t, r in zip(back, ts, refs))
        # snapshots, one prefetched on a side stream and fetched on another
        snaps = [_gpu_rand(n, 40 + i) for i, n in enumerate(sizes)]
        hs = m.offload_many(snaps, release=False)
        for s in snaps:
            s.zero_()  # the copies were taken before: the sources are free to change
        side, other = torch.cuda.Stream(), torch.cuda.Stream()
        with torch.cuda.stream(side):
            hs[3].prefetch()
        with torch.cuda.stream(other):
            got = m.fetch_many(hs)
        other.synchronize()
        for i, g in enumerate(got):
            assert torch.equal(g, _gpu_rand(sizes[i], 40 + i)), i
        # a reclaim of one lender's blocks moves them to the other lender
        ts = [_gpu_rand(MiB, 70 + i) for i in range(8)]
        refs = [t.clone() for t in ts]
        hs = m.offload_many(ts)
        lenders = {h.location for h in hs if h.tier == "remote"}
        victim = host_lender if host_lender.address in lenders else gpu_lender
        moved = [h for h in hs if h.location == victim.address]
        assert moved and victim.reclaim(32 * MiB).wait(30)
        assert all(h.tier == "remote" and h.location != victim.address for h in moved)
        assert all(m.fetch(h) is t and torch.equal(t, r) for h, t, r in zip(hs, ts, refs))
        assert m.stats()["remote"]["lost_handles"] == 0
        m.close()  # before the lenders go


def test_remote_transfers_wait_for_their_stream_not_the_device(remote_managers_cuda) -> None:
    """A remote offload and fetch of a CUDA manager wait for their own staging copies before
    NIXL touches the buffer, on the caller's stream only: another stream's work (a kernel
    sleeping ~2 s, standing for another workload) is still running when they return, and the
    bytes are right."""
    with Lender(TOKEN, host_bytes="32MiB", segment_bytes="8MiB") as lender:
        m = remote_managers_cuda(lender)
        ts = [_gpu_rand(n, 90 + i) for i, n in enumerate([64 * 1024, MiB, 3 * MiB + 5])]
        refs = [t.clone() for t in ts]
        other = torch.cuda.Stream()
        with torch.cuda.stream(other):
            torch.cuda._sleep(4_000_000_000)  # cycles: ~2 s at an H100/H200's ~2 GHz
            asleep = torch.cuda.Event()
            asleep.record(other)
        hs = m.offload_many(ts, release=False)
        assert {h.tier for h in hs} == {"remote"}
        assert not asleep.query(), "the offload waited for another stream's kernel"
        got = m.fetch_many(hs)
        assert not asleep.query(), "the fetch waited for another stream's kernel"
        assert all(torch.equal(g, r) for g, r in zip(got, refs))
        other.synchronize()
        m.close()
