"""Memory a copy may still read, kept alive until it did (emulation; CUDA uses record_stream).

When a storage is paged out (release=True) or a deferred snapshot's source may be dropped, the
offload copy can still be reading that memory on a worker thread. On CUDA the caching allocator
is told with ``record_stream``; on emulation there is no allocator to tell, so the memory is
held here, by core handle id, until the copy's event completed. The watch never holds a
Handle: a handle nobody references can die (and free its block) while its memory waits here.
Memory is dropped outside the lock: the last reference to a tensor can run finalizers (a
paged-out storage's, Note [Paging registry]) that free handles and call back into the watch.
"""

from __future__ import annotations

import collections
import threading
from itertools import repeat
from typing import Any, Callable, Iterable

__all__ = ["HolderWatch"]


class HolderWatch:
    """Holders by core handle id, oldest first; ``ready(id)`` says whether its copy completed
    (raising for a handle gone from the core: its copy is known complete then)."""

    def __init__(self, ready: Callable[[int], bool]) -> None:
        self._ready = ready
        self._held: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._lock = threading.RLock()

    # A held value is the memory itself, or a tuple nesting several when one id keeps more
    # than one alive (no list per id: one object less per handle for the garbage collector)
    def hold(self, core_id: int, memory: Any) -> None:
        with self._lock:
            held = self._held
            held[core_id] = (held[core_id], memory) if core_id in held else memory

    def hold_many(self, core_ids: Iterable[int], memories: Iterable[Any]) -> None:
        """:meth:`hold` of each core id with its memory, in order, under one lock."""
        with self._lock:
            held = self._held
            for core_id, memory in zip(core_ids, memories):  # a loop: see storage.unregister_many
                held[core_id] = (held[core_id], memory) if core_id in held else memory

    def transfer(self, old_id: int, new_id: int) -> None:
        """``new_id``'s copy completes after ``old_id``'s (an incremental offload consumed the
        base ``old_id``): what ``old_id`` kept alive is now kept until ``new_id`` is ready."""
        with self._lock:
            held = self._held
            moved = held.pop(old_id, None)
            if moved is not None:
                held[new_id] = (held[new_id], moved) if new_id in held else moved

    def holding(self, core_id: int) -> bool:
        return core_id in self._held

    def drop(self, core_id: int) -> None:
        """The copy reading it completed (a fetch or wait ordered after it)."""
        with self._lock:
            memory = self._held.pop(core_id, None)
        del memory  # outside the lock: freeing it can run finalizers that call back in

    def drop_many(self, core_ids: list[int]) -> None:
        """:meth:`drop` of each, under one lock."""
        if not self._held:  # (ids the caller holds cannot be added meanwhile)
            return
        with self._lock:  # (one C call; not a comprehension: see storage.unregister_many)
            dropped = list(map(self._held.pop, core_ids, repeat(None)))
        del dropped  # outside the lock, as in drop()

    def reap(self) -> None:
        """Drop holders whose copy completed, oldest first, stopping at the first still running
        (copies of one lane complete in order)."""
        if not self._held:
            return
        dropped = []
        with self._lock:
            while self._held:
                core_id = next(iter(self._held))
                try:
                    if not self._ready(core_id):
                        break
                except Exception:  # fetched or freed meanwhile, or closed: the copy is done
                    pass
                dropped.append(self._held.pop(core_id))
        del dropped  # freed outside the lock

    def clear(self) -> None:
        with self._lock:
            held, self._held = self._held, collections.OrderedDict()
        del held
