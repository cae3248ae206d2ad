"""Walking a workload's "state" object for the tensors to page out.

A state can be a tensor; a list, tuple, set or dict of states; an ``nn.Module`` (its buffers,
and its parameters when asked); a transformers ``Cache`` (its per-layer key/value tensors, found
through the object's attributes like any other object); or any object whose attributes hold
states. Library objects (managers, slicers, slices, handles), modules, classes and functions
are never followed: a state that refers to its slicer does not drag other slices' state in.
The walk returns each storage once (views of one storage are paged out together), only
for tensors on the requested device, and never follows an object twice (cycles are fine).
"""

from __future__ import annotations

import types
from typing import Any, Iterator

import torch

__all__ = ["collect_tensors"]

_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.device, torch.dtype,
          # never state: following them would walk the whole program (module globals)
          types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType,
          types.MethodType)


def collect_tensors(state: Any, device: torch.device | None, *, parameters: bool = False,
                    max_depth: int = 16) -> list[torch.Tensor]:
    """The tensors of ``state`` on ``device``, one per storage, in a deterministic order.

    Parameters
    ----------
    state : object
        See the module docstring.
    device : torch.device or None
        Only tensors on this device are returned (others stay where they are); None: all.
    parameters : bool
        Include an ``nn.Module``'s parameters (by default only its buffers: parameters of a
        shared model usually stay resident).
    max_depth : int
        How deep to follow attributes and containers.
    """
    seen_objects: set[int] = set()
    seen_storages: set[int] = set()
    found: list[torch.Tensor] = []
    for t in _walk(state, parameters, max_depth, seen_objects):
        if (device is not None and t.device != device) or t.layout != torch.strided:
            continue
        key = t.untyped_storage()._cdata
        if key in seen_storages:
            continue
        seen_storages.add(key)
        found.append(t)
    return found


def _walk(obj: Any, parameters: bool, depth: int, seen: set[int]) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth <= 0 or isinstance(obj, _ATOMS) or id(obj) in seen \
            or getattr(type(obj), "_aqua_not_state", False):  # managers, slicers, handles
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield from obj.buffers()
        if parameters:
            yield from obj.parameters()
        return
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _walk(value, parameters, depth - 1, seen)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        for value in items:
            yield from _walk(value, parameters, depth - 1, seen)
        return
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        for value in attrs.values():
            yield from _walk(value, parameters, depth - 1, seen)
    for cls in type(obj).__mro__:  # slots may be declared by any base class
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") \
                    and hasattr(obj, slot):
                yield from _walk(getattr(obj, slot), parameters, depth - 1, seen)
