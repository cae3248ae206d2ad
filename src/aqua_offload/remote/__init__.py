"""A remote memory tier over NVIDIA NIXL: a lender serves memory, borrowers page into it.

- :class:`Lender` (``aqua-offload lend``): an arena of host or GPU memory, registered with
  NIXL, served on one address to borrowers holding the shared token.
- :class:`ReserveWatcher`: elastic lending above a reserve of free memory.
- :class:`RemoteClient`: a borrower's connection; batched writes and reads under a deadline.

NIXL (the ``remote`` extra, ``nixl-cu13``) is imported on first use, so this package imports
without it; :func:`nixl_unavailable` says why it cannot be used. The manager's remote tier
(``OffloadManager(remote=...)``) is :class:`~aqua_offload.remote.tier.RemoteTier`; see
docs/remote.md.
"""

from __future__ import annotations

from .client import LocalRegion, RemoteBlock, RemoteClient, Transfer, parse_address
from .elastic import ReserveWatcher, cuda_free_memory, host_free_memory
from .lender import Lender, ReclaimTicket
from .protocol import TOKEN_ENV, VERSION, load_token
from .transport import nixl_unavailable

__all__ = [
    "Lender", "ReclaimTicket", "ReserveWatcher", "RemoteClient", "RemoteBlock", "LocalRegion",
    "Transfer", "parse_address", "host_free_memory", "cuda_free_memory", "load_token",
    "nixl_unavailable", "TOKEN_ENV", "VERSION",
]
