"""The module-level helpers: one default manager per device, created on first use."""

from __future__ import annotations

import threading
from typing import Any

import torch

from .errors import InvalidArgumentError, InvalidHandleError
from .handle import Handle
from .manager import OffloadManager

__all__ = ["default_manager", "offload", "fetch"]

_defaults: dict[torch.device, OffloadManager] = {}
_lock = threading.Lock()


def default_manager(device: Any = None) -> OffloadManager:
    """The module's manager for ``device`` (default settings), created on first use."""
    from .devices import resolve_device

    tdevice = resolve_device(device)[2]
    with _lock:
        m = _defaults.get(tdevice)
        if m is None or m.closed:
            m = _defaults[tdevice] = OffloadManager(device=tdevice)
        return m


def offload(tensor: Any, release: bool = True) -> Handle:
    """Offload ``tensor`` with the default manager of its device (see
    :meth:`OffloadManager.offload`)."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"offload expects a torch.Tensor, got {type(tensor).__name__}")
    return default_manager(tensor.device).offload(tensor, release=release)


def fetch(handle: Handle | torch.Tensor, out: torch.Tensor | None = None) -> Any:
    """Fetch a handle (or a paged-out tensor) through the manager that offloaded it."""
    from .storage import owner

    if isinstance(handle, torch.Tensor):
        found = owner(handle)
        if found is None:
            raise InvalidHandleError("fetch: this tensor is not paged out")
        handle = found
    if not isinstance(handle, Handle):
        raise InvalidHandleError(f"fetch expects a Handle, got {type(handle).__name__}")
    return handle.manager.fetch(handle, out=out)
