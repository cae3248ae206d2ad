"""OffloadedCache: a transformers KV cache whose layers live offloaded between their uses.

Note [Layer residency]
A layer's keys/values are on the device only while the layer is in use: ``update(layer i)``
fetches layer i (prefetched during layer i-1), starts prefetching the next offloaded layer on
the library's copy streams, runs transformers' own layer update, then pages the layer out and
leaves shape-only ``meta`` placeholders behind (``get_seq_length`` and mask sizes read shapes
only). Model code that reads ``layers[i].keys`` directly gets the real tensors, fetched on
access (hf/layers.py, Note [Readable layers]). The tensors returned to attention are the real
ones: they are freed by torch once attention used them, so the page out takes snapshots
(``release=False``) rather than paging the storages out in place.

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

Note [Resident tail]
Decoding appends one token per layer per step, and each page out was a core call of its own
(plus the frees of the segments it merged): on small layers those calls, not the bytes,
dominated the step. So the tokens appended after the first page out stay resident, in a small
per-layer tail (a copy of their keys and values, ``chunk_tokens - 1`` tokens at most), and go
to the tiers as one segment once ``chunk_tokens`` of them accumulated: one page out per layer
every ``chunk_tokens`` steps instead of every step. The tail is part of the layer's data (reads
concatenate it after the segments; copies clone it; a TimeSlicer pages it out with the rest of
a preempted request's state). ``chunk_tokens=1`` pages every token out at once.

Note [Layer kinds]
Only transformers' plain ``DynamicLayer`` (and, with ``offload_sliding``,
``DynamicSlidingWindowLayer``) is offloaded; it becomes an ``OffloadedLayer`` in place. Every
other kind stays resident and untouched: linear-attention and hybrid layers (Qwen3-Next,
their conv/recurrent states are small and rewritten every step), ``DummyLayer`` (NemotronH's
mlp/moe layers, no data), indexed (DSA) and quantized layers. Cache-wide operations (crop,
beam reorder, batch edits) run transformers' own code on every layer after the offloaded ones
were brought in.

Note [Copies]: hf/copies.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import InvalidArgumentError, OutOfMemoryError
from ..handle import Handle, check_priority
from ..manager import OffloadManager
from .layers import (OffloadedLayer, OffloadedSlidingLayer, adopt, is_paged, pack, raw_keys,
                     raw_values, set_paged, unpack)

__all__ = ["OffloadedCache"]


@dataclass
class _Segment:
    handle: Handle  # the keys' bytes, then the values' bytes
    tokens: int


@dataclass
class _Slot:
    """The offloaded form of one layer (Notes [Segments], [Resident tail])."""

    segments: list[_Segment] = field(default_factory=list)
    tokens: int = 0            # tokens the segments and the tail cover, in order; -1: rewrite
    prefetched: bool = False   # a prefetch of every segment is in flight
    tail: tuple[torch.Tensor, torch.Tensor] | None = None  # resident keys, values after them

    def segment_tokens(self) -> int:
        return sum(seg.tokens for seg in self.segments)


class OffloadedCache(DynamicCache):
    """A ``DynamicCache`` that keeps only the layers in use on the device.

    Use it as ``model.generate(..., cache=OffloadedCache(config=model.config))`` (transformers
    >= 5.24; ``past_key_values=`` before, see :func:`aqua_offload.hf.cache_kwarg`), alone or as
    both halves of an ``EncoderDecoderCache``. Every other layer lives in the manager's tiers
    (peer GPU first, then pinned host): layer i+1 is prefetched while layer i computes, and a
    page out copies only the appended tokens (Note [Segments]). Decoding gives the same tokens
    as the default cache.

    Parameters
    ----------
    manager : OffloadManager, optional
        Where layers are offloaded; default: the module's manager of the model's device.
    config : transformers.PretrainedConfig, optional
        The model's config, so that sliding-window, linear-attention and dummy layers get their
        own layer type, as in ``DynamicCache(config=...)``. Recommended.
    offload_sliding : bool
        Also offload sliding-window layers (rewritten whole at every step, as their window
        moves). Default False: they are small and stay resident.
    prefetch : bool, optional
        Prefetch the next offloaded layer while the current one computes. Default: on a CUDA
        device (the copy engines overlap the copy with compute), not on the CPU, where the
        emulated tiers' copies run on the same cores as the model and a prefetch only adds a
        call per layer and step.
    priority : float
        Eviction priority of the offloaded layers in the manager's tiers.
    chunk_tokens : int
        Decoded tokens stay resident until this many accumulated in a layer, then go to the
        tiers as one segment (Note [Resident tail]); 1 pages every token out at once.

    Notes
    -----
    Layers of other kinds stay resident (Note [Layer kinds]). ``layers[i].keys`` and
    ``.values`` read the real tensors even while the layer is offloaded (fetched on access).
    ``copy.deepcopy`` gives an independent cache on the same manager (Note [Copies]). The cache
    owns its handles: ``close()`` (or dropping the cache) gives their memory back to the tiers.
    """

    def __init__(self, manager: OffloadManager | None = None, *, config: Any = None,
                 offload_sliding: bool = False, prefetch: bool | None = None,
                 priority: float = 0.0, chunk_tokens: int = 16) -> None:
        if manager is not None and not isinstance(manager, OffloadManager):
            raise InvalidArgumentError(f"manager must be an OffloadManager, got {manager!r}")
        priority = check_priority(priority)  # before anything is built: bad input changes nothing
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) \
                or not 1 <= chunk_tokens <= 2 ** 31:
            raise InvalidArgumentError(f"chunk_tokens must be an int in [1, 2**31], got "
                                       f"{chunk_tokens!r}")
        super().__init__(config=config)
        self._manager = manager
        self._offload_sliding = bool(offload_sliding)
        self._prefetch_next = None if prefetch is None else bool(prefetch)
        self._priority = priority
        self._chunk = chunk_tokens
        self._slots: list[_Slot] = []
        self._lock = threading.RLock()  # a cache is used by one thread at a time; close() may race
        self.bytes_offloaded = 0  # cumulative bytes copied to the tiers
        self.bytes_fetched = 0    # cumulative bytes copied back
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = OffloadedLayer
        for i, layer in enumerate(self.layers):
            adopt(layer, self, i, self._offload_sliding)

    # -- the transformers Cache interface ------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states to layer ``layer_idx``; return its full keys and values."""
        with self._lock:
            manager = self._manager_for(key_states.device)
            if self.layer_class_to_replicate is not None:
                while len(self.layers) <= layer_idx:
                    self.layers.append(self.layer_class_to_replicate())
            layer = self.layers[layer_idx]
            if self._offloadable(layer) is not None and "_aq_cache" not in layer.__dict__:
                adopt(layer, self, layer_idx, self._offload_sliding)
            before = _length(layer)
            if type(layer) is OffloadedLayer and is_paged(layer):
                # DynamicLayer.update is a concatenation: concatenate the fetched parts and the
                # new states at once, instead of bringing the layer in (one concatenation) and
                # appending (a second one, a full copy more per layer and step).
                parts = self._parts(layer_idx, manager)
                if self._prefetching(manager):
                    self._prefetch_after(layer_idx, manager)
                keys = torch.cat([*(k for k, _ in parts), key_states], dim=-2)
                values = torch.cat([*(v for _, v in parts), value_states], dim=-2)
                set_paged(layer, keys, values, False)
            else:
                self._bring_in(layer_idx, manager)
                if self._prefetching(manager):
                    self._prefetch_after(layer_idx, manager)
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
                self._drop_segments(i)
            super().reset()

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, ...]]:
        # The layers' properties fetch copies of offloaded layers; the cache stays offloaded.
        for layer in self.layers:
            yield layer.keys, layer.values, getattr(layer, "_sliding_window_tensor", None)

    # -- copies (Note [Copies], hf/copies.py) --------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> "OffloadedCache":
        from .copies import deep_copy

        with self._lock:
            return deep_copy(self, memo)

    def __copy__(self) -> "OffloadedCache":
        # A shallow copy would share handles (two owners, one block freed twice): copy deeply.
        return self.__deepcopy__({})

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
            for slot in self._slots:
                if slot.prefetched:
                    handles = [seg.handle for seg in slot.segments]
                    self._manager_of(handles).fetch_many(handles, keep=True)  # then dropped
                    slot.prefetched = False

    def stats(self) -> dict[str, Any]:
        """Offloaded and resident layers, segments, bytes in the tiers and traffic so far."""
        with self._lock:
            paged = sum(1 for layer in self.layers if is_paged(layer))
            return {"layers": len(self.layers), "offloaded_layers": paged,
                    "resident_layers": len(self.layers) - paged,
                    "segments": sum(len(s.segments) for s in self._slots),
                    "bytes_in_tiers": sum(seg.handle.nbytes for s in self._slots
                                          for seg in s.segments),
                    "resident_tail_bytes": sum(s.tail[0].nbytes + s.tail[1].nbytes
                                               for s in self._slots if s.tail is not None),
                    "bytes_offloaded": self.bytes_offloaded,
                    "bytes_fetched": self.bytes_fetched}

    def is_offloaded(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx``'s data lives in the tiers (its tensors are placeholders
        that a read of ``keys``/``values`` fetches)."""
        return 0 <= layer_idx < len(self.layers) and is_paged(self.layers[layer_idx])

    def __repr__(self) -> str:
        st = self.stats()
        return (f"OffloadedCache(layers={st['layers']}, offloaded={st['offloaded_layers']}, "
                f"segments={st['segments']}, bytes_in_tiers={st['bytes_in_tiers']})")

    # -- reads and writes from outside (hf/layers.py, Note [Readable layers]) -----------------
    def _read_paged(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            layer = self.layers[i]
            if not is_paged(layer):
                return raw_keys(layer), raw_values(layer)
            manager = self._manager_of([seg.handle for seg in self._slots[i].segments])
            pair = self._materialize(i, manager)
            if self._prefetching(manager):
                self._prefetch_after(i, manager)  # the reader moves on to the next layer
            return pair

    def _write_paged(self, i: int) -> None:
        with self._lock:
            self._restore_placeholders(i)
            self._slot(i).tokens = -1  # written from outside: its prefix is unknown

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

    def _prefetching(self, manager: OffloadManager) -> bool:
        if self._prefetch_next is None:
            return manager.device.type == "cuda"
        return self._prefetch_next

    def _manager_of(self, handles: list[Handle]) -> OffloadManager:
        return handles[0].manager if handles else self._manager_for(None)

    def _slot(self, i: int) -> _Slot:
        while len(self._slots) <= i:
            self._slots.append(_Slot())
        return self._slots[i]

    @staticmethod
    def _offloadable(layer: Any) -> str | None:
        """``append`` (prefix preserved by update), ``rewrite`` (whole layer), or None
        (Note [Layer kinds])."""
        if type(layer) is OffloadedLayer:
            return "append"
        if type(layer) is OffloadedSlidingLayer:
            return "rewrite"
        return None

    def _parts(self, i: int, manager: OffloadManager) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Layer i's keys and values in token order: its segments, fetched (they stay in the
        tiers), then its resident tail."""
        slot, layer = self._slots[i], self.layers[i]
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if slot.segments:
            keys_like, values_like = raw_keys(layer), raw_values(layer)
            handles = [seg.handle for seg in slot.segments]
            got = manager.fetch_many(handles, keep=True)
            slot.prefetched = False
            self.bytes_fetched += sum(h.nbytes for h in handles)
            pairs = [unpack(buf, keys_like, values_like, seg.tokens)
                     for buf, seg in zip(got, slot.segments)]
        if slot.tail is not None:
            pairs.append(slot.tail)
        return pairs

    def _materialize(self, i: int, manager: OffloadManager) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values, fetched from its segments (the segments stay)."""
        slot, layer = self._slots[i], self.layers[i]
        keys_like, values_like = raw_keys(layer), raw_values(layer)
        pairs = self._parts(i, manager)
        if not pairs:
            return (torch.empty(keys_like.shape, dtype=keys_like.dtype, device=manager.device),
                    torch.empty(values_like.shape, dtype=values_like.dtype,
                                device=manager.device))
        if len(pairs) == 1 and slot.tail is None:
            return pairs[0]
        return (torch.cat([k for k, _ in pairs], dim=-2),
                torch.cat([v for _, v in pairs], dim=-2))

    def _bring_in(self, i: int, manager: OffloadManager) -> None:
        layer = self.layers[i]
        self._slot(i)
        if is_paged(layer):
            keys, values = self._materialize(i, manager)
            set_paged(layer, keys, values, False)

    def _prefetch_after(self, i: int, manager: OffloadManager) -> None:
        """Start copying the next offloaded layer (circularly, as the next step starts at 0)."""
        n = len(self._slots)
        for j in [*range(i + 1, n), *range(0, i)]:
            slot = self._slots[j]
            if slot.segments and j < len(self.layers) and is_paged(self.layers[j]):
                if not slot.prefetched:
                    manager.prefetch_many([seg.handle for seg in slot.segments])
                    slot.prefetched = True
                return

    def _page_out(self, i: int, manager: OffloadManager, before: int) -> None:
        layer, slot = self.layers[i], self._slot(i)
        kind = self._offloadable(layer)
        if kind is None or not layer.is_initialized or is_paged(layer):
            return
        keys, values = raw_keys(layer), raw_values(layer)
        length = _length(layer)
        start, merged, popped = 0, list(slot.segments), False
        if kind == "append" and 0 <= before == slot.tokens <= length:
            start = slot.segment_tokens()
            if slot.segments and length - start < self._chunk:  # Note [Resident tail]
                self._keep_in_tail(layer, slot, keys, values, before, length)
                return
            merged, popped = [], True
            while slot.segments and slot.segments[-1].tokens <= length - start:
                merged.append(slot.segments[-1])  # binary counter: Note [Segments]
                start -= slot.segments.pop().tokens
        new: list[_Segment] = []
        if length > start:
            try:
                # The packed copy is never written again: the snapshot needs no fence, so decoding
                # goes on while it is copied (its memory is kept alive until the copy ran).
                handle = manager.offload(pack(keys[..., start:, :], values[..., start:, :]),
                                         release=False, priority=self._priority,
                                         fence="deferred")
            except OutOfMemoryError:
                # No tier has room: the layer stays resident (correct, just not offloaded);
                # its next page out rewrites it whole.
                if popped:
                    slot.segments.extend(reversed(merged))
                slot.tokens, slot.tail = -1, None  # the resident layer holds everything
                return
            new.append(_Segment(handle, length - start))
            self.bytes_offloaded += handle.nbytes
        if start == 0:
            slot.segments = []
        for seg in merged:
            manager.free(seg.handle)
        slot.segments.extend(new)
        slot.tokens, slot.tail = length, None
        _placeholders(layer, keys, values)

    @staticmethod
    def _keep_in_tail(layer: Any, slot: _Slot, keys: torch.Tensor, values: torch.Tensor,
                      before: int, length: int) -> None:
        """Keep the tokens appended since ``before`` resident (Note [Resident tail])."""
        if length > before:
            # New tensors (a concatenation or a clone): a view would keep the layer's whole
            # keys alive.
            new_k, new_v = keys[..., before:, :], values[..., before:, :]
            if slot.tail is None:
                slot.tail = (new_k.clone(), new_v.clone())
            else:
                slot.tail = (torch.cat([slot.tail[0], new_k], dim=-2),
                             torch.cat([slot.tail[1], new_v], dim=-2))
        slot.tokens = length
        _placeholders(layer, keys, values)

    def _restore_placeholders(self, i: int) -> None:
        """Before an operation that reads every layer: bring it back (resident)."""
        if i < len(self.layers) and is_paged(self.layers[i]):
            self._bring_in(i, self._manager_of([s.handle for s in self._slots[i].segments]))

    def _drop_segments(self, i: int) -> None:
        slot = self._slots[i]
        for seg in slot.segments:
            seg.handle.manager.free(seg.handle)
        self._slots[i] = _Slot()
        if i < len(self.layers) and is_paged(self.layers[i]):
            layer = self.layers[i]  # its data is gone: empty placeholders, reset next
            set_paged(layer, raw_keys(layer), raw_values(layer), False)

    def _rewriting(self, op: str, *args: Any) -> None:
        """Run a DynamicCache operation that may rewrite any layer, then page out whole."""
        with self._lock:
            ours = [i for i, layer in enumerate(self.layers)
                    if self._offloadable(layer) is not None]
            for i in ours:
                self._restore_placeholders(i)
            getattr(super(), op)(*args)
            for i in ours:
                layer, slot = self.layers[i], self._slot(i)
                slot.tokens = -1  # prefix unknown: full rewrite
                keys = raw_keys(layer)
                if layer.is_initialized and keys is not None:
                    self._page_out(i, self._manager_for(keys.device), -1)
                elif slot.segments:
                    self._drop_segments(i)


def _placeholders(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Leave shape-only placeholders in the layer: its data lives in its slot."""
    set_paged(layer, torch.empty(keys.shape, dtype=keys.dtype, device="meta"),
              torch.empty(values.shape, dtype=values.dtype, device="meta"), True)


def _length(layer: Any) -> int:
    keys = raw_keys(layer)
    if not layer.is_initialized or keys is None or keys.numel() == 0:
        return 0
    return int(keys.shape[-2])
