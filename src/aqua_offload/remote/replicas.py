"""``remote_copies=2``: every handle the lenders hold has a copy on two of them.

Note [Replicas]
    With ``copies=2`` a batch that goes to the lenders (a direct offload, a spill, a reclaim's
    move to other lenders) is placed twice, on two different lenders, and written to both
    before any of its handles exists; a batch that finds no second lender with room is not
    placed at all (``OutOfMemoryError``: it stays in or goes to the core, or the caller sees
    the error). A handle's entry names its *primary* copy (client, block, offset) and its
    ``mirror``. Reads take the primary, or the mirror when the primary's lender is lost, so a
    handle is lost only when both lenders are. Both copies let go of their blocks together.

    A reclaim that names one copy of a handle whose other copy lives drops the named copy
    (the mirror becomes the primary when the primary was named): nothing needs to move, the
    lender gets its block at once. The tier then writes a new mirror to a third lender when
    one has room (read from the surviving copy); when none has, the handle runs on one copy.
    A lender's loss likewise leaves its handles' other copies running alone. Handles with one
    live copy count in ``stats()["remote"]["degraded_handles"]``; they are lost if that
    lender dies too.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable

import torch

from ..devices import current_stream
from ..errors import OffloadError, OutOfMemoryError
from . import placement
from .items import RemoteBlock

if TYPE_CHECKING:
    from .tier import RemoteTier, _Remote

__all__ = ["place_and_write", "source", "alive", "drop_reclaimed", "remirror"]

Where = list[tuple[RemoteBlock, int]]


def place_and_write(t: "RemoteTier", sizes: list[int], write: Callable[[int, Where], None],
                    avoid: tuple[int, ...] = (), copies: int | None = None
                    ) -> list[placement.Placement]:
    """``copies`` (default ``t.copies``) placements of ``sizes`` on different lenders (none
    of ``avoid``), each written by ``write(client, where)``; all given up if any placement or
    write fails. The caller settles them once the entries exist."""
    copies = t.copies if copies is None else copies
    got: list[placement.Placement] = []
    try:
        while len(got) < copies:
            try:
                got.append(placement.place(t, sizes, avoid=avoid + tuple(p[0] for p in got)))
            except OutOfMemoryError as exc:
                if not got:
                    raise
                raise OutOfMemoryError(f"remote_copies={copies}: no second lender can hold "
                                       f"{sum(sizes)} bytes ({exc})",
                                       requested=sum(sizes)) from None
        for client, _, where in got:
            write(client, where)
    except BaseException:
        for p in got:
            placement.discard(t, p, sizes)
        raise
    return got


def alive(t: "RemoteTier", client: int) -> bool:
    return t.clients[client].lost is None


def source(t: "RemoteTier", r: "_Remote") -> tuple[int, RemoteBlock | None, int]:
    """The copy a read uses: the primary, or the mirror when the primary's lender is lost."""
    if r.mirror is not None and t.clients[r.client].lost is not None and alive(t, r.mirror[0]):
        return r.mirror
    return r.client, r.block, r.offset


def drop_reclaimed(t: "RemoteTier", client: int, ids: list[int], wanted: set[int]
                   ) -> tuple[list[tuple[int, RemoteBlock]], list[int]]:
    """Before a reclaim of blocks ``wanted`` of lender ``client`` moves anything, each of the
    handles ``ids`` with two copies keeps one (Note [Replicas]): the copy outside the blocks
    if it lives (the named copy is dropped: nothing moves), else the named one, as its
    primary, for the migration to move. Returns the (lender, block)s no handle uses any more
    (the caller gives them back) and the handles left on one copy outside the blocks."""
    empty: list[tuple[int, RemoteBlock]] = []
    single: list[int] = []
    with t._lock:
        for h in ids:
            r = t._remote.get(h)
            if r is None or r.mirror is None:
                continue
            mc, mb, mo = r.mirror
            named = (r.client == client and r.block is not None and r.block.id in wanted)
            other = (mc, mb, mo) if named else (r.client, r.block, r.offset)
            # only a lender's copy counts: a prefetch buffer is handed out by the next fetch
            # (keep=True too), so the named copy must stay for the migration, which gives a
            # prefetched handle's block up and then refuses keep=True
            stays = other[1] is not None and alive(t, other[0])
            drop = (r.client, r.block) if (named == stays) else (mc, mb)
            if drop[1] is not None:
                empty += [(drop[0], b) for b in t._packs.drop(drop[0], [drop[1]])]
            if drop[0] == r.client and drop[1] is r.block:
                r.client, r.block, r.offset = mc, mb, mo
            r.mirror = None
            if stays:
                t._stats["reclaimed_handles"] += 1
                single.append(h)
    return empty, single


def remirror(t: "RemoteTier", ids: list[int], avoid: tuple[int, ...] = ()) -> None:
    """Best effort: a new mirror for each of ``ids`` that has one copy, on a lender other
    than its primary's and those in ``avoid`` (the one reclaiming), read from the primary.
    Handles that find no room stay on one copy."""
    with t._lock:
        group = [(h, t._remote[h]) for h in ids if h in t._remote and t._remote[h].mirror is None
                 and t._remote[h].block is not None and alive(t, t._remote[h].client)]
    by_client: dict[int, list[tuple[int, "_Remote"]]] = {}
    for h, r in group:
        by_client.setdefault(r.client, []).append((h, r))
    stream = current_stream(t.device)
    for client, hs in by_client.items():
        sizes = [r.nbytes for _, r in hs]
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=t.device)
        ptrs = list(itertools.accumulate(sizes, initial=buf.data_ptr()))[:-1]
        try:
            t._stage.read_into([(r.client, r.block, r.offset, r.nbytes, p)  # type: ignore[misc]
                                for (_, r), p in zip(hs, ptrs)], stream)
            (got,) = place_and_write(t, sizes, lambda c, where: t._stage.write_from(
                c, [(b, off, p, n) for (b, off), p, n in zip(where, ptrs, sizes)], stream),
                avoid=(client, *avoid), copies=1)  # one more copy, away from the primary
        except (OffloadError, TimeoutError):
            continue  # no room or a failing lender: they run on one copy
        other, blocks, where = got
        unused: list[RemoteBlock] = []
        with t._lock:
            for (h, r), (b, off) in zip(hs, where):
                if t._remote.get(h) is r and r.mirror is None and r.block is not None:
                    r.mirror = (other, b, off)
                else:  # fetched or freed meanwhile: its new copy goes too
                    unused += placement.let_go(t, other, b, off, r.nbytes)
        placement.settled(t, other, blocks)
        placement.free_blocks(t, other, unused)
