"""Argument checks of OffloadManager: what can be offloaded, fetched into, or extended."""

from __future__ import annotations

import operator
from itertools import repeat
from operator import is_
from typing import Any

import numpy as np
import torch

from . import arrays, storage
from .errors import InvalidArgumentError
from .handle import Handle

__all__ = ["as_list", "check_offload", "check_tensor", "check_out", "check_outs", "check_base"]

# What check_tensor looks at, read in one C loop over a batch (the first bad tensor, if any, is
# then found by check_tensor itself, with its message); whether one is quantized is told by its
# dtype, which the batch's handles keep anyway (a torch attribute read costs ~80 ns a tensor)
_FACTS = operator.attrgetter("device", "layout", "is_nested")
_QUANTIZED = frozenset(getattr(torch, n) for n in ("qint8", "quint8", "qint32", "quint4x2",
                                                    "quint2x4") if hasattr(torch, n))
_TENSOR = {torch.Tensor}
_release_of = operator.attrgetter("release")
_array_of = operator.attrgetter("_array")
_device_of = operator.attrgetter("device")
_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")


def as_list(items: Any, what: str) -> list[Any]:
    """A batch argument as a list: any iterable but a tensor, an array, a string or None."""
    if items is None or isinstance(items, (str, bytes, torch.Tensor)) or arrays.is_array(items):
        raise InvalidArgumentError(f"{what} expects a list of tensors or handles, got "
                                   f"{type(items).__name__} (wrap a single one in a list)")
    try:
        return list(items)
    except TypeError:
        raise InvalidArgumentError(f"{what} expects a list of tensors or handles, got "
                                   f"{type(items).__name__}") from None


def check_offload(tensors: list[Any], release: bool, fence: str, device: torch.device,
                  what: str) -> tuple[list[Any], list[torch.dtype]]:
    """Check an offload batch before anything changes; arrays are replaced in ``tensors`` by
    their bytes (:mod:`aqua_offload.arrays`). Returns their specs (None for tensors) and the
    dtype of each tensor (read once: the handles keep it)."""
    if not isinstance(release, (bool, np.bool_)):
        raise InvalidArgumentError(f"{what}: release must be True or False, got {release!r}")
    if fence not in ("now", "deferred"):
        raise InvalidArgumentError(f"{what}: fence must be 'now' or 'deferred', got {fence!r}")
    if fence == "deferred" and release:
        raise InvalidArgumentError(f"{what}: fence='deferred' is for snapshots (release=False); "
                                   "a released tensor is never written")
    specs: list[Any] = [None] * len(tensors)
    types = set(map(type, tensors))
    if types <= _TENSOR or all(issubclass(tp, torch.Tensor) for tp in types):  # no array
        if len(tensors) > 1 and set(map(_FACTS, tensors)) <= {(device, torch.strided, False)}:
            dtypes = list(map(_dtype_of, tensors))
            if _QUANTIZED.isdisjoint(dtypes):
                return specs, dtypes  # every tensor passes check_tensor (for one, it costs more)
    elif any(arrays.is_array(t) for t in tensors):
        if release:
            raise InvalidArgumentError(f"{what}: arrays (numpy, CuPy, DLPack) are offloaded as "
                                       "snapshots: pass release=False")
        for i, t in enumerate(tensors):
            if arrays.is_array(t):
                tensors[i], specs[i] = arrays.to_bytes(t, device, what)
    for t in tensors:
        check_tensor(t, device, what)
    return specs, list(map(_dtype_of, tensors))


