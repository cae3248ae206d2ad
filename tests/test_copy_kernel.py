"""The CUDA copy kernel for batches of small pieces (Note [Copy kernel] in
cpp/src/cuda/copy_kernel.hpp; opt-in with AQUA_COPY_KERNEL=1, switched here with
``_core.copy_kernel``): every piece lands bitwise, aligned or not, to and from each tier and
through the raw copies of the remote tier's staging; a batch with a piece above the kernel's
limit goes to the DMA engines; off by default, never taken on emulation. The kernel exists only
on CUDA: those tests are marked ``cuda``."""

from __future__ import annotations

import os

import pytest
import torch

import aqua_offload as aq
from aqua_offload import _core
from conftest import random_tensor

KiB, MiB = 1 << 10, 1 << 20
# odd sizes and byte offsets: the kernel's 16-byte path, its byte tail and its byte path
SIZES = [1, 15, 16, 17, 255, 4 * KiB, 4 * KiB + 3, 64 * KiB, 64 * KiB + 1, 300 * KiB, MiB]


def _pieces(dev: torch.device, seed: int) -> list[torch.Tensor]:
    """Views of one buffer at odd byte offsets (their snapshots copy from unaligned memory)."""
    g = torch.Generator().manual_seed(seed)
    base = random_tensor((sum(SIZES) + 3 * len(SIZES),), torch.uint8, device=str(dev),
                         generator=g)
    out, at = [], 0
    for i, n in enumerate(SIZES):
        at += i % 4  # offsets 0, 1, 2, 3 past the previous piece
        out.append(base[at:at + n])
        at += n
    return out


def _kernels(m: aq.OffloadManager) -> int:
    return m.stats()["batch_kernels"]


@pytest.fixture
def kernel_on():
    """The copy kernel switched on for the test, the previous setting restored after."""
    was = _core.copy_kernel()
    _core.copy_kernel(True)
    yield
    _core.copy_kernel(was)


@pytest.mark.cuda
@pytest.mark.parametrize("tier", ["peer", "host"])
def test_snapshot_batches_through_the_copy_kernel(kernel_on, tier):
    dev = torch.device("cuda", 0)
    peer = 1 if torch.cuda.device_count() > 1 else 0
    with aq.OffloadManager(dev, peers=[peer] if tier == "peer" else None, peer_bytes="16MiB",
                           host_bytes="16MiB") as m:
        ts = _pieces(dev, 1)
        refs = [t.clone() for t in ts]
        before = m.stats()
        hs = m.offload_many(ts, release=False)
        assert {h.tier for h in hs} == {tier}
        got = m.fetch_many(hs)
        after = m.stats()
        assert after["batch_kernels"] - before["batch_kernels"] == 2  # offload and fetch
        assert after["batched_submissions"] == before["batched_submissions"]
        assert all(torch.equal(g, r) for g, r in zip(got, refs))
        # into outs at odd offsets too
        outs = [o.fill_(0) for o in _pieces(dev, 2)]
        m.fetch_many(m.offload_many(ts, release=False), outs=outs)
        assert all(torch.equal(o, r) for o, r in zip(outs, refs))


@pytest.mark.cuda
def test_release_batches_through_the_copy_kernel(kernel_on):
    dev = torch.device("cuda", 0)
    with aq.OffloadManager(dev, peers=None, host_bytes="16MiB") as m:
        g = torch.Generator().manual_seed(3)
        ts = [random_tensor((n,), torch.uint8, device="cuda:0", generator=g) for n in SIZES]
        refs = [t.clone() for t in ts]
        k = _kernels(m)
        hs = m.offload_many(ts)
        assert all(aq.is_offloaded(t) for t in ts)
        assert m.fetch_many(hs) == ts and _kernels(m) - k == 2
        assert all(torch.equal(t, r) for t, r in zip(ts, refs))


@pytest.mark.cuda
def test_a_piece_above_the_kernels_limit_sends_the_batch_to_the_dma_engines(kernel_on):
    dev = torch.device("cuda", 0)
    with aq.OffloadManager(dev, peers=None, host_bytes="16MiB") as m:
        g = torch.Generator().manual_seed(4)
        ts = [random_tensor((n,), torch.uint8, device="cuda:0", generator=g)
              for n in (4 * KiB, MiB + 256, 17)]
        k = _kernels(m)
        got = m.fetch_many(m.offload_many(ts, release=False))
        assert _kernels(m) == k
        assert all(torch.equal(a, b) for a, b in zip(got, ts))


@pytest.mark.cuda
def test_staging_copies_through_the_copy_kernel(kernel_on):
    """raw_copy_many (the remote tier's staging) of unaligned pieces, device to pinned host and
    back, waited for on its stream."""
    dev = torch.device("cuda", 0)
    with aq.OffloadManager(dev, peers=None, host_bytes="1MiB") as m:
        ts = _pieces(dev, 5)
        host = torch.zeros(sum(SIZES) + 64, dtype=torch.uint8, pin_memory=True)
        offs, at = [], 5
        for n in SIZES:
            offs.append(at)
            at += n
        core, stream = m._store, torch.cuda.current_stream(dev).cuda_stream
        k = _kernels(m)
        core.raw_copy_many([host.data_ptr() + o for o in offs], [t.data_ptr() for t in ts],
                           SIZES, stream, wait=True)
        assert all(torch.equal(host[o:o + n], t.cpu()) for o, n, t in zip(offs, SIZES, ts))
        back = [torch.zeros_like(t) for t in ts]
        core.raw_copy_many([b.data_ptr() for b in back], [host.data_ptr() + o for o in offs],
                           SIZES, stream, wait=True)
        assert all(torch.equal(b, t) for b, t in zip(back, ts))
        assert _kernels(m) - k == 2


def test_the_copy_kernel_is_off_unless_asked_for(backend, managers):
    assert _core.copy_kernel() == (os.environ.get("AQUA_COPY_KERNEL") == "1"
                                   and _core.cuda_compiled())
    was = _core.copy_kernel()
    _core.copy_kernel(False)
    try:
        m = managers(peer=16 * MiB, host=16 * MiB)
        ts = _pieces(backend.device, 6)
        got = m.fetch_many(m.offload_many(ts, release=False))
        assert all(torch.equal(g, t) for g, t in zip(got, ts))
        s = m.stats()
        assert s["batch_kernels"] == 0 and s["batched_submissions"] >= 2
    finally:
        _core.copy_kernel(was)


def test_emulation_never_takes_the_copy_kernel(kernel_on):
    with aq.OffloadManager("cpu", peers=[1], peer_bytes="16MiB", host_bytes="16MiB") as m:
        ts = _pieces(torch.device("cpu"), 7)
        got = m.fetch_many(m.offload_many(ts, release=False))
        assert all(torch.equal(g, t) for g, t in zip(got, ts))
        assert m.stats()["batch_kernels"] == 0
