"""Core handles that no Handle object stands for any more, and how they are given back.

Note [Orphans]
A Handle gives its block back when it dies (``Handle.__del__``), but only once its call adopted
it (``_adopted``, set by the batch's idempotent ``finish()``): a Handle that an interrupt
dropped before then must not free the block that the re-run ``finish()`` hands out under a new
Handle. What no Handle object stands for any more (an interrupt inside a finalizer, or inside a
handler) is found by comparing the core's live ids with the manager's ``_handles`` (a weak map
filled as handles are made) while no call is in progress (``CallGate.quiet``: every handle made
is then adopted, and no call can start meanwhile), on ``stats()`` and ``synchronize()``, and
freed.
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
                if cid not in m._handles:
                    m._store.wait(cid)  # a copy may still use its memory
                    m._store.free(cid)
                    m._holders.drop(cid)
