"""Device and backend resolution: which backend serves a torch device, which peers it lends to,
and the user's current stream."""

from __future__ import annotations

import itertools
import numbers
import operator
import re
from collections.abc import Mapping, Set
from typing import Any, Iterable, Union

import torch

from . import _core
from .errors import BackendError, InvalidArgumentError

__all__ = ["DeviceLike", "cuda_usable"]

DeviceLike = Union[str, int, torch.device]
_MAX_PEERS = 1024  # more devices than any machine has: a list this long is a mistake
_LABEL = re.compile(r"(cuda|emu)(?::([0-9]{1,9}))?", re.ASCII)


def _index(value: Any) -> int | None:
    """An integer index (an int or a numpy integer, never a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    try:
        return operator.index(value)
    except TypeError:  # an Integral that is no index (a bool-like numpy type)
        return None


def _show(value: Any) -> str:
    """``repr`` for a message, cut short (a list of a million devices, a failing repr)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - the type is enough then
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


def cuda_usable() -> bool:
    """Whether this build has the CUDA backend and torch sees a GPU."""
    return _core.cuda_compiled() and torch.cuda.is_available()


def resolve_device(device: DeviceLike | None) -> tuple[str, int, torch.device]:
    """Map a user device to ``(backend, backend device index, torch device of tensors)``.

    ``None`` picks the current CUDA device when usable, else the emulation backend on the CPU.
    ``"cpu"`` always selects emulation.
    """
    if device is None:
        if cuda_usable():
            index = torch.cuda.current_device()
            return "cuda", index, torch.device("cuda", index)
        return "emulation", 0, torch.device("cpu")
    index = _index(device)
    if index is not None:
        device = index
    elif not isinstance(device, (str, torch.device)):  # a float, a bool, bytes, a list...
        raise InvalidArgumentError(f"device must be 'cpu', 'cuda', 'cuda:N', an index or a "
                                   f"torch.device, got {_show(device)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidArgumentError(f"not a device: {_show(device)} ({reason})") from None
    if dev.type == "cpu":
        return "emulation", 0, torch.device("cpu")
    if dev.type != "cuda":
        raise InvalidArgumentError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if not _core.cuda_compiled():
        raise BackendError(
            f"{device!r} needs the CUDA backend, which this build of aqua_offload lacks "
            "(built without a CUDA toolkit or with AQUA_CUDA=OFF); use device='cpu' for emulation",
            error_name="cudaBackendNotCompiled")
    if not torch.cuda.is_available():
        raise BackendError(f"{device!r}: torch sees no CUDA device; use device='cpu' (or no "
                           "device) for the emulation backend", error_name="cudaErrorNoDevice")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise InvalidArgumentError(
            f"{device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return "cuda", index, torch.device("cuda", index)


def parse_peer(peer: DeviceLike, backend: str) -> int:
    """A peer given as an int, ``"cuda:N"``, ``"emu:N"`` or a torch device -> device index.
    On the emulation backend ``"cuda:N"`` names emulated device N, so GPU scripts run as is."""
    index = _index(peer)
    if index is not None:
        pass
    elif isinstance(peer, torch.device) and peer.type == "cuda" and peer.index is not None:
        index = peer.index
    elif isinstance(peer, str) and (m := _LABEL.fullmatch(peer.strip())) and m.group(2) is not None:
        if m.group(1) == "emu" and backend != "emulation":
            raise InvalidArgumentError(f"{_show(peer)} names an emulated device, but the backend "
                                       f"is {backend}")
        index = int(m.group(2))
    else:  # a bool, a float, bytes, a nested list, 'cuda' without an index...
        raise InvalidArgumentError(
            f"not a peer device: {_show(peer)} (expected an index, 'cuda:N' or 'emu:N')")
    count = device_count(backend)
    if not 0 <= index < count:
        raise InvalidArgumentError(f"peer {_show(peer)} does not exist ({count} {backend} "
                                   "device(s))")
    return index


def resolve_peers(peers: str | DeviceLike | Iterable[DeviceLike] | None, backend: str,
                  device: int) -> list[int]:
    """``"auto"``: every other device the compute device can reach as a peer (on emulation,
    every emulated peer). ``None``/``"none"``/``[]``: no peer tier. Otherwise the given ones,
    in order (fastest first). The compute device itself may be named: a same-device "peer",
    which exercises the peer code path on a single GPU."""
    word = peers.strip().lower() if isinstance(peers, str) else None
    if peers is None or word == "none":
        return []
    if word == "auto":
        info_ = _core.backend_info(backend)
        return [j for j in range(info_["device_count"])
                if j != device and info_["peer_access"][device][j]]
    if isinstance(peers, (str, torch.device)) or _index(peers) is not None:
        peers = [peers]
    elif isinstance(peers, (bytes, bytearray, memoryview, Mapping, Set, torch.Tensor)):
        # bytes iterate as ints; a dict or a set has no order ("fastest first"); per-peer
        # budgets go in peer_bytes
        raise InvalidArgumentError(
            f"peers must be 'auto', 'lent', None, a device or a list of devices (fastest first), "
            f"got {type(peers).__name__} {_show(peers)}")
    else:
        try:
            peers = list(itertools.islice(peers, _MAX_PEERS + 1))  # (not range(10**12) in full)
        except TypeError:  # a float, a bool (an int: not iterable either), any other object
            raise InvalidArgumentError(
                f"peers must be 'auto', 'lent', None, a device or a list of devices, got "
                f"{_show(peers)}") from None
        if len(peers) > _MAX_PEERS:
            raise InvalidArgumentError(f"peers: more than {_MAX_PEERS} devices listed")
    result = [parse_peer(p, backend) for p in peers]
    if len(set(result)) != len(result):
        raise InvalidArgumentError(f"a peer is listed twice in {_show(peers)}")
    return result


def device_count(backend: str) -> int:
    return int(_core.backend_info(backend)["device_count"])


# The raw cudaStream_t of the current stream without building a torch.cuda.Stream object (what
# torch's inductor calls on its launch path); private, hence the public fallback.
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(device: torch.device) -> int:
    """The user's current stream as a backend stream handle (0 = the host on emulation).
    ``device`` has an index (resolve_device gives one)."""
    if device.type == "cuda":
        if _raw_current_stream is not None:
            return int(_raw_current_stream(device.index))
        return int(torch.cuda.current_stream(device).cuda_stream)
    return 0


def external_stream(ptr: int, device: torch.device) -> Any:
    """A torch stream object for a raw cudaStream_t owned by the core."""
    return torch.cuda.ExternalStream(ptr, device=device)


def record_stream(memory: torch.Tensor | torch.UntypedStorage, stream: Any) -> None:
    """Tell torch's caching allocator that ``stream`` uses ``memory``: once freed, it is handed
    to new work only after what ``stream`` has enqueued so far completed."""
    if isinstance(memory, torch.UntypedStorage):
        memory = torch.empty(0, dtype=torch.uint8, device=memory.device).set_(memory)
    memory.record_stream(stream)
