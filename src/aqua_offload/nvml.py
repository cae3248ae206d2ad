"""NVLink topology from NVML, read through ctypes (no Python package needed; absent = unknown).

The CUDA runtime says whether two GPUs can access each other (the peer-access matrix), not over
what: PCIe peer-to-peer and NVLink both say yes. NVML tells the links: for each active NVLink of
a GPU, the PCI address of what is at the other end, another GPU (a direct link) or an NVSwitch
(HGX servers: every GPU reaches every other through the switches). GPUs are matched to CUDA
devices by PCI address, since NVML numbers them in its own order.
"""

from __future__ import annotations

import ctypes
from typing import Any, Sequence

__all__ = ["nvlink_topology"]

MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS (Hopper: 18 links)
_REMOTE_SWITCH = 2  # nvmlIntNvLinkDeviceType_t: NVML_NVLINK_DEVICE_TYPE_SWITCH


class _PciInfo(ctypes.Structure):  # nvmlPciInfo_t
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint),
                ("bus", ctypes.c_uint), ("device", ctypes.c_uint),
                ("pciDeviceId", ctypes.c_uint), ("pciSubSystemId", ctypes.c_uint),
                ("busId", ctypes.c_char * 32)]


def _normalize(bus_id: str) -> str:
    """``"00000000:19:00.0"``, ``"0000:19:00.0"`` and ``"19:00.0"`` name the same device."""
    parts = bus_id.strip().lower().split(":")
    domain, bus, devfn = (["0"] + parts) if len(parts) == 2 else parts
    return f"{int(domain, 16):08x}:{int(bus, 16):02x}:{devfn}"


def _unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def nvlink_topology(bus_ids: Sequence[str], lib: Any = None) -> dict[str, Any]:
    """The NVLink links between the GPUs at ``bus_ids`` (PCI addresses, in CUDA order).

    Parameters
    ----------
    bus_ids : sequence of str
        PCI address of each CUDA device, ``"0000:19:00.0"``.
    lib : optional
        The NVML library (tests pass a fake); default: ``libnvidia-ml.so.1``.

    Returns
    -------
    dict
        ``{"available": False, "reason": str}`` when NVML cannot tell, else
        ``{"available": True, "links": [[int]], "switch_links": [int], "matrix": [[str]]}``:
        direct links between GPU i and j, links of each GPU to NVSwitches, and an
        ``nvidia-smi topo``-style label per pair (``"NV4"``, ``"NVSW"`` or ``"-"``).
    """
    if not bus_ids:
        return _unavailable("no CUDA devices")
    if lib is None:
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return _unavailable("NVML (libnvidia-ml.so.1) not found")
    try:
        own = [_normalize(b) for b in bus_ids]
    except ValueError:
        return _unavailable(f"unreadable PCI address in {list(bus_ids)}")
    try:
        if lib.nvmlInit_v2() != 0:
            return _unavailable("nvmlInit failed")
    except AttributeError:
        return _unavailable("this NVML has no nvmlInit_v2")
    try:
        return _topology(lib, own)
    except AttributeError as exc:  # an NVML too old for a function we call
        return _unavailable(f"this NVML lacks a function: {exc}")
    finally:
        lib.nvmlShutdown()


def _is_switch(lib: Any, handle: ctypes.c_void_p, link: int) -> bool:
    """Whether the far end of ``link`` is an NVSwitch. Older NVMLs cannot say: then anything
    that is not one of our GPUs counts as a switch."""
    get = getattr(lib, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
    if get is None:
        return True
    kind = ctypes.c_uint(0)
    if get(handle, link, ctypes.byref(kind)) != 0:
        return True
    return kind.value == _REMOTE_SWITCH


def _topology(lib: Any, own: list[str]) -> dict[str, Any]:
    n = len(own)
    links = [[0] * n for _ in range(n)]
    switch = [0] * n
    for i, bus in enumerate(own):
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByPciBusId_v2(bus.encode(), ctypes.byref(handle)) != 0:
            return _unavailable(f"NVML has no device at PCI {bus}")
        for link in range(MAX_LINKS):
            active = ctypes.c_uint(0)
            if lib.nvmlDeviceGetNvLinkState(handle, link, ctypes.byref(active)) != 0 \
                    or not active.value:
                continue  # no such link, or down
            remote = _PciInfo()
            if lib.nvmlDeviceGetNvLinkRemotePciInfo_v2(handle, link, ctypes.byref(remote)) != 0:
                continue
            try:
                peer = _normalize(remote.busId.decode(errors="replace"))
            except ValueError:
                peer = ""
            if peer in own:
                links[i][own.index(peer)] += 1
            elif _is_switch(lib, handle, link):  # else: a GPU hidden by CUDA_VISIBLE_DEVICES
                switch[i] += 1
    matrix = [["X" if i == j else f"NV{links[i][j]}" if links[i][j]
               else "NVSW" if switch[i] and switch[j] else "-" for j in range(n)]
              for i in range(n)]
    return {"available": True, "links": links, "switch_links": switch, "matrix": matrix}
