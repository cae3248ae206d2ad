"""What this machine offers aqua_offload: backend, devices, peer access, NVLink, pools, versions.

:func:`info` gathers it as a dict (``aq.info()``); :func:`format_info` renders it for
``aqua-offload info``.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from . import _core
from .devices import cuda_usable
from .nvml import nvlink_topology
from .sizes import format_size, parse_size

__all__ = ["info", "format_info"]


def _pci_bus_ids() -> list[str] | None:
    """PCI address of each CUDA device (torch names them), or None when torch does not say."""
    ids = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        if getattr(p, "pci_bus_id", None) is None:
            return None
        ids.append(f"{getattr(p, 'pci_domain_id', 0):08x}:{p.pci_bus_id:02x}:"
                   f"{getattr(p, 'pci_device_id', 0):02x}.0")
    return ids


def _version(package: str) -> str | None:
    """An installed package's version, without importing it (transformers is slow to import)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def info() -> dict[str, Any]:
    """Describe the backend, its devices, the peer-access matrix, NVLink and the pools.

    Returns
    -------
    dict
        ``backend`` ("cuda" or "emulation", the one ``OffloadManager()`` would pick),
        ``emulation`` (bool), ``cuda_compiled``, ``devices`` (index, label, name),
        ``peer_access`` (matrix of bools), ``nvlink`` (see :func:`aqua_offload.nvml.
        nvlink_topology`; ``available`` False with a ``reason`` where NVML cannot tell),
        ``default_pools`` (the per-peer and host pool bytes of an ``OffloadManager()`` with no
        sizes given), ``managers`` (device, per-tier capacity/used and, for ``peers="auto"``, the
        peer budgets of each live manager: ``stats()["peer_budgets"]``),
        ``versions``.
    """
    from . import __version__
    from .manager import _DEFAULT_BYTES, live_managers

    backend = "cuda" if cuda_usable() else "emulation"
    binfo = _core.backend_info(backend)
    managers = []
    for m in live_managers():
        stats = m.stats()
        managers.append({
            "device": str(m.device),
            "backend": stats["backend"],
            "tiers": [{k: t[k] for k in ("tier", "location", "capacity", "used")}
                      for t in stats["tiers"]],
            "peer_budgets": stats["peer_budgets"],
        })
    if backend == "cuda":
        bus_ids = _pci_bus_ids()
        nvlink = nvlink_topology(bus_ids) if bus_ids is not None else {
            "available": False, "reason": "this torch does not report PCI addresses"}
    else:
        nvlink = {"available": False, "reason": "no GPU (emulation backend)"}
    peer, host = _DEFAULT_BYTES[backend]
    return {
        "backend": backend,
        "emulation": binfo["emulation"],
        "cuda_compiled": _core.cuda_compiled(),
        "devices": binfo["devices"],
        "peer_access": binfo["peer_access"],
        "nvlink": nvlink,
        "default_pools": {"peer_bytes": parse_size(peer), "host_bytes": parse_size(host)},
        "managers": managers,
        "versions": {
            "aqua_offload": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "numpy": _version("numpy"),
            "transformers": _version("transformers"),
        },
    }


def _matrix(labels: list[str], cells: list[list[str]]) -> list[str]:
    width = max(len(x) for x in labels + [c for r in cells for c in r]) + 2
    lines = [" " * width + "".join(f"{x:>{width}}" for x in labels)]
    lines += [f"{labels[i]:<{width}}" + "".join(f"{c:>{width}}" for c in r)
              for i, r in enumerate(cells)]
    return ["  " + line for line in lines]


def format_info(data: dict[str, Any]) -> str:
    """``info()`` as the text ``aqua-offload info`` prints."""
    lines = [f"backend: {data['backend']}" + ("  (EMULATION: host memory, not a GPU)"
                                               if data["emulation"] else ""),
             f"CUDA backend compiled in: {'yes' if data['cuda_compiled'] else 'no'}",
             "devices:"]
    lines += [f"  {d['label']:<8} {d['name']}" for d in data["devices"]]
    labels = [d["label"] for d in data["devices"]]
    if labels:
        lines.append("peer access (row can access column):")
        lines += _matrix(labels, [["X" if i == j else "yes" if ok else "no"
                                   for j, ok in enumerate(row)]
                                  for i, row in enumerate(data["peer_access"])])
    nv = data["nvlink"]
    if nv["available"]:
        lines.append("NVLink (NV<n>: n direct links; NVSW: through NVSwitches):")
        lines += _matrix(labels, nv["matrix"])
    else:
        lines.append(f"NVLink: unknown ({nv['reason']})")
    pools = data["default_pools"]
    lines.append(f"default pools of OffloadManager(): peer {format_size(pools['peer_bytes'])} "
                 f"per peer, host {format_size(pools['host_bytes'])}")
    lines.append(f"live managers: {len(data['managers'])}")
    for m in data["managers"]:
        tiers = ", ".join(f"{t['tier']}@{t['location']} {format_size(t['used'])}/"
                          f"{format_size(t['capacity'])}" for t in m["tiers"])
        lines.append(f"  {m['device']}: {tiers or 'no tiers'}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()
                                          if v is not None))
    return "\n".join(lines)
