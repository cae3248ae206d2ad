"""Hostile cases of the remote tier's placement machinery (slabs, block cache, replicas,
posted frees, tier order): each pins down a guarantee a careless change would break, most
of them found broken once. Every round trip is compared bitwise; waits have hard deadlines."""

from __future__ import annotations

import functools

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

from aqua_offload.errors import InvalidArgumentError, RemoteLostError
from aqua_offload.remote import Lender
from conftest import random_tensor, run_with_timeout, wait_until

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


def _tensors(n: int, seed: int, size: int = 96 * KiB) -> tuple[list[torch.Tensor],
                                                               list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ts = [random_tensor((size + 13 * i,), torch.uint8, generator=g) for i in range(n)]
    return ts, [t.clone() for t in ts]


@pytest.fixture
def lenders():
    """Factory of in-process lenders (8 MiB in 4 MiB segments unless given), closed at
    teardown."""
    made: list[Lender] = []

    def make(k: int, size: str = "8MiB", segment: str = "4MiB") -> list[Lender]:
        out = [Lender(TOKEN, host_bytes=size, segment_bytes=segment).start() for _ in range(k)]
        made.extend(out)
        return out

    yield make
    for x in made:
        x.close()


def test_a_reclaimed_mirror_is_not_dropped_when_only_a_prefetch_holds_the_rest(
        lenders, lender_managers) -> None:
    """Primary lender lost, the handle prefetched, then the mirror's lender reclaims it: the
    mirror was the last copy a lender held. Dropping it (as if the prefetch buffer were a
    second copy) left the entry naming the dead primary, so ``fetch(keep=True)`` handed the
    prefetch out and the next fetch raised ``RemoteLostError``: the bytes were gone while the
    handle lived. Now the prefetch gives the block up as in any reclaim: ``keep=True`` is
    refused with a typed error, and a plain fetch returns the bytes."""
    a, b = lenders(2)
    m = lender_managers(a, b, remote_copies=2, remote_deadline_s=2.0)
    (t,), (ref,) = _tensors(1, 1)
    h = m.offload(t, release=False)
    assert h.tier == "remote" and h.location == a.address
    m.prefetch(h)
    a.close()  # the primary's lender goes away
    wait_until(lambda: m._remote.clients[0].lost is not None, 30, "lender a lost")
    assert b.reclaim(8 * MiB).wait(30)  # the mirror's lender wants everything back
    assert b.stats()["blocks"] == 0
    with pytest.raises(InvalidArgumentError, match="prefetch"):
        run_with_timeout(lambda: m.fetch(h, keep=True), 60)
    out = run_with_timeout(lambda: m.fetch(h), 60)
    assert torch.equal(out, ref)
