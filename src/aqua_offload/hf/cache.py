"""OffloadedCache: a transformers KV cache whose layers live offloaded between their uses.

Note [Layer residency]
A layer's keys/values are on the device only while the layer is in use: ``update(layer i)``
fetches layer i (prefetched during layer i-1), starts prefetching the next offloaded layer on
the library's copy streams, runs transformers' own layer update, then pages the layer out and
leaves shape-only ``meta`` placeholders behind (``get_seq_length`` and mask sizes read shapes
only; a stray read of the data fails loudly instead of returning garbage). The tensors returned
to attention are the real ones: they are freed by torch once attention used them, so the page
out takes snapshots (``release=False``) rather than paging the storages out in place.

Note [Segments]
A full-attention layer only ever grows at the end of its sequence axis, so its offloaded form
is a list of segments covering consecutive token ranges; a segment is one handle holding the
keys' bytes then the values' bytes of its tokens (one handle per segment halves the per-call
costs, which dominate for small layers).
Paging out after an append copies only the new tokens, merged with trailing segments no longer
than them, like a binary counter: a layer of n tokens has O(log n) segments and each token is
copied O(log n) times over the whole generation, instead of n times for a full re-offload per
step. Segments are fetched with ``keep=True``, so the tier keeps them for the next step. Any
operation that may rewrite the prefix (sliding windows, crop, beam reorder, batch edits) ends
with a full rewrite of the layer instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import InvalidArgumentError, OutOfMemoryError
from ..handle import Handle, check_priority
from ..manager import OffloadManager

__all__ = ["OffloadedCache"]


@dataclass
class _Segment:
    handle: Handle  # the keys' bytes, then the values' bytes
    tokens: int


@dataclass
class _Slot:
    """The offloaded form of one layer (Note [Segments])."""

    segments: list[_Segment] = field(default_factory=list)
    tokens: int = 0            # tokens the segments cover, in order
    paged: bool = False        # the layer holds meta placeholders; the segments are its data
    prefetched: bool = False   # a prefetch of every segment is in flight


class OffloadedCache(DynamicCache):
    """A ``DynamicCache`` that keeps only the layers in use on the device.

    Use it as ``model.generate(..., past_key_values=OffloadedCache(config=model.config))``.
    Every other layer lives in the manager's tiers (peer GPU first, then pinned host): layer
    i+1 is prefetched while layer i computes, and a page out copies only the appended tokens
    (Note [Segments]). Greedy decoding gives the same tokens as the default cache.

    Parameters
    ----------
    manager : OffloadManager, optional
        Where layers are offloaded; default: the module's manager of the model's device.
    config : transformers.PretrainedConfig, optional
        The model's config, so that sliding-window layers get their own (smaller) layer type,
        as in ``DynamicCache(config=...)``. Recommended.
    offload_sliding : bool
        Also offload sliding-window layers (rewritten whole at every step, as their window
        moves). Default False: they are small and stay resident.
    prefetch : bool
        Prefetch the next offloaded layer while the current one computes (default True).
    priority : float
        Eviction priority of the offloaded layers in the manager's tiers.

    Notes
    -----
    Layers of other kinds (linear attention, KV-sharing, indexed) stay resident. The cache owns
    its handles: ``close()`` (or dropping the cache) gives their memory back to the tiers.
    """

    def __init__(self, manager: OffloadManager | None = None, *, config: Any = None,
                 offload_sliding: bool = False, prefetch: bool = True,
                 priority: float = 0.0) -> None:
        if manager is not None and not isinstance(manager, OffloadManager):
            raise InvalidArgumentError(f"manager must be an OffloadManager, got {manager!r}")
        priority = check_priority(priority)  # before anything is built: bad input changes nothing
        super().__init__(config=config)
        self._manager = manager
        self._offload_sliding = bool(offload_sliding)
        self._prefetch_next = bool(prefetch)
        self._priority = priority
        self._slots: list[_Slot] = []
        self._lock = threading.RLock()  # a cache is used by one thread at a time; close() may race
        self.bytes_offloaded = 0  # cumulative bytes copied to the tiers
        self.bytes_fetched = 0    # cumulative bytes copied back

    # -- the transformers Cache interface ------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states to layer ``layer_idx``; return its full keys and values."""
        with self._lock:
            manager = self._manager_for(key_states.device)
            if self.layer_class_to_replicate is not None:
                while len(self.layers) <= layer_idx:
                    self.layers.append(self.layer_class_to_replicate())
            self._bring_in(layer_idx, manager)
            if self._prefetch_next:
                self._prefetch_after(layer_idx, manager)
            layer = self.layers[layer_idx]
            before = _length(layer)
            keys, values = layer.update(key_states, value_states, *args, **kwargs)
            self._page_out(layer_idx, manager, before)
            return keys, values

    def crop(self, tokens_to_remove: int) -> None:
        self._rewriting("crop", tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rewriting("reorder_cache", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rewriting("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rewriting("batch_select_indices", indices)

    def reset(self) -> None:
        """Drop every layer's data (offloaded segments included), keeping the layer objects."""
        with self._lock:
            for i in range(len(self._slots)):
                self._drop_segments(i)  # the layers' reset drops the placeholders
            super().reset()

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, ...]]:
        # Copies of offloaded layers; the cache itself stays offloaded.
        for i, layer in enumerate(self.layers):
            keys, values = layer.keys, layer.values
            slot = self._slots[i] if i < len(self._slots) else None
            if slot is not None and slot.paged:
                keys, values = self._materialize(i, self._manager_for(None))
            yield keys, values, getattr(layer, "_sliding_window_tensor", None)

    # -- lifetime and reporting -----------------------------------------------------------
    def close(self) -> None:
        """Give every offloaded layer's memory back to the tiers; the cache is empty after."""
        self.reset()

    def __enter__(self) -> "OffloadedCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def aqua_preempt(self) -> None:
        """Called by a :class:`~aqua_offload.TimeSlicer` before it pages this cache out: a
        prefetched layer would otherwise stay on the device while the workload is parked."""
        with self._lock:
            for i, slot in enumerate(self._slots):
                if slot.prefetched:
                    handles = [seg.handle for seg in slot.segments]
                    self._manager_of(handles).fetch_many(handles, keep=True)  # then dropped
                    slot.prefetched = False

    def stats(self) -> dict[str, Any]:
        """Offloaded and resident layers, segments, bytes in the tiers and traffic so far."""
        with self._lock:
            paged = [s for s in self._slots if s.paged]
            return {"layers": len(self.layers), "offloaded_layers": len(paged),
                    "resident_layers": len(self.layers) - len(paged),
                    "segments": sum(len(s.segments) for s in self._slots),
                    "bytes_in_tiers": sum(seg.handle.nbytes for s in self._slots
                                          for seg in s.segments),
                    "bytes_offloaded": self.bytes_offloaded,
                    "bytes_fetched": self.bytes_fetched}

    def __repr__(self) -> str:
        st = self.stats()
        return (f"OffloadedCache(layers={st['layers']}, offloaded={st['offloaded_layers']}, "
                f"segments={st['segments']}, bytes_in_tiers={st['bytes_in_tiers']})")

    # -- paging (Note [Layer residency]) --------------------------------------------------
    def _manager_for(self, device: torch.device | None) -> OffloadManager:
        if self._manager is None:
            if device is None:
                raise InvalidArgumentError("OffloadedCache: no manager yet (nothing was cached)")
            from ..defaults import default_manager
            self._manager = default_manager(device)
        elif device is not None and self._manager.device != device:
            raise InvalidArgumentError(
                f"OffloadedCache: its manager offloads {self._manager.device} tensors, but the "
                f"model computes on {device}; pass OffloadedCache(manager=OffloadManager("
                f"device={str(device)!r}))")
        return self._manager

    def _manager_of(self, handles: list[Handle]) -> OffloadManager:
        return handles[0].manager if handles else self._manager_for(None)

    def _slot(self, i: int) -> _Slot:
        while len(self._slots) <= i:
            self._slots.append(_Slot())
        return self._slots[i]

    def _offloadable(self, layer: Any) -> str | None:
        """``append`` (prefix preserved by update), ``rewrite`` (whole layer), or None."""
        if type(layer) is DynamicLayer:
            return "append"
        if type(layer) is DynamicSlidingWindowLayer and self._offload_sliding:
            return "rewrite"
        return None

    def _materialize(self, i: int, manager: OffloadManager) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values, fetched from its segments (the segments stay)."""
        slot, layer = self._slots[i], self.layers[i]
        if not slot.segments:
            return (torch.empty(layer.keys.shape, dtype=layer.keys.dtype, device=manager.device),
                    torch.empty(layer.values.shape, dtype=layer.values.dtype, device=manager.device))
        handles = [seg.handle for seg in slot.segments]
        got = manager.fetch_many(handles, keep=True)
        slot.prefetched = False
        self.bytes_fetched += sum(h.nbytes for h in handles)
        pairs = [_unpack(buf, layer.keys, layer.values, seg.tokens)
                 for buf, seg in zip(got, slot.segments)]
        if len(pairs) == 1:
            return pairs[0]
        return (torch.cat([k for k, _ in pairs], dim=-2),
                torch.cat([v for _, v in pairs], dim=-2))

    def _bring_in(self, i: int, manager: OffloadManager) -> None:
        slot = self._slot(i)
        if slot.paged:
            layer = self.layers[i]
            layer.keys, layer.values = self._materialize(i, manager)
            slot.paged = False

    def _prefetch_after(self, i: int, manager: OffloadManager) -> None:
        """Start copying the next offloaded layer (circularly, as the next step starts at 0)."""
        n = len(self._slots)
        for j in [*range(i + 1, n), *range(0, i)]:
            slot = self._slots[j]
            if slot.paged and slot.segments:
                if not slot.prefetched:
                    manager.prefetch_many([seg.handle for seg in slot.segments])
                    slot.prefetched = True
                return

    def _page_out(self, i: int, manager: OffloadManager, before: int) -> None:
        layer, slot = self.layers[i], self._slot(i)
        kind = self._offloadable(layer)
        if kind is None or not layer.is_initialized:
            return
        keys, values = layer.keys, layer.values
        length = _length(layer)
        start, merged, popped = 0, list(slot.segments), False
        if kind == "append" and 0 <= before == slot.tokens <= length:
            start, merged, popped = before, [], True
            while slot.segments and slot.segments[-1].tokens <= length - start:
                merged.append(slot.segments[-1])  # binary counter: Note [Segments]
                start -= slot.segments.pop().tokens
        new: list[_Segment] = []
        if length > start:
            try:
                # The packed copy is never written again: the snapshot needs no fence, so decoding
                # goes on while it is copied (its memory is kept alive until the copy ran).
                handle = manager.offload(_pack(keys[..., start:, :], values[..., start:, :]),
                                         release=False, priority=self._priority,
                                         fence="deferred")
            except OutOfMemoryError:
                # No tier has room: the layer stays resident (correct, just not offloaded);
                # its next page out rewrites it whole.
                if popped:
                    slot.segments.extend(reversed(merged))
                return
            new.append(_Segment(handle, length - start))
            self.bytes_offloaded += handle.nbytes
        if start == 0:
            slot.segments = []
        for seg in merged:
            manager.free(seg.handle)
        slot.segments.extend(new)
        slot.tokens = length
        layer.keys = torch.empty(keys.shape, dtype=keys.dtype, device="meta")
        layer.values = torch.empty(values.shape, dtype=values.dtype, device="meta")
        slot.paged = True

    def _restore_placeholders(self, i: int) -> None:
        """Before an operation that reads every layer: bring it back (resident)."""
        slot = self._slots[i]
        if slot.paged:
            self._bring_in(i, self._manager_of([s.handle for s in slot.segments]))

    def _drop_segments(self, i: int) -> None:
        slot = self._slots[i]
        for seg in slot.segments:
            seg.handle.manager.free(seg.handle)
        self._slots[i] = _Slot()

    def _rewriting(self, op: str, *args: Any) -> None:
        """Run a DynamicCache operation that may rewrite any layer, then page out whole."""
        with self._lock:
            for i in range(len(self._slots)):
                self._restore_placeholders(i)
            getattr(super(), op)(*args)
            for i in range(len(self._slots)):
                self._slots[i].tokens = -1  # prefix unknown: full rewrite
                if self._slots[i].segments or self.layers[i].is_initialized:
                    device = self.layers[i].keys.device if self.layers[i].is_initialized else None
                    self._page_out(i, self._manager_for(device), -1)


def _length(layer: Any) -> int:
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return 0
    return int(layer.keys.shape[-2])


def _pack(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One contiguous byte tensor: the keys' bytes, then the values' (a device copy of the new
    tokens only; the snapshot needs a contiguous source anyway)."""
    return torch.cat([keys.contiguous().reshape(-1).view(torch.uint8),
                      values.contiguous().reshape(-1).view(torch.uint8)])


def _unpack(buf: torch.Tensor, keys_like: torch.Tensor, values_like: torch.Tensor,
            tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a fetched segment as keys and values of ``tokens`` tokens (shapes from the
    layer's placeholders, sequence axis -2)."""
    kshape = (*keys_like.shape[:-2], tokens, keys_like.shape[-1])
    vshape = (*values_like.shape[:-2], tokens, values_like.shape[-1])
    kbytes = keys_like.element_size() * _numel(kshape)
    return (buf[:kbytes].view(keys_like.dtype).view(kshape),
            buf[kbytes:].view(values_like.dtype).view(vshape))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
