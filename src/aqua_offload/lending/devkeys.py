"""Naming a device so that every process of the machine means the same one.

``cuda:1`` in one process may be another GPU in the next (``CUDA_VISIBLE_DEVICES`` differs per
model server), so the ledger keys CUDA devices by their UUID and each process maps keys back to
its own indices. Emulated devices are per-process host arenas: ``emu:N`` names the same slot in
every process, which is all that accounting needs.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from ..devices import cuda_usable, parse_peer
from ..errors import InvalidArgumentError
from ..sizes import parse_size
from .. import _core

__all__ = ["resolve_offer_device", "device_key", "device_label", "reachable", "lease_caps"]


@functools.lru_cache(maxsize=None)
def device_key(backend: str, index: int) -> str:
    """The machine-wide key of a device of ``backend``."""
    if backend == "emulation":
        return f"emu:{index}"
    try:
        import torch

        return f"cuda:GPU-{torch.cuda.get_device_properties(index).uuid}"
    except Exception:  # noqa: BLE001 - an old torch without uuid: indices, as seen here
        return f"cuda:#{index}"


def device_label(backend: str, index: int) -> str:
    return f"emu:{index}" if backend == "emulation" else f"cuda:{index}"


def resolve_offer_device(device: Any) -> tuple[str, int]:
    """A producer's device -> ``(backend, index)``. ``"emu:N"`` is emulated; ``"cuda:N"``, an
    int or a torch device is a GPU when one is usable, else emulated device N (so GPU scripts
    run as is, as for peers elsewhere)."""
    if isinstance(device, str) and device.strip().lower() == "cpu":
        raise InvalidArgumentError("offer: 'cpu' is not a device that can lend memory "
                                   "(expected 'cuda:N', 'emu:N' or an index)")
    backend = "cuda" if cuda_usable() else "emulation"
    if isinstance(device, str) and device.strip().startswith("emu"):
        backend = "emulation"
    return backend, parse_peer(device, backend)


def reachable(backend: str, index: int) -> list[int]:
    """Devices a consumer on ``index`` can lease on, best first: its peers, then itself (a
    same-device "peer": two processes sharing one GPU)."""
    info = _core.backend_info(backend)
    peers = [j for j in range(info["device_count"]) if j != index and info["peer_access"][index][j]]
    return peers + [index]


def lease_caps(cap: Any, backend: str, local: dict[str, int]) -> dict[str, int | None]:
    """Most bytes a consumer leases per device key (``local``: key -> index): ``peer_bytes``
    as None (no limit), one size for every device, or a mapping per device."""
    if cap is None:
        return {k: None for k in local}
    if isinstance(cap, Mapping):
        per: dict[int, int] = {}
        for d, v in cap.items():
            j = parse_peer(d, backend)
            if j in per:  # {1: ..., "cuda:1": ...}: which one was meant?
                raise InvalidArgumentError(f"peer_bytes names device {j} twice ({d!r})")
            per[j] = parse_size(v, name=f"peer_bytes[{d!r}]")
        return {k: per.get(j, 0) for k, j in local.items()}
    size = parse_size(cap, name="peer_bytes")
    return {k: size for k in local}
