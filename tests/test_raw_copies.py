"""The core's batched raw copies (``_core.memcpy_many`` for host memory, ``Store.raw_copy_many``
on a stream), which the remote tier's staging uses: every piece lands bitwise, nothing outside
the pieces is touched, and mismatched lists are a typed error that copies nothing."""

from __future__ import annotations

import pytest
import torch

import aqua_offload as aq
from aqua_offload import _core
from aqua_offload.errors import InvalidArgumentError
from conftest import random_tensor


def _pieces(seed: int):
    g = torch.Generator().manual_seed(seed)
    src = random_tensor((64 * 1024,), torch.uint8, generator=g)
    dst = torch.full_like(src, 7)
    sizes = [1, 333, 4096, 17, 8000]
    offs = [0, 100, 1000, 9000, 20000]
    dsts = [dst.data_ptr() + 40000 - o - n for o, n in zip(offs, sizes)]  # reversed layout
    srcs = [src.data_ptr() + o for o in offs]
    return src, dst, sizes, offs, dsts, srcs


def _check(src, dst, sizes, offs) -> None:
    mask = torch.zeros_like(dst, dtype=torch.bool)
    for o, n in zip(offs, sizes):
        d = 40000 - o - n
        assert torch.equal(dst[d:d + n], src[o:o + n])
        mask[d:d + n] = True
    assert bool((dst[~mask] == 7).all()), "nothing outside the pieces was written"


def test_memcpy_many_copies_every_piece() -> None:
    src, dst, sizes, offs, dsts, srcs = _pieces(1)
    _core.memcpy_many(dsts, srcs, sizes)
    _check(src, dst, sizes, offs)


def test_raw_copy_many_on_the_current_stream() -> None:
    with aq.OffloadManager("cpu", peers=None, host_bytes="1MiB") as m:
        src, dst, sizes, offs, dsts, srcs = _pieces(2)
        m._store.raw_copy_many(dsts, srcs, sizes, 0)
        _check(src, dst, sizes, offs)


@pytest.mark.parametrize("which", ["memcpy_many", "raw_copy_many"])
def test_mismatched_pieces_copy_nothing(which) -> None:
    src, dst, sizes, offs, dsts, srcs = _pieces(3)
    with aq.OffloadManager("cpu", peers=None, host_bytes="1MiB") as m:
        call = (_core.memcpy_many if which == "memcpy_many"
                else lambda d, s_, n: m._store.raw_copy_many(d, s_, n, 0))
        with pytest.raises(InvalidArgumentError, match="one destination, source and size"):
            call(dsts, srcs[:-1], sizes)
    assert bool((dst == 7).all())


def _busy_pair(backend, n: int):
    """A large source on the device and a host destination (pinned on CUDA): the copy between
    them keeps a stream busy for milliseconds, and the host reads the destination directly."""
    src = backend.tensor((n,), torch.uint8)
    dst = torch.full((n,), 7, dtype=torch.uint8, pin_memory=backend.cuda)
    return src, dst


@pytest.mark.parametrize("how", ["wait", "synchronize_stream"])
def test_copies_on_a_stream_have_run_once_waited_for(backend, how) -> None:
    """raw_copy_many(wait=True), or synchronize_stream after it, returns only once the copies
    enqueued on that stream ran: a large copy queued first, then small pieces, are all there
    when the host reads them (no other synchronisation)."""
    m = backend.manager(peers=None, host_bytes="1MiB")
    stream = m._store.copy_stream(0, "to_tier")  # a stream of the core (a worker on emulation)
    big, big_dst = _busy_pair(backend, 256 << 20 if backend.cuda else 64 << 20)
    src, dst, sizes, offs, dsts, srcs = _pieces(4)
    if backend.cuda:
        src_dev = src.to(backend.device)
        srcs = [src_dev.data_ptr() + o for o in offs]
        dst = dst.pin_memory()
        dsts = [dst.data_ptr() + 40000 - o - n for o, n in zip(offs, sizes)]
        backend.synchronize()
    core = m._store
    core.raw_copy_many([big_dst.data_ptr()], [big.data_ptr()], [big.nbytes], stream)
    core.raw_copy_many(dsts, srcs, sizes, stream, wait=how == "wait")
    if how == "synchronize_stream":
        core.synchronize_stream(stream)
    assert torch.equal(big_dst, big.cpu())
    _check(src, dst, sizes, offs)


