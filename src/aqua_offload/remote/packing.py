"""Packed batches: the handles of one batch share one lender block.

Note [Packed blocks]
    Every batch the remote tier sends to a lender (a direct offload, a spill, a reclaim's
    move to another lender) is *packed*: :func:`layout` puts its handles one after another
    at offsets inside as few blocks as the lender allows, one block per ``segment_bytes``
    of the batch (so one block for any batch up to a segment), and one ``ALLOC`` asks for
    them; only when the lender's free space is too fragmented for that does each handle get
    a block of its own (the degenerate pack of one). A handle's entry names its block and
    its offset in it. So a batch of 1000 small tensors costs one allocation, one free, and
    (staging lays the pieces out in the same order, Note [Staging]) one NIXL descriptor per
    round instead of 1000.

    Invariant: for every block in :class:`Packs`, its count is the number of handles placed
    in it that have not let go of it yet (placed but not yet entered, while the block is in
    transit, or in ``_remote``), plus one while it is a lender's open slab (Note [Slabs] in
    placement.py: small batches share a slab instead of a block of their own). A handle lets
    go exactly once: when it is fetched, freed, consumed as an incremental base, given up by
    a prefetched handle under reclaim, or moved elsewhere by a reclaim. The block goes back
    to its lender (or to the block cache) when its count reaches 0, never earlier (other
    handles' bytes live in it) and never twice. Consequences: a reclaim names blocks, so it
    moves every live handle of a packed block; a refused reclaim gives back only the blocks
    all of whose handles moved; a lost lender loses every handle of every block it held
    (loss is per lender, not per block).
"""

from __future__ import annotations

from .items import RemoteBlock

__all__ = ["layout", "Packs"]


def layout(sizes: list[int], limit: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Pack ``sizes`` (all > 0) in order into blocks of at most ``limit`` bytes (0: no limit;
    a size above the limit gets a block of its own).

    Returns
    -------
    (block sizes, [(block index, offset)] per size)
    """
    blocks: list[int] = []
    where: list[tuple[int, int]] = []
    for n in sizes:
        if not blocks or (limit and blocks[-1] + n > limit):
            blocks.append(0)
        where.append((len(blocks) - 1, blocks[-1]))
        blocks[-1] += n
    return blocks, where


class Packs:
    """How many handles use each held block (Note [Packed blocks]). Not thread-safe: the
    remote tier calls it under its ``_lock``."""

    def __init__(self) -> None:
        self._refs: dict[tuple[int, int], int] = {}

    def add(self, client: int, blocks: list[RemoteBlock]) -> None:
        """One handle placed in each of ``blocks`` (a block may repeat)."""
        for b in blocks:
            self._refs[client, b.id] = self._refs.get((client, b.id), 0) + 1

    def drop(self, client: int, blocks: list[RemoteBlock]) -> list[RemoteBlock]:
        """One handle let go of each of ``blocks`` (a block may repeat); returns the blocks no
        handle uses any more, each once: the caller gives them back."""
        empty = []
        for b in blocks:
            key = (client, b.id)
            left = self._refs.get(key, 0) - 1
            if left > 0:
                self._refs[key] = left
            elif key in self._refs:
                del self._refs[key]
                empty.append(b)
        return empty

    def add_n(self, client: int, block: RemoteBlock, k: int) -> None:
        """``k`` handles placed in ``block``."""
        self._refs[client, block.id] = self._refs.get((client, block.id), 0) + k

    def drop_n(self, client: int, block: RemoteBlock, k: int) -> bool:
        """``k`` handles let go of ``block``; True if none uses it any more (the caller gives
        it back; never twice)."""
        key = (client, block.id)
        left = self._refs.get(key)
        if left is None:
            return False
        if left > k:
            self._refs[key] = left - k
            return False
        del self._refs[key]
        return True

    def count(self, client: int, block: RemoteBlock) -> int:
        return self._refs.get((client, block.id), 0)

    def clear(self) -> None:
        self._refs.clear()
