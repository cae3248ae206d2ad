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
def kernel_on(request):
    """The copy kernel switched on for the test, the previous setting restored after. A GPU
    test on a build without the kernel (AQUA_CUDA_KERNELS=OFF or no CUDA compiler, as in
    gpu_check.sh's fallback build) skips with that reason: it would only count no launches."""
    was = _core.copy_kernel()
    if not _core.copy_kernel(True) and request.node.get_closest_marker("cuda"):
        pytest.skip("this build has no copy kernel (AQUA_CUDA_KERNELS=OFF or no CUDA compiler)")
    yield
    _core.copy_kernel(was)


def _aligned(dev: torch.device, seed: int, sizes: list[int] = SIZES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [random_tensor((n,), torch.uint8, device=str(dev), generator=g) for n in sizes]


@pytest.mark.cuda
@pytest.mark.parametrize("tier", ["peer", "host"])
def test_snapshot_batches_through_the_copy_kernel(kernel_on, tier):
    """Tensors (allocations: 16-byte aligned, like the pools' blocks) go through the kernel
    both ways; views at odd byte offsets are not equally aligned with their blocks, so their
    offload goes to DMA, and so does a fetch into outs at odd offsets."""
    dev = torch.device("cuda", 0)
    peer = 1 if torch.cuda.device_count() > 1 else 0
    with aq.OffloadManager(dev, peers=[peer] if tier == "peer" else None, peer_bytes="16MiB",
                           host_bytes="16MiB") as m:
        ts = _aligned(dev, 1)
        k = _kernels(m)
        hs = m.offload_many(ts, release=False)
        assert {h.tier for h in hs} == {tier}
        got = m.fetch_many(hs)
        assert _kernels(m) - k == 2  # offload and fetch
        assert all(torch.equal(g, t) for g, t in zip(got, ts))
        views = _pieces(dev, 2)
        refs = [v.clone() for v in views]
        k = _kernels(m)
        got = m.fetch_many(m.offload_many(views, release=False))
        assert _kernels(m) - k == 1  # the fetch into new tensors only
        assert all(torch.equal(g, r) for g, r in zip(got, refs))
        base = torch.full((sum(SIZES) + 128 * len(SIZES),), 0xA5, dtype=torch.uint8,
                          device=dev)
        outs, covered, at = [], torch.zeros_like(base, dtype=torch.bool), 0
        for n in SIZES:  # outs at 16-byte aligned places, 64 bytes apart: the kernel's
            at = (at + 63) // 64 * 64
            outs.append(base[at:at + n])
            covered[at:at + n] = True
            at += n + 64
        k = _kernels(m)
        m.fetch_many(m.offload_many(ts, release=False), outs=outs)
        assert _kernels(m) - k == 2
        assert all(torch.equal(o, t) for o, t in zip(outs, ts))
        assert bool((base[~covered] == 0xA5).all()), "nothing is written between the outs"


@pytest.mark.cuda
def test_release_batches_through_the_copy_kernel(kernel_on):
    dev = torch.device("cuda", 0)
    with aq.OffloadManager(dev, peers=None, host_bytes="16MiB") as m:
        ts = _aligned(dev, 3)
        refs = [t.clone() for t in ts]
        k = _kernels(m)
        hs = m.offload_many(ts)
        assert all(aq.is_offloaded(t) for t in ts)
        assert m.fetch_many(hs) == ts and _kernels(m) - k == 2
        assert all(torch.equal(t, r) for t, r in zip(ts, refs))


@pytest.mark.cuda
def test_a_batch_of_300_pieces_through_the_copy_kernel(kernel_on):
    """More pieces than one launch takes (128): three launches, one submission."""
    dev = torch.device("cuda", 0)
    with aq.OffloadManager(dev, peers=None, host_bytes="16MiB") as m:
        ts = _aligned(dev, 8, [17 + 4096 * (i % 5) for i in range(300)])
        k = _kernels(m)
        got = m.fetch_many(m.offload_many(ts, release=False))
        assert _kernels(m) - k == 2
        assert all(torch.equal(g, t) for g, t in zip(got, ts))


@pytest.mark.cuda
def test_a_piece_above_the_kernels_limit_sends_the_batch_to_the_dma_engines(kernel_on):
    dev = torch.device("cuda", 0)
    with aq.OffloadManager(dev, peers=None, host_bytes="16MiB") as m:
        ts = _aligned(dev, 4, [4 * KiB, MiB + 256, 17])
        k = _kernels(m)
        got = m.fetch_many(m.offload_many(ts, release=False))
        assert _kernels(m) == k
        assert all(torch.equal(a, b) for a, b in zip(got, ts))


@pytest.mark.cuda
def test_raw_copies_never_take_the_copy_kernel(kernel_on):
    """raw_copy_many (the remote tier's staging) copies the caller's pointers: DMA only (a
    pointer the SMs cannot reach would end the CUDA context; Note [Copy kernel])."""
    dev = torch.device("cuda", 0)
    with aq.OffloadManager(dev, peers=None, host_bytes="1MiB") as m:
        ts = _aligned(dev, 5)
        host = torch.zeros(sum(SIZES) + 64 * len(SIZES), dtype=torch.uint8, pin_memory=True)
        offs, at = [], 0
        for n in SIZES:
            at = (at + 63) // 64 * 64
            offs.append(at)
            at += n
        core, stream = m._store, torch.cuda.current_stream(dev).cuda_stream
        k = _kernels(m)
        core.raw_copy_many([host.data_ptr() + o for o in offs], [t.data_ptr() for t in ts],
                           SIZES, stream, wait=True)
        assert all(torch.equal(host[o:o + n], t.cpu()) for o, n, t in zip(offs, SIZES, ts))
        assert _kernels(m) == k


def test_the_copy_kernel_is_off_unless_asked_for(backend, managers):
    if os.environ.get("AQUA_COPY_KERNEL") != "1":  # (set: on where the kernel was built)
        assert not _core.copy_kernel()
    was = _core.copy_kernel()
    _core.copy_kernel(False)
    try:
        m = managers(peer=16 * MiB, host=16 * MiB)
        ts = _pieces(backend.device, 6)
        got = m.fetch_many(m.offload_many(ts, release=False))
        assert all(torch.equal(g, t) for g, t in zip(got, ts))
        s = m.stats()
        # (on CUDA the runtime may refuse cudaMemcpyBatchAsync: a batch then counts as a
        # fallback, one copy each; either way it is a batch, and not the kernel's)
        batches = s["batched_submissions"] + (s["batch_fallbacks"] if backend.cuda else 0)
        assert s["batch_kernels"] == 0 and batches >= 2
    finally:
        _core.copy_kernel(was)


def test_emulation_never_takes_the_copy_kernel(kernel_on):
    with aq.OffloadManager("cpu", peers=[1], peer_bytes="16MiB", host_bytes="16MiB") as m:
        ts = _pieces(torch.device("cpu"), 7)
        got = m.fetch_many(m.offload_many(ts, release=False))
        assert all(torch.equal(g, t) for g, t in zip(got, ts))
        assert m.stats()["batch_kernels"] == 0


def _sentinel_layout(sizes: list[int], offsets: list[int], seed: int):
    """Source and destination buffers (destination full of a sentinel) and each piece's place
    in them: the piece starts at byte `offset` (mod 16) in both, 64 bytes apart."""
    g = torch.Generator().manual_seed(seed)
    starts, at = [], 0
    for n, off in zip(sizes, offsets):
        at = (at + 63) // 64 * 64 + 64 + off
        starts.append(at)
        at += n
    src = random_tensor((at + 64,), torch.uint8, generator=g)
    dst = torch.full_like(src, 0xA5)
    return src, dst, starts


@pytest.mark.parametrize("count", [1, 7, 128, 300])  # 300: three launches of at most 128
def test_the_kernels_threads_copy_every_piece_and_nothing_else(count):
    """The copy kernel's per-thread code (cpp/src/cuda/copy_kernel_body.hpp) run for every
    thread of its launches on the host: byte heads, the four-at-a-time body and its remainder,
    tails, pieces of one block and of sixteen, all equally aligned offsets modulo 16."""
    edges = [1, 15, 16, 17, 31, 4096, 16 * KiB - 16, 16 * KiB, 16 * KiB + 16, 64 * KiB + 1,
             300 * KiB + 7, MiB - 1, MiB]
    sizes = [edges[i % len(edges)] for i in range(count)]
    offsets = [i % 16 for i in range(count)]
    src, dst, starts = _sentinel_layout(sizes, offsets, count)
    base_s, base_d = src.data_ptr(), dst.data_ptr()
    assert _core._copy_kernel_on_host([base_d + a for a in starts], [base_s + a for a in starts],
                                      sizes)
    covered = torch.zeros_like(dst, dtype=torch.bool)
    for a, n in zip(starts, sizes):
        assert torch.equal(dst[a:a + n], src[a:a + n]), (a, n)
        covered[a:a + n] = True
    assert bool((dst[~covered] == 0xA5).all()), "a thread wrote outside its piece"


@pytest.mark.parametrize("what", ["unequal alignment", "too large"])
def test_pieces_the_kernel_does_not_take_are_left_to_dma(what):
    sizes = [4096, MiB + 16 if what == "too large" else 4096]
    src, dst, starts = _sentinel_layout(sizes, [0, 0], 9)
    dsts = [dst.data_ptr() + a for a in starts]
    srcs = [src.data_ptr() + a for a in starts]
    if what == "unequal alignment":
        srcs[1] += 1  # dst 16-byte aligned, src not: its bytes would go one at a time
    assert not _core._copy_kernel_on_host(dsts, srcs, sizes)
    assert bool((dst == 0xA5).all()), "nothing is copied when a piece does not fit"
