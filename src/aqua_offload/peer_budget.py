"""How much memory ``OffloadManager(peers="auto")`` asks of each peer.

Next to a serving engine that holds 90% of a GPU, a fixed 8 GiB request fails, and with it the
whole manager. So with ``peers="auto"`` each peer gives what it can spare: at most
:data:`AUTO_FRACTION` of its free memory *now*, capped by ``peer_bytes``; a peer that can spare
less than :data:`MIN_PEER_BYTES` is skipped with one warning. An explicit peer list asks for
exactly what it is given (a failure then names the device, the bytes and the runtime's error).
What each peer was asked, had free and gave is in ``stats()["peer_budgets"]``.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from . import _core
from .devices import parse_peer, resolve_peers
from .errors import InvalidArgumentError
from .sizes import parse_size

__all__ = ["AUTO_FRACTION", "MIN_PEER_BYTES", "PeerBudgetWarning", "auto_budgets", "peer_pools"]

#: Share of a peer's free memory ``peers="auto"`` takes at most: the rest stays for the work
#: running there (its activations, its allocator's growth).
AUTO_FRACTION = 0.5
#: A peer that can spare less than this is not worth a tier.
MIN_PEER_BYTES = {"cuda": 256 << 20, "emulation": 1 << 20}
_GRAIN = 2 << 20  # budgets are whole 2 MiB pages, what cudaMalloc hands out anyway


class PeerBudgetWarning(UserWarning):
    """``peers="auto"`` skipped a peer, or gave it less than ``peer_bytes``."""


def auto_budgets(backend: str, peers: list[int], cap: dict[int, int]) -> tuple[
        list[tuple[int, int]], list[dict[str, Any]]]:
    """Pool sizes for ``peers`` (device indices), each at most ``cap[device]``.

    Returns
    -------
    (specs, report)
        ``specs``: ``(device, bytes)`` of the peers kept; ``report``: one dict per peer with
        ``location``, ``asked``, ``free``, ``granted`` (0 when skipped) and ``skipped`` (a
        reason, or None).
    """
    specs, report, skipped = [], [], []
    labels = {d["index"]: d["label"] for d in _core.backend_info(backend)["devices"]}
    for dev in peers:
        free, _total = _core.memory_info(backend, dev)
        spare = int(free * AUTO_FRACTION) // _GRAIN * _GRAIN
        granted = min(cap[dev], spare)
        reason = None
        if granted < min(MIN_PEER_BYTES[backend], cap[dev]):
            reason = (f"only {_core.format_bytes(free)} free "
                      f"(needs {_core.format_bytes(MIN_PEER_BYTES[backend])} spare)")
            skipped.append(f"{labels[dev]}: {reason}")
            granted = 0
        else:
            specs.append((dev, granted))
        report.append({"location": labels[dev], "asked": cap[dev], "free": free,
                       "granted": granted, "skipped": reason})
    if skipped:
        warnings.warn("OffloadManager(peers='auto') skipped peer(s) with too little free memory: "
                      + "; ".join(skipped), PeerBudgetWarning, stacklevel=3)
    return specs, report


def peer_pools(backend: str, device: int, peers: Any, peer_bytes: Any,
               default: str) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
    """The ``(device, bytes)`` peer pools of an ``OffloadManager(peers=..., peer_bytes=...)``
    (not ``"lent"``), and with ``peers="auto"`` the report of :func:`auto_budgets`."""
    auto = isinstance(peers, str) and peers.strip().lower() == "auto"
    if isinstance(peer_bytes, Mapping):
        budgets = {}
        for k, v in peer_bytes.items():
            p = parse_peer(k, backend)
            if p in budgets:
                raise InvalidArgumentError(f"peer_bytes names peer {p} twice ({k!r})")
            budgets[p] = parse_size(v, name=f"peer_bytes[{k!r}]")
        peer_list = list(budgets) if auto else resolve_peers(peers, backend, device)
        missing = [p for p in peer_list if p not in budgets]
        if missing:
            raise InvalidArgumentError(f"peer_bytes has no budget for peer(s) {missing}")
    else:
        size = parse_size(default if peer_bytes is None else peer_bytes, name="peer_bytes")
        peer_list = resolve_peers(peers, backend, device)
        budgets = {p: size for p in peer_list}
    if auto:
        return auto_budgets(backend, peer_list, budgets)
    return [(p, budgets[p]) for p in peer_list], []
