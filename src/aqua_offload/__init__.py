"""aqua_offload: asynchronous tensor offload for PyTorch to peer-GPU and pinned host memory.

>>> import aqua_offload as aq
>>> m = aq.OffloadManager(device="cuda:0", peers="auto", peer_bytes="8GiB", host_bytes="16GiB")
>>> h = m.offload(t)        # t's storage is paged out; returns at once
>>> t = m.fetch(h)          # restored in place, ordered on the current stream

``device="cpu"`` (or a machine without a GPU) runs the emulation backend: CPU tensors, with
emulated peer and host tiers, asynchronous like the real thing.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

__version__ = "0.1.0"

from .errors import (  # noqa: E402  (errors must register with _core before anything raises)
    BackendError,
    InvalidArgumentError,
    InvalidHandleError,
    OffloadError,
    OutOfMemoryError,
    PagedOutError,
)
from .sysinfo import info  # noqa: E402
from .guard import debug_guard  # noqa: E402
from .handle import Handle  # noqa: E402
from .manager import OffloadManager  # noqa: E402
from .sizes import format_size, parse_size  # noqa: E402
from .storage import is_offloaded  # noqa: E402
from .policies import FairPolicy, FCFSPolicy, RoundRobinPolicy, SchedulingPolicy  # noqa: E402
from .timeslice import Slice, SlicerClosedError, TimeSlicer  # noqa: E402

__all__ = [
    "OffloadManager",
    "Handle",
    "TimeSlicer",
    "Slice",
    "SchedulingPolicy",
    "FairPolicy",
    "RoundRobinPolicy",
    "FCFSPolicy",
    "SlicerClosedError",
    "offload",
    "fetch",
    "default_manager",
    "info",
    "is_offloaded",
    "debug_guard",
    "parse_size",
    "format_size",
    "OffloadError",
    "OutOfMemoryError",
    "InvalidHandleError",
    "InvalidArgumentError",
    "BackendError",
    "PagedOutError",
    "__version__",
]

_defaults: dict[torch.device, OffloadManager] = {}
_defaults_lock = threading.Lock()


def default_manager(device: Any = None) -> OffloadManager:
    """The module's manager for ``device`` (default settings), created on first use."""
    from .devices import resolve_device

    tdevice = resolve_device(device)[2]
    with _defaults_lock:
        m = _defaults.get(tdevice)
        if m is None or m.closed:
            m = _defaults[tdevice] = OffloadManager(device=tdevice)
        return m


def offload(tensor: torch.Tensor, release: bool = True) -> Handle:
    """Offload ``tensor`` with the default manager of its device (see
    :meth:`OffloadManager.offload`)."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"offload expects a torch.Tensor, got {type(tensor).__name__}")
    return default_manager(tensor.device).offload(tensor, release=release)


def fetch(handle: Handle | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
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
