"""Shared fixtures. GPU tests are marked `cuda` and skip with a reason when no GPU is usable."""

from __future__ import annotations

import threading

import pytest
import torch

import aqua_offload as aq
from aqua_offload import _core


def _gpu_reason() -> str | None:
    if not _core.cuda_compiled():
        return "aqua_offload was built without the CUDA backend"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random bits of any dtype (never zeros): random bytes reinterpreted, with floats made
    finite so that equality checks by value also hold."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(1, 256, (n * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        t = (raw % 2).bool()
    else:
        t = raw.view(dtype)
    if t.is_floating_point() or t.is_complex():
        t = torch.nan_to_num(t) if dtype.itemsize > 1 else t
    return t.reshape(shape).to(device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of the same shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ua = a.detach().contiguous().reshape(-1).view(torch.uint8) if a.numel() else a.new_empty(0, dtype=torch.uint8)
    ub = b.detach().contiguous().reshape(-1).view(torch.uint8) if b.numel() else b.new_empty(0, dtype=torch.uint8)
    return torch.equal(ua.cpu(), ub.cpu())


@pytest.fixture
def manager():
    m = aq.OffloadManager("cpu", peers="auto", peer_bytes="1MiB", host_bytes="4MiB")
    yield m
    m.close()


def run_with_timeout(fn, timeout=120.0):
    """Run fn in a thread: a hang fails the test instead of blocking the suite."""
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]
