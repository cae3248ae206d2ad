"""Core handles that no Handle object stands for any more, and how they are given back.

Note [Orphans]
A Handle gives its block back when it dies (``Handle.__del__``), but only once its call adopted
it (``_adopted``, set by the batch's idempotent ``finish()``): a Handle that an interrupt
dropped before then must not free the block that the re-run ``finish()`` hands out under a new
Handle. What no Handle object stands for any more (an interrupt inside a finalizer, or inside a
handler) is found by comparing the core's live ids with the manager's ``_handles`` (weak
references filled as handles are made, each dropped as its Handle ends, or dies live; a dead
one counts as none) while no call is in progress (``CallGate.quiet``: every handle made is then
adopted, and no call can start meanwhile), on ``stats()`` and ``synchronize()``, and freed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["free"]


def free(m: "OffloadManager") -> None:
    """Give back the blocks of ``m``'s core handles whose Handle died unheard."""
    with m._gate.quiet() as quiet:
        if quiet:
            for cid in m._store.live_ids():
                ref = m._handles.get(cid)
                if ref is None or ref() is None:
                    m._store.wait(cid)  # a copy may still use its memory
                    m._store.free(cid)
                    m._holders.drop(cid)
                    m._handles.pop(cid, None)
