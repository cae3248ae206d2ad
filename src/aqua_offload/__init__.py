"""aqua_offload: asynchronous tensor offload for PyTorch to peer-GPU and pinned host memory.

>>> import aqua_offload as aq
>>> m = aq.OffloadManager(device="cuda:0", peers="auto", peer_bytes="8GiB", host_bytes="16GiB")
>>> h = m.offload(t)        # t's storage is paged out; returns at once
>>> t = m.fetch(h)          # restored in place, ordered on the current stream

``device="cpu"`` (or a machine without a GPU) runs the emulation backend: CPU tensors, with
emulated peer and host tiers, asynchronous like the real thing.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402  (errors must register with _core before anything raises)
    BackendError,
    ClosedError,
    InvalidArgumentError,
    InvalidHandleError,
    OffloadError,
    OutOfMemoryError,
    PagedOutError,
)
from .sysinfo import info  # noqa: E402
from .guard import _from_environment, debug_guard  # noqa: E402
from .handle import Handle  # noqa: E402
from .manager import OffloadManager  # noqa: E402
from .sizes import format_size, parse_size  # noqa: E402
from .storage import is_discarded, is_offloaded  # noqa: E402
from .defaults import default_manager, fetch, offload  # noqa: E402
from .policies import FairPolicy, FCFSPolicy, RoundRobinPolicy, SchedulingPolicy  # noqa: E402
from .timeslice import (  # noqa: E402
    SharedStateError, Slice, SlicerClosedError, TimeSlicer, UnpageableStateError)

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
    "SharedStateError",
    "UnpageableStateError",
    "offload",
    "fetch",
    "default_manager",
    "info",
    "is_offloaded",
    "is_discarded",
    "debug_guard",
    "parse_size",
    "format_size",
    "OffloadError",
    "OutOfMemoryError",
    "InvalidHandleError",
    "InvalidArgumentError",
    "BackendError",
    "ClosedError",
    "PagedOutError",
    "__version__",
]

_from_environment()  # AQUA_OFFLOAD_DEBUG_GUARD=1: guard every thread (guard.py)
