"""What a borrower's batch is made of: remote blocks, registered local regions, transfer items,
and the checks every item passes before anything moves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

from ..errors import InvalidArgumentError

__all__ = ["RemoteBlock", "LocalRegion", "Transfer", "Item", "check_items", "check_memory"]


@dataclass(frozen=True)
class RemoteBlock:
    """A block of the lender's arena held by this client."""

    id: int
    nbytes: int
    addr: int
    segment: int


@dataclass(frozen=True, eq=False)
class LocalRegion:
    """Local memory registered with the client's NIXL agent (see :meth:`RemoteClient.register`).
    ``tensor`` keeps the memory alive."""

    addr: int
    nbytes: int
    kind: str
    device: int
    tensor: Any


@dataclass(frozen=True)
class Transfer:
    """One item of a batch: ``nbytes`` between ``local`` at ``local_offset`` and ``block`` at
    ``block_offset``."""

    local: LocalRegion
    block: RemoteBlock
    nbytes: int
    local_offset: int = 0
    block_offset: int = 0


Item = Union[Transfer, tuple]



def check_items(items: Sequence[Item], regions: set[int], blocks: dict[int, RemoteBlock]
                ) -> list[tuple]:
    """Every item as (region, local offset, block, block offset, bytes), checked against the
    registered ``regions`` (ids of LocalRegions) and held ``blocks``.

    Raises
    ------
    InvalidArgumentError
        For the first bad item, saying what is wrong with it.
    """
    out = []
    for i, item in enumerate(items):
        # the common case first, cheaply (a batch may hold thousands of items)
        if type(item) is tuple and len(item) == 4:
            local, block, boff, n = item
            loff = 0
            if type(local) is tuple and len(local) == 2:
                local, loff = local
        elif isinstance(item, Transfer):
            local, block, boff, n, loff = (item.local, item.block, item.block_offset,
                                           item.nbytes, item.local_offset)
        else:
            raise InvalidArgumentError(f"transfer item {i}: a Transfer or (local, block, "
                                       f"offset, nbytes), got {type(item).__name__}")
        if (type(local) is LocalRegion and id(local) in regions
                and type(block) is RemoteBlock and blocks.get(block.id) == block
                and type(n) is int and type(loff) is int and type(boff) is int
                and n > 0 and loff >= 0 and boff >= 0
                and loff + n <= local.nbytes and boff + n <= block.nbytes):
            out.append((local, loff, block, boff, n))
        else:
            _explain(i, local, block, n, loff, boff, regions, blocks)
    return out


def _explain(i: int, local: Any, block: Any, n: Any, loff: Any, boff: Any, regions: set[int],
             blocks: dict[int, RemoteBlock], local_ok: bool = False) -> None:
    """Raise the error that says what is wrong with item ``i`` (``local_ok``: a memory piece,
    whose local side was checked already)."""
    where = f"memory piece {i}" if local_ok else f"transfer item {i}"
    if not local_ok and not isinstance(local, LocalRegion):
        raise InvalidArgumentError(f"{where}: local must be a LocalRegion from register()")
    if not local_ok and id(local) not in regions:
        raise InvalidArgumentError(f"{where}: this region is not registered with this client")
    if not isinstance(block, RemoteBlock):
        raise InvalidArgumentError(f"{where}: expected a RemoteBlock, got "
                                   f"{type(block).__name__}")
    if blocks.get(block.id) != block:
        raise InvalidArgumentError(f"{where}: block {block.id} is not held by this client "
                                   f"(freed, reclaimed, or another client's)")
    for name, v in (("nbytes", n), ("local offset", loff), ("block offset", boff)):
        if type(v) is not int or v < 0:
            raise InvalidArgumentError(f"{where}: {name} must be a non-negative int, got {v!r}")
    if n == 0:
        raise InvalidArgumentError(f"{where}: nbytes must be positive")
    if not local_ok and loff + n > local.nbytes:
        raise InvalidArgumentError(f"{where}: {n} bytes at {loff} overrun the local region of "
                                   f"{local.nbytes} bytes")
    raise InvalidArgumentError(f"{where}: {n} bytes at {boff} overrun block {block.id} of "
                               f"{block.nbytes} bytes")


def check_memory(pieces: Sequence[tuple[int, int, RemoteBlock, int]],
                 blocks: dict[int, RemoteBlock]) -> list[tuple[int, int, RemoteBlock, int]]:
    """Pieces of host memory (address, bytes, block, block offset), checked against the held
    ``blocks``: positive address and size, an offset that keeps the piece inside its block.

    Raises
    ------
    InvalidArgumentError
        For the first bad piece, saying what is wrong with it.
    """
    out = []
    for i, piece in enumerate(pieces):
        if type(piece) is not tuple or len(piece) != 4:
            raise InvalidArgumentError(f"memory piece {i}: (address, nbytes, block, offset), "
                                       f"got {piece!r}")
        addr, n, block, boff = piece
        if not (type(addr) is int and type(n) is int and addr > 0 and n > 0):
            raise InvalidArgumentError(f"memory piece {i}: a positive address and size, got "
                                       f"{addr!r}, {n!r}")
        if not (type(block) is RemoteBlock and blocks.get(block.id) == block
                and type(boff) is int and boff >= 0 and boff + n <= block.nbytes):
            _explain(i, None, block, n, 0, boff, set(), blocks, local_ok=True)
        out.append(piece)
    return out
