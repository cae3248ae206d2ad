"""Walking a workload's "state" object for the tensors to page out.

A state can be a tensor; a list, tuple, set or dict of states; an ``nn.Module`` (its buffers,
and its parameters when asked); a transformers ``Cache`` (its per-layer key/value tensors, found
through the object's attributes like any other object); or any object whose attributes hold
states. Library objects (managers, slicers, slices, handles), modules, classes and functions
are never followed: a state that refers to its slicer does not drag other slices' state in.
The walk returns each storage once (views of one storage are paged out together), only
for tensors on the requested device, and never follows an object twice (cycles are fine).

Note [Paths]
The walk also says where it found each tensor, so that an error can name it
(``state['kv'][3]``, ``state.model.layers.0.running_mean``). A path is a linked tuple
``(parent, kind, key)`` (``None`` is the state itself), made as the walk descends and formatted
only by :func:`format_path`, when an error needs it: the walk stays as cheap as without paths.
"""

from __future__ import annotations

import reprlib
import types
from typing import Any, Iterator, Optional, Tuple

import torch

__all__ = ["collect_tensors", "collect_tensor_paths", "walk_tensors", "format_path", "Path"]

Path = Optional[Tuple[Any, str, Any]]  # Note [Paths]: (parent path, kind, key); None: the root

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
    seen_storages: set[int] = set()
    found: list[torch.Tensor] = []
    for _, t in _walk(state, parameters, max_depth, set(), None):
        if (device is not None and t.device != device) or t.layout != torch.strided:
            continue
        key = t.untyped_storage()._cdata
        if key not in seen_storages:
            seen_storages.add(key)
            found.append(t)
    return found


def collect_tensor_paths(state: Any, device: torch.device | None, *, parameters: bool = False,
                         max_depth: int = 16) -> list[tuple[int, Path, torch.Tensor]]:
    """Like :func:`collect_tensors`, as ``(storage key, path, tensor)`` triples: the key
    identifies the storage (``untyped_storage()._cdata``), the path where the walk met the
    tensor standing for it (Note [Paths])."""
    seen_storages: set[int] = set()
    found: list[tuple[int, Path, torch.Tensor]] = []
    for path, t in _walk(state, parameters, max_depth, set(), None):
        if (device is not None and t.device != device) or t.layout != torch.strided:
            continue
        key = t.untyped_storage()._cdata
        if key in seen_storages:
            continue
        seen_storages.add(key)
        found.append((key, path, t))
    return found


def walk_tensors(state: Any, *, parameters: bool = False, max_depth: int = 16
                 ) -> Iterator[tuple[Path, torch.Tensor]]:
    """Every tensor the walk meets, with its path: any device and any layout, views of one
    storage not merged (the order of :func:`collect_tensors`, before its filters)."""
    return _walk(state, parameters, max_depth, set(), None)


def format_path(path: Path, root: str = "state") -> str:
    """A path as an expression rooted at ``root``: ``state['kv'][3]``, ``state.cache.keys``."""
    parts: list[str] = []
    while path is not None:
        path, kind, key = path
        if kind == "item":
            parts.append(f"[{reprlib.repr(key)}]")
        elif kind == "attr":
            parts.append(f".{key}")
        else:  # a set has no order of its own: the walk's (sorted by repr)
            parts.append(f"<item {key} of a set>")
    return root + "".join(reversed(parts))


def _walk(obj: Any, parameters: bool, depth: int, seen: set[int], path: Path
          ) -> Iterator[tuple[Path, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if depth <= 0 or isinstance(obj, _ATOMS) or id(obj) in seen \
            or getattr(type(obj), "_aqua_not_state", False):  # managers, slicers, handles
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        for name, t in obj.named_buffers():  # what buffers() yields, with names
            yield (path, "attr", name), t
        if parameters:
            for name, t in obj.named_parameters():
                yield (path, "attr", name), t
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, parameters, depth - 1, seen, (path, "item", key))
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, parameters, depth - 1, seen, (path, "item", i))
        return
    if isinstance(obj, (set, frozenset)):
        for i, value in enumerate(sorted(obj, key=repr)):
            yield from _walk(value, parameters, depth - 1, seen, (path, "set", i))
        return
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        for name, value in attrs.items():
            yield from _walk(value, parameters, depth - 1, seen, (path, "attr", name))
    for cls in type(obj).__mro__:  # slots may be declared by any base class
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") \
                    and hasattr(obj, slot):
                yield from _walk(getattr(obj, slot), parameters, depth - 1, seen,
                                 (path, "attr", slot))
