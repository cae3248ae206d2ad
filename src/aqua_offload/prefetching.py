"""The manager's side of a prefetch: a buffer per handle that the core copies into ahead of the
fetch, and how it survives an interrupt.

Note [Pending prefetches]
A fetch or an offload can be finished from its exception handler (Note [Interrupted batches] in
manager.py); a prefetch cannot. Its buffers are torch memory the core copies into
asynchronously, and an interrupt landing after the core call but before the buffers are
recorded (even inside a ``finally``) would free them under the copy. So each buffer is attached
to its handle *before* the core call, as ``_pending``, and the core's own record decides what it
is: ``adopt`` after the core returned, or ``settle`` by the next call that claims the handle
(under its lock, so no prefetch of it is in progress), which asks the core (``info()``) whether
it copied into the buffer: adopted if so, dropped otherwise. ``stats()["prefetched_bytes"]``
moves with the buffer, in the same statement; no lock guards it, because an interrupt landing
inside ``with lock:`` can leave the lock held and the next caller blocked forever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .devices import current_stream
from .errors import InvalidHandleError
from .handle import Handle

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["start", "adopt", "settle", "drop"]


def start(m: "OffloadManager", handles: list[Handle]) -> None:
    """Prefetch the claimed ``handles`` that have no prefetch yet, in one call into the core."""
    if any(h._kept for h in handles):
        raise InvalidHandleError("prefetch: a kept copy of a restored tensor")
    todo = list({id(h): h for h in handles if h._prefetch is None}.values())
    bufs = [torch.empty(h.nbytes, dtype=torch.uint8, device=m.device)
            if h.release or h._array is not None
            else torch.empty(h.shape, dtype=h.dtype, device=m.device) for h in todo]
    stream = torch.cuda.current_stream(m.device) if m._cuda else None
    for h, buf in zip(todo, bufs):  # alive before the core may copy into them
        h._pending = (buf, stream)
    tiers = m._store.prefetch_many(
        [h._id for h in todo], [b.data_ptr() if h.nbytes else 0 for h, b in zip(todo, bufs)],
        current_stream(m.device))
    for h, tier in zip(todo, tiers):
        adopt(m, h, tier)


def adopt(m: "OffloadManager", h: Handle, tier: int) -> None:
    """The core copies into ``h``'s pending buffer: it is the handle's prefetch now."""
    # One statement (no lock: an interrupt in `with lock:` can leave it held): the stats entry
    # moves with the buffer.
    (h._prefetch, h._prefetch_stream), h._prefetch_tier, h._pending, m._prefetched[h._id] \
        = h._pending, tier, None, h.nbytes


def settle(m: "OffloadManager", h: Handle) -> None:
    """A prefetch interrupted between its core call and ``adopt``: ask the core. Called with
    ``h``'s lock held."""
    if h._pending is not None:
        if h._prefetch is None and h._live() and m._store.contains(h._id):
            _, tier, _, prefetched = m._store.info(h._id)
            if prefetched:
                adopt(m, h, tier)
                return
        h._pending = None


def drop(m: "OffloadManager", h: Handle) -> None:
    """The prefetch buffer was consumed by a fetch or given back by a free."""
    if h._prefetch is not None:
        h._prefetch, _ = None, m._prefetched.pop(h._id, None)  # one statement, as in adopt
