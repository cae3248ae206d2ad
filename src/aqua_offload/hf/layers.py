"""The layer classes of an OffloadedCache: transformers' dynamic layers whose ``keys``/``values``
stay readable while the layer's data lives offloaded.

Note [Readable layers]
Model code reads ``cache.layers[i].keys`` directly: Bart, T5 and Whisper for their cross-attention
cache (written once at the first step, read at every later one), Mllama for its cross-attention
layers. An offloaded layer holds shape-only ``meta`` placeholders, so a plain attribute would give
such code an empty tensor ("key.device: meta"). Here ``keys`` and ``values`` are properties: read
while the layer is offloaded, they fetch its data (the offloaded copy stays; the tensors returned
belong to the caller, so the layer stays offloaded). Reading ``keys`` fetches keys and values
together (one handle per segment holds both) and keeps the values for the ``values`` read that
follows, so a ``keys``-then-``values`` pair costs one fetch. Inside the cache, shapes are read
from the placeholders (``raw_keys``/``raw_values``), never through the properties, so
``get_seq_length`` and mask sizes cost no copy.
A write to an offloaded layer from outside (``layer.keys = t``) first brings the layer in and
marks it for a full rewrite at its next page out: its offloaded prefix may no longer match.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import InvalidHandleError

__all__ = ["OffloadedLayer", "OffloadedSlidingLayer", "adopt", "raw_keys", "raw_values",
           "is_paged", "set_paged", "pack", "unpack"]


def raw_keys(layer: Any) -> torch.Tensor | None:
    """The tensor the layer holds (a ``meta`` placeholder when offloaded): no fetch."""
    return layer.__dict__.get("_aq_keys") if _ours(layer) else layer.keys


def raw_values(layer: Any) -> torch.Tensor | None:
    return layer.__dict__.get("_aq_values") if _ours(layer) else layer.values


def is_paged(layer: Any) -> bool:
    """Whether the layer's data lives offloaded (it holds placeholders)."""
    return bool(layer.__dict__.get("_aq_paged", False))


def set_paged(layer: Any, keys: torch.Tensor | None, values: torch.Tensor | None,
              paged: bool) -> None:
    """Install tensors (real ones, or placeholders when ``paged``) without the write hook."""
    d = layer.__dict__
    d["_aq_keys"], d["_aq_values"], d["_aq_paged"] = keys, values, paged
    d.pop("_aq_borrowed", None)


def _ours(layer: Any) -> bool:
    return isinstance(layer, _OURS)


def _read(layer: Any, which: int) -> torch.Tensor:
    d = layer.__dict__
    borrowed = d.get("_aq_borrowed")
    if borrowed is not None and borrowed[which] is not None:
        out = borrowed[which]
        borrowed[which] = None
        if borrowed[1 - which] is None:
            d.pop("_aq_borrowed", None)
        return out
    ref = d.get("_aq_cache")
    cache = ref() if ref is not None else None
    if cache is None:
        raise InvalidHandleError("this offloaded cache layer outlived its OffloadedCache: its "
                                 "data went with the cache")
    pair = list(cache._read_paged(d["_aq_index"]))
    out = pair[which]
    pair[which] = None
    if is_paged(layer):  # still offloaded: keep the other half for the read that follows
        d["_aq_borrowed"] = pair
    return out


def _write(layer: Any, name: str, value: Any) -> None:
    d = layer.__dict__
    if d.get("_aq_paged"):
        ref = d.get("_aq_cache")
        cache = ref() if ref is not None else None
        if cache is not None:
            cache._write_paged(d["_aq_index"])  # brings the layer in, full rewrite later
        d["_aq_paged"] = False
    d.pop("_aq_borrowed", None)
    d[name] = value


def _get_keys(layer: Any) -> torch.Tensor | None:
    d = layer.__dict__
    return _read(layer, 0) if d.get("_aq_paged") else d.get("_aq_keys")


def _get_values(layer: Any) -> torch.Tensor | None:
    d = layer.__dict__
    return _read(layer, 1) if d.get("_aq_paged") else d.get("_aq_values")


def _set_keys(layer: Any, value: torch.Tensor | None) -> None:
    _write(layer, "_aq_keys", value)


def _set_values(layer: Any, value: torch.Tensor | None) -> None:
    _write(layer, "_aq_values", value)


# The classes below add no layout to their base (no mixin class: CPython refuses a __class__
# change across a different base list), so a transformers layer becomes one in place.
# ``_layer_type = None``: a subclass must never register itself in transformers' mappings
# (CacheLayerMixin.__init_subclass__).


class OffloadedLayer(DynamicLayer):
    """A full-attention ``DynamicLayer`` of an OffloadedCache (appended to, offloaded in
    segments between its uses; Note [Readable layers])."""

    _layer_type = None
    keys = property(_get_keys, _set_keys)  # type: ignore[assignment]
    values = property(_get_values, _set_values)  # type: ignore[assignment]

    def get_seq_length(self) -> int:
        keys = self.__dict__.get("_aq_keys")  # the placeholder's shape: no fetch
        if not self.is_initialized or keys is None or keys.numel() == 0:
            return 0
        return int(keys.shape[-2])


class OffloadedSlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer of an OffloadedCache built with ``offload_sliding=True``
    (rewritten whole at each page out, as its window moves; Note [Readable layers])."""

    _layer_type = None
    keys = property(_get_keys, _set_keys)  # type: ignore[assignment]
    values = property(_get_values, _set_values)  # type: ignore[assignment]


_OURS = (OffloadedLayer, OffloadedSlidingLayer)


def adopt(layer: Any, cache: Any, index: int, offload_sliding: bool) -> Any:
    """Turn one of transformers' dynamic layers into its offloadable class in place (other
    layer kinds are returned as they are: they stay resident), and bind it to ``cache``."""
    cls = type(layer)
    if cls is DynamicLayer:
        target: type | None = OffloadedLayer
    elif cls is DynamicSlidingWindowLayer and offload_sliding:
        target = OffloadedSlidingLayer
    elif cls in (OffloadedLayer, OffloadedSlidingLayer):
        target = cls
    else:
        return layer
    d = layer.__dict__
    if cls is not target:
        keys, values = d.pop("keys", None), d.pop("values", None)
        layer.__class__ = target
        set_paged(layer, keys, values, False)
    d["_aq_cache"] = weakref.ref(cache)
    d["_aq_index"] = index
    return layer


def pack(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One contiguous byte tensor: the keys' bytes, then the values' (a device copy of the new
    tokens only; the snapshot needs a contiguous source anyway)."""
    return torch.cat([keys.contiguous().reshape(-1).view(torch.uint8),
                      values.contiguous().reshape(-1).view(torch.uint8)])


def unpack(buf: torch.Tensor, keys_like: torch.Tensor, values_like: torch.Tensor,
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
