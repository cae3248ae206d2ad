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