def check_tensor(t: Any, device: torch.device, what: str) -> None:
    """A tensor this manager can offload: dense, not quantized, on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{what} expects a torch.Tensor (or a numpy/CuPy/DLPack "
                                   f"array), got {type(t).__name__}")
    if t.is_quantized:
        raise InvalidArgumentError(f"{what}: the tensor is quantized ({t.dtype}); offload "
                                   "its int_repr() and quantization parameters instead")
    if t.layout != torch.strided or t.is_nested:
        raise InvalidArgumentError(f"{what}: only strided (dense) tensors can be offloaded, "
                                   f"got layout {t.layout}")
    if t.device != device:
        raise InvalidArgumentError(f"{what}: tensor is on {t.device}, this manager serves "
                                   f"{device}")


def check_out(out: Any, handle: Handle, device: torch.device) -> None:
    """A tensor a snapshot can be fetched into."""
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(f"fetch: out must be a torch.Tensor, got {type(out).__name__}")
    if out.device != device or out.dtype != handle.dtype or out.shape != handle.shape:
        raise InvalidArgumentError(
            f"fetch: out is {tuple(out.shape)} {out.dtype} on {out.device}; the handle needs "
            f"{tuple(handle.shape)} {handle.dtype} on {device}")
    if not out.is_contiguous() or storage.unsafe_to_touch(out):
        raise InvalidArgumentError("fetch: out must be contiguous and not paged out")


def check_outs(handles: list[Handle], outs: list[Any], device: torch.device,
               snapshots: bool = False) -> bool:
    """Whether ``outs`` (one entry per handle) pass at once: all None, or all tensors that
    :func:`check_out` accepts for snapshots of tensors (``snapshots``: the caller knows every
    handle is one). False means "look one by one" (the caller's loop finds the first problem,
    with its message), not that one is wrong. One C loop per fact over the batch: a Python
    line per handle costs more than the fetch."""
    n = sum(map(is_, outs, repeat(None)))  # (not count(None): it would compare tensors)
    if n == len(outs):
        return True
    if n or set(map(type, outs)) != _TENSOR:
        return False
    if not snapshots and (any(map(_release_of, handles))
                          or not all(map(is_, map(_array_of, handles), repeat(None)))):
        return False
    return (set(map(_device_of, outs)) == {device}
            and list(map(_dtype_of, outs)) == list(map(_dtype_of, handles))
            and list(map(_shape_of, outs)) == list(map(_shape_of, handles))
            and all(map(torch.Tensor.is_contiguous, outs)) and storage.all_touchable(outs))


def check_base(base: Handle, tensor: torch.Tensor) -> Handle:
    """``base`` may be extended by ``tensor``: a live, unprefetched snapshot or kept copy
    whose bytes are a prefix of tensor's (Note [Incremental offload] in the core)."""
    if base.release and not base._kept:
        raise InvalidArgumentError(
            "offload(base=): the base still holds a paged-out tensor; pass a snapshot "
            "or a copy kept by fetch(h, keep=True)")
    if base._prefetch is not None:
        raise InvalidArgumentError("offload(base=): the base has a prefetch in flight; "
                                   "fetch or free it first")
    if base._array is not None:
        raise InvalidArgumentError("offload(base=): an array snapshot cannot be a base")
    if tensor.is_neg() or tensor.is_conj():
        # A lazily negated/conjugated view: its values are not its bytes, so the bytes kept by
        # the base and the values copied now would not line up. (Another dtype is fine: the
        # contract is on bytes, e.g. a uint8 view of the same append-only buffer.)
        raise InvalidArgumentError(
            "offload(base=): the tensor is a negated or conjugated view, whose values are not "
            "its bytes; extend with t.resolve_neg() / t.resolve_conj()")
    if not tensor.is_contiguous():
        # A view whose logical order is not its memory order (a transpose, a strided slice)
        # is the usual way to pass bytes that are not the base's prefix: wrong data, so no.
        raise InvalidArgumentError(
            f"offload(base=): the tensor ({tuple(tensor.shape)}, strides {tensor.stride()}) "
            "is not contiguous, so its bytes are not the base's prefix in order; offload "
            "the contiguous append-only tensor itself")
    if base.release and tensor.storage_offset() != 0:
        raise InvalidArgumentError("offload(base=): a kept release is a prefix only of a "
                                   "tensor at the start of its storage")
    return base
