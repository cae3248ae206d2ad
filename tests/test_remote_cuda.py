"""A lender registering GPU memory (``device="cuda:N"``), borrowed into host and GPU memory.
Marked ``cuda``: skipped with a reason where no GPU is usable (as on the 2-core CI machine)."""

from __future__ import annotations

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

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
