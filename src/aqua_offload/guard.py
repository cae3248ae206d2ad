"""``debug_guard``: turn a touch of a paged-out tensor into a clear error instead of a crash."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import storage
from .errors import PagedOutError

__all__ = ["debug_guard"]


class debug_guard(TorchDispatchMode):
    """Context manager: raise :class:`PagedOutError` before any torch operation reads or writes
    a tensor whose storage is paged out.

    Torch does not bounds-check a storage resized to zero bytes, so without it such a touch
    crashes the process (CPU) or faults the CUDA context (GPU). The guard costs one dictionary
    lookup per tensor argument of every operation, so use it while debugging.

    Examples
    --------
    >>> with aq.debug_guard():
    ...     h = m.offload(t)
    ...     t.sum()          # raises PagedOutError instead of crashing
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if storage.any_offloaded():
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and storage.is_offloaded(leaf):
                    raise PagedOutError(
                        f"{func} would touch a tensor of shape {tuple(leaf.shape)} whose storage "
                        "is paged out; fetch its handle first (aqua_offload.fetch)")
        if storage.any_deferred():
            for leaf in _written(func, args, kwargs):
                if storage.deferred_unfenced(leaf):
                    raise PagedOutError(
                        f"{func} would write a tensor of shape {tuple(leaf.shape)} whose snapshot "
                        "(offload(..., fence='deferred')) may still be copying it; call "
                        "handle.fence() first (Note [Deferred snapshots])")
        return func(*args, **kwargs)


def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensor arguments an operator writes (in place or out=), from its schema."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
        out.extend(v for v in tree_leaves(value) if isinstance(v, torch.Tensor))
    return out
