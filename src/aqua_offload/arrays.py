"""Arrays beyond torch: numpy, CuPy and any DLPack exporter, offloaded as snapshots.

An array becomes a flat byte tensor on the manager's device (no copy where DLPack or the buffer
protocol can share the memory; the snapshot copies it once into a tier) and comes back as an
array of the same library, dtype and shape, bitwise equal. Every dtype the library has works,
also ones torch lacks (numpy's datetime64, uint16 on an old torch...), because only bytes cross;
object arrays hold pointers, not data, and are refused. Arrays are snapshots only: their memory
is not torch's to page out in place.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidArgumentError

__all__ = ["ArraySpec", "is_array", "to_bytes", "from_bytes"]


@dataclass(frozen=True)
class ArraySpec:
    """How to rebuild the array a snapshot was taken of."""

    kind: str          # "numpy", "cupy" or "dlpack"
    dtype: Any         # the library's dtype (a torch dtype for "dlpack")
    shape: tuple[int, ...]
    namespace: Any = None  # "dlpack": the array API namespace of the original, if it had one


def is_array(obj: Any) -> bool:
    """Whether ``obj`` is an array this module converts (not a torch tensor)."""
    if isinstance(obj, torch.Tensor):
        return False
    return (hasattr(obj, "__array_interface__") or hasattr(obj, "__cuda_array_interface__")
            or hasattr(obj, "__dlpack__"))


def _is_cupy(obj: Any) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)


def to_bytes(obj: Any, device: torch.device, what: str) -> tuple[torch.Tensor, ArraySpec]:
    """A flat uint8 tensor on ``device`` with ``obj``'s bytes, and how to rebuild ``obj``."""
    if _is_cupy(obj) or (hasattr(obj, "__cuda_array_interface__")
                         and not hasattr(obj, "__array_interface__")):
        import cupy

        a = cupy.ascontiguousarray(cupy.asarray(obj))
        if a.dtype.hasobject:
            raise InvalidArgumentError(f"{what}: object arrays hold pointers, not data")
        if device.type != "cuda" or a.device.id != device.index:
            raise InvalidArgumentError(
                f"{what}: a CuPy array on cuda:{a.device.id} needs a manager of that device "
                f"(this one serves {device})")
        flat = torch.from_dlpack(a.reshape(-1).view(cupy.uint8))
        return flat, ArraySpec("cupy", a.dtype, tuple(a.shape))
    if hasattr(obj, "__array_interface__"):
        import numpy as np

        if isinstance(obj, np.ma.MaskedArray):  # asarray would drop the mask: data lost
            raise InvalidArgumentError(f"{what}: a masked array; offload its .data and .mask "
                                       "(np.ma.getmaskarray) as two arrays")
        a = np.asarray(obj)
        if a.dtype.hasobject:
            raise InvalidArgumentError(f"{what}: object arrays hold pointers, not data")
        shape = tuple(a.shape)  # ascontiguousarray makes a 0-d array 1-d
        a = np.ascontiguousarray(a)
        flat = a.reshape(-1).view(np.uint8)
        if not flat.flags.writeable:  # torch wants writable memory to share; copy instead
            flat = flat.copy()
        t = torch.from_numpy(flat)
        return (t if device.type == "cpu" else t.to(device)), ArraySpec("numpy", a.dtype, shape)
    try:
        t = torch.from_dlpack(obj)
    except Exception as exc:
        raise InvalidArgumentError(f"{what}: cannot read {type(obj).__name__} through DLPack "
                                   f"({exc})") from None
    if t.device != device:
        raise InvalidArgumentError(f"{what}: the array is on {t.device}, this manager serves "
                                   f"{device}")
    namespace = obj.__array_namespace__() if hasattr(obj, "__array_namespace__") else None
    return t, ArraySpec("dlpack", t.dtype, tuple(t.shape), namespace)


def from_bytes(t: torch.Tensor, spec: ArraySpec) -> Any:
    """The array ``spec`` describes, from the fetched tensor ``t`` (its bytes)."""
    if spec.kind == "numpy":
        return t.cpu().numpy().view(spec.dtype).reshape(spec.shape)
    if spec.kind == "cupy":
        import cupy

        return cupy.from_dlpack(t).view(spec.dtype).reshape(spec.shape)
    t = t.view(spec.dtype).reshape(spec.shape)
    return spec.namespace.from_dlpack(t) if spec.namespace is not None else t
