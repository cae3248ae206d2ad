"""Cross-process lending of device memory: producers offer, consumers lease, producers reclaim.

>>> from aqua_offload import lending
>>> o = lending.offer("cuda:1", "20GiB")          # in the process of a small model on GPU 1
>>> m = aq.OffloadManager("cuda:0", peers="lent")  # in the LLM's process: leases it
>>> o.reclaim("8GiB")                              # GPU 1 needs memory: blocks until returned

The processes share a ledger file (``$AQUA_OFFLOAD_LEDGER``, else under the per-user runtime
directory) and wake each other with datagrams; no daemon runs. See docs/lending.md and the
notes in ``ledger.py``, ``state.py``, ``notify.py``, ``offer.py`` and ``consumer.py``.
"""

from __future__ import annotations

from ..errors import LedgerError, LedgerVersionError, ReclaimError, ReclaimTimeoutError
from .ledger import ENV_VAR, Ledger, default_path
from .offer import Offer, offer, stats

__all__ = [
    "offer",
    "Offer",
    "stats",
    "view",
    "Ledger",
    "default_path",
    "ENV_VAR",
    "LedgerError",
    "LedgerVersionError",
    "ReclaimError",
    "ReclaimTimeoutError",
]


def view(path: str | None = None) -> dict:
    """The ledger as a dict (what ``aqua-offload lending --json`` prints), after recovering
    the entries of dead processes; an empty view when there is no ledger yet."""
    from .__main__ import snapshot

    return snapshot(Ledger(path))
