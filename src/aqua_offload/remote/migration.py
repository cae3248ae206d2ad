"""Reclaim on the borrower's side of the remote tier: the handles in blocks a lender takes
back move into the core's tiers or to another lender before the client answers.

Note [Remote reclaim]
    ``on_reclaim`` runs in the client's reclaim thread (Note [Reclaim callback] in client.py).
    It waits (up to the deadline) for blocks still being filled or placed to become handles'
    blocks, and for handles another call is using (Note [Remote locks] in tier.py), then reads
    the handles' bytes once into a local buffer and moves them: into the core as one batch,
    else each that fits; the rest to other lenders, together, else one by one. A prefetched
    handle just gives its block up (its prefetch buffer holds the bytes). A packed block
    (Note [Packed blocks] in packing.py) holds several handles: all of them move. If some
    find no room anywhere, the blocks all of whose handles moved are given back here and the
    rest refused: the lender waits until they are fetched or freed. Nothing is lost either
    way.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING

import torch

from ..devices import current_stream
from ..errors import OutOfMemoryError, RemoteLostError
from . import placement, replicas
from .items import RemoteBlock

if TYPE_CHECKING:
    from .tier import RemoteTier, _Remote

__all__ = ["on_reclaim"]


def on_reclaim(t: "RemoteTier", client: int, blocks: list[RemoteBlock]) -> None:
    """Move the handles in ``blocks`` into the core's tiers if they have room, else to
    another lender; raise (a refusal: the lender waits) if neither can take them."""
    t0 = time.monotonic()
    wanted = {b.id for b in blocks}
    limit = t.clients[client].deadline_s
    # the named blocks are never cached from now on: one a refused reclaim leaves behind
    # goes back with its last handle (Note [Block cache] in placement.py)
    with t._lock:
        t._asked.setdefault(client, set()).update(wanted)
    # no batch goes to a named open slab any more (Note [Slabs]); if no handle uses it, it
    # goes back now, as do named cached blocks; the client answers for the other blocks
    placement.free_blocks(t, client, placement.retire_slab(t, client, wanted)
                          + placement.uncache(t, client, wanted))
    try:
        with t._cv:  # blocks being filled or placed: wait until they are entries
            if not t._cv.wait_for(lambda: not any((client, b) in t._in_transit
                                                  for b in wanted), limit):
                raise TimeoutError("blocks still in transit")
            ids = [h for h, r in t._remote.items()
                   if (r.client == client and r.block is not None and r.block.id in wanted)
                   or (r.mirror is not None and r.mirror[0] == client
                       and r.mirror[1].id in wanted)]
        with t._using(ids, timeout=limit):
            # handles with another live copy just drop the named one (Note [Replicas])
            empty, single = replicas.drop_reclaimed(t, client, ids, wanted)
            for i in {c for c, _ in empty}:
                placement.free_blocks(t, i, [b for c, b in empty if c == i])
            _migrate(t, client, ids, wanted)
            replicas.remirror(t, single, avoid=(client,))  # never onto the reclaiming lender
    except BaseException:
        with t._lock:
            t._stats["reclaim_refusals"] += 1
        raise
    seconds = time.monotonic() - t0
    with t._lock:
        t._asked[client] -= wanted  # the client gives them all back with its answer
        t._stats["reclaims"] += 1
        t._stats["reclaim_last_s"] = seconds
        t._stats["reclaim_max_s"] = max(t._stats["reclaim_max_s"], seconds)


def _migrate(t: "RemoteTier", client: int, ids: list[int], wanted: set[int]) -> None:
    """Move the handles in ``wanted`` blocks: the whole group into the core, else each
    that fits; the rest to other lenders (together, else one by one). If some find no
    room, the blocks already moved are given back here and the rest refused."""
    with t._lock:  # still there? a fetch or free may have taken some meanwhile
        moving = [(h, t._remote[h]) for h in ids if h in t._remote
                  and t._remote[h].client == client and t._remote[h].block is not None
                  and t._remote[h].block.id in wanted]
    done: list[RemoteBlock] = []  # blocks no handle uses any more (all moved)
    with t._lock:
        for _, r in moving:
            if r.prefetched:  # its prefetch buffer holds the bytes: give the block up
                done.extend(t._packs.drop(client, [r.block]))  # type: ignore[list-item]
                r.block = None
                t._stats["reclaimed_handles"] += 1
    moving = [(h, r) for h, r in moving if r.block is not None]
    left: list[tuple[int, _Remote, int]] = []
    if moving:
        buf = torch.empty(sum(r.nbytes for _, r in moving), dtype=torch.uint8,
                          device=t.device)
        ptrs = itertools.accumulate([r.nbytes for _, r in moving], initial=buf.data_ptr())
        group = [(h, r, p) for (h, r), p in zip(moving, ptrs)]
        stream = current_stream(t.device)
        t._stage.read_into([(r.client, r.block, r.offset, r.nbytes, p) for _, r, p in group],
                           stream)
        try:
            left = _to_core(t, group, stream, done)
            if left:
                left = _to_lenders(t, client, left, stream, done)
        except BaseException:  # a refusal: the blocks emptied so far have no handle to free them
            placement.free_blocks(t, client, done)
            raise
    if left:
        placement.free_blocks(t, client, done)
        n = sum(r.nbytes for _, r, _ in left)
        raise OutOfMemoryError(f"reclaim: {len(left)} handles ({n} bytes) find no room in the "
                               "core or another lender", requested=n)


def _to_core(t: "RemoteTier", group: list[tuple[int, _Remote, int]], stream: int,
             done: list[RemoteBlock]) -> list[tuple[int, _Remote, int]]:
    """Snapshots of the buffer into the core, fenced (the buffer dies after): the group in
    one batch, else one by one. Returns what did not fit."""
    batches = [group] + [[x] for x in group]  # the whole group, then each alone
    left = list(group)
    for batch in batches:
        if not all(x in left for x in batch):
            continue
        with t._ids_lock:  # the new core ids are the handles' before anyone lists them
            try:
                got = t._core.offload_many([(p, r.nbytes, r.priority, 0) for _, r, p in batch],
                                           stream, True)
            except OutOfMemoryError:
                continue
            with t._lock:
                for (h, r, _), (cid, _) in zip(batch, got):
                    del t._remote[h]
                    t._alias[h] = cid
                    t._lru[h] = r.priority
                    done.extend(t._packs.drop(r.client, [r.block]))  # type: ignore[list-item]
                t._stats["reclaimed_handles"] += len(batch)
        t._stage.sync(stream)
        left = [x for x in left if x not in batch]
        if not left:
            break
    return left


def _to_lenders(t: "RemoteTier", client: int, group: list[tuple[int, _Remote, int]],
                stream: int, done: list[RemoteBlock]) -> list[tuple[int, _Remote, int]]:
    """Write the group to another lender (together, else one by one); returns what found
    no room."""
    left = list(group)
    for batch in [group] + [[x] for x in group]:
        if not all(x in left for x in batch):
            continue
        try:
            got = replicas.place_and_write(
                t, [r.nbytes for _, r, _ in batch], lambda other, where: t._stage.write_from(
                    other, [(b, off, p, r.nbytes) for (b, off), (_, r, p) in zip(where, batch)],
                    stream), avoid=(client,))
        except (OutOfMemoryError, RemoteLostError):  # a lender lost meanwhile is skipped next
            continue
        from .tier import _Remote  # (tier.py imports this module)

        other, _, where = got[0]
        mirrors = got[1][2] if len(got) > 1 else [None] * len(batch)
        with t._lock:
            for (h, r, _), (b, off), m in zip(batch, where, mirrors):
                t._remote[h] = _Remote(other, b, r.nbytes, r.priority, off,
                                       mirror=m and (got[1][0], m[0], m[1]))
                done.extend(t._packs.drop(client, [r.block]))  # type: ignore[list-item]
            t._stats["reclaimed_handles"] += len(batch)
        for p in got:
            placement.settled(t, p[0], p[1])
        left = [x for x in left if x not in batch]
        if not left:
            break
    return left