@pytest.mark.cuda
def test_waiting_for_a_stream_does_not_wait_for_the_device() -> None:
    """The remote tier's staging waits for its own copies before NIXL touches the buffer: only
    that stream, never the whole device, whose other streams may run unrelated work for long
    (another workload's kernels). A kernel sleeping ~2 s on another stream is still running
    when the waited-for copy returns."""
    dev = torch.device("cuda", 0)
    with aq.OffloadManager(dev, peers=None, host_bytes="1MiB") as m:
        src = torch.arange(4096, device=dev, dtype=torch.int32).view(torch.uint8)
        torch.cuda.current_stream(dev).synchronize()  # (made on torch's stream, copied on ours)
        dst = torch.zeros(src.nbytes, dtype=torch.uint8, pin_memory=True)
        other = torch.cuda.Stream(dev)
        with torch.cuda.stream(other):
            torch.cuda._sleep(4_000_000_000)  # cycles: ~2 s at an H100/H200's ~2 GHz
            asleep = torch.cuda.Event()
            asleep.record(other)
        core = m._store
        core.raw_copy_many([dst.data_ptr()], [src.data_ptr()], [src.nbytes],
                           core.copy_stream(0, "to_tier"), wait=True)
        assert not asleep.query(), "the wait waited for another stream's kernel"
        assert torch.equal(dst, src.cpu())
        core.synchronize_stream(core.copy_stream(0, "to_tier"))
        assert not asleep.query(), "synchronize_stream waited for another stream's kernel"
        other.synchronize()


@pytest.fixture
def batchless_stream(backend):
    """A caller's stream the backend cannot batch on (Note [Relay] in copy_engine.hpp): torch's
    default stream on CUDA (the legacy default stream, which cudaMemcpyBatchAsync refuses); on
    emulation its host stream 0, made to refuse batches the same way."""
    from aqua_offload.devices import current_stream

    if backend.cuda:
        stream = current_stream(backend.device)
        assert stream == 0, "torch's current stream here is its default (legacy) stream"
        yield stream
        return
    _core.refuse_host_stream_batches(True)
    try:
        yield 0
    finally:
        _core.refuse_host_stream_batches(False)


@pytest.mark.parametrize("wait", [True, False])
def test_a_batch_on_a_stream_that_refuses_batches_is_relayed_in_its_order(
        backend, batchless_stream, wait) -> None:
    """raw_copy_many on a stream the batch API refuses goes as one batch on the engine's relay
    stream, not one copy per piece: counted as a batched submission, never a fallback. It
    follows the caller's earlier work on that stream (a write of the source queued behind a
    long kernel there) and precedes its later work (a read of the destination), as on the
    caller's stream itself; with ``wait`` the bytes are there when it returns."""
    m = backend.manager(peers=None, host_bytes="1MiB")
    src, dst, sizes, offs, dsts, srcs = _pieces(5)
    fresh = random_tensor(tuple(src.shape), torch.uint8,
                          generator=torch.Generator().manual_seed(6))
    if backend.cuda:
        src_dev = torch.full_like(src, 9, device=backend.device)
        dst = dst.to(backend.device)
        srcs = [src_dev.data_ptr() + o for o in offs]
        dsts = [dst.data_ptr() + 40000 - o - n for o, n in zip(offs, sizes)]
        fresh_dev = fresh.to(backend.device)
        torch.cuda.synchronize(backend.device)
        torch.cuda._sleep(200_000_000)  # ~0.1 s on the default stream, then the source's bytes
        src_dev.copy_(fresh_dev)
    else:
        src.copy_(fresh)
    # Whether the runtime takes a batch on a stream of its own at all (a driver may refuse the
    # batch API everywhere: then the relayed batch is a fallback too, one copy each there).
    probe = torch.full((512,), 3, dtype=torch.uint8, device=backend.device)
    before = m.stats()
    m._store.raw_copy_many([probe.data_ptr(), probe.data_ptr() + 256], [probe.data_ptr() + 128,
                           probe.data_ptr() + 384], [128, 128], m._store.copy_stream(0, "to_tier"),
                           wait=True)
    refused_everywhere = m.stats()["batch_fallbacks"] - before["batch_fallbacks"]
    before = m.stats()
    m._store.raw_copy_many(dsts, srcs, sizes, batchless_stream, wait=wait)
    landed = dst.clone()  # the caller's later work on that stream (a device kernel on CUDA)
    after = m.stats()
    batches = (after["batched_submissions"] - before["batched_submissions"],
               after["batch_fallbacks"] - before["batch_fallbacks"])
    assert batches == ((0, 1) if refused_everywhere else (1, 0))
    _check(fresh, landed.cpu(), sizes, offs)
