"""Exception hierarchy of aqua_offload.

Every error the library raises derives from :class:`OffloadError`. The C++ core raises the same
classes: this module hands them to the extension at import (``_core._register_errors``), so a
failure deep in the core surfaces as the type documented here. All of them pickle, extra
attributes included.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "OffloadError",
    "OutOfMemoryError",
    "InvalidHandleError",
    "InvalidArgumentError",
    "BackendError",
    "PagedOutError",
    "ClosedError",
    "LedgerError",
    "LedgerVersionError",
    "ReclaimError",
    "ReclaimTimeoutError",
    "RemoteError",
    "RemoteConnectError",
    "RemoteLostError",
    "RemoteAuthError",
    "RemoteProtocolError",
    "RemoteVersionError",
]


class OffloadError(Exception):
    """Base class of every aqua_offload error."""

    def __init__(self, message: str = "", **attrs: Any) -> None:
        super().__init__(message)
        self._attrs = dict(attrs)
        for key, value in attrs.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's default reduce drops keyword arguments; keep them.
        return (_rebuild, (type(self), self.args, self._attrs))


def _rebuild(cls: type[OffloadError], args: tuple[Any, ...], attrs: dict[str, Any]) -> OffloadError:
    return cls(*args, **attrs)


class OutOfMemoryError(OffloadError, MemoryError):
    """No tier can hold the request. ``requested`` is the size in bytes; the message names
    every tier's free and largest free block. The tensor being offloaded is untouched."""

    requested: int

    def __init__(self, message: str = "", requested: int = 0, **attrs: Any) -> None:
        super().__init__(message, requested=requested, **attrs)


class InvalidHandleError(OffloadError, KeyError):
    """A handle that was already fetched or freed, belongs to another manager, or is busy in
    another thread's call."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(OffloadError, ValueError):
    """An argument that cannot be accepted: a tensor on the wrong device, a storage already
    paged out, a malformed size, an unknown device or policy. Nothing was changed."""


class BackendError(OffloadError, RuntimeError):
    """The device runtime failed. ``error_name`` is the runtime's name for the error
    (e.g. ``"cudaErrorInvalidValue"``); the message gives the call and the source location."""

    error_name: str

    def __init__(self, message: str = "", error_name: str = "", **attrs: Any) -> None:
        super().__init__(message, error_name=error_name, **attrs)


class ClosedError(OffloadError, RuntimeError):
    """The manager was closed (or belongs to the parent of this forked process): it takes no
    new work, and its leftover handles are ``"closed"``."""


class PagedOutError(OffloadError, RuntimeError):
    """An operation would have read or written a tensor whose storage is paged out
    (raised by :func:`aqua_offload.debug_guard`)."""


class LedgerError(OffloadError):
    """The cross-process lending ledger (:mod:`aqua_offload.lending`) cannot be used: a foreign
    or corrupt file, a lock that cannot be taken, an entry of this process that vanished.
    ``path`` names the file, ``reason`` says what is wrong. The file is left as it was: other
    processes' offers and leases are never reset behind their back."""

    path: str
    reason: str

    def __init__(self, message: str = "", path: str = "", reason: str = "", **attrs: Any) -> None:
        super().__init__(message, path=path, reason=reason, **attrs)


class LedgerVersionError(LedgerError):
    """The ledger was written by a newer aqua_offload (format ``version`` > ``supported``)."""


class ReclaimError(OffloadError, RuntimeError):
    """A consumer could not give lent memory back (e.g. the lower tiers are full): nothing was
    lost, the reclaim stays pending and the consumer retries."""


class ReclaimTimeoutError(OffloadError, TimeoutError):
    """A reclaim did not complete in time. ``pending`` bytes are still held by consumers; the
    reclaim stays in force (``Offer.wait`` waits for the rest)."""

    pending: int

    def __init__(self, message: str = "", pending: int = 0, **attrs: Any) -> None:
        super().__init__(message, pending=pending, **attrs)


class RemoteError(OffloadError, RuntimeError):
    """A remote lender (:mod:`aqua_offload.remote`) could not be used. ``address`` names the
    lender (``"host:port"``) where one is known."""

    address: str

    def __init__(self, message: str = "", address: str = "", **attrs: Any) -> None:
        super().__init__(message, address=address, **attrs)


class RemoteConnectError(RemoteError, ConnectionError):
    """No lender answers at the address (refused, unreachable, unknown host, no handshake
    within the deadline). Nothing was changed."""


class RemoteLostError(RemoteError, ConnectionError):
    """The lender died or stopped answering within the deadline. Every block it held for this
    borrower is lost; ``reason`` says what was seen."""

    reason: str

    def __init__(self, message: str = "", address: str = "", reason: str = "",
                 **attrs: Any) -> None:
        super().__init__(message, address=address, reason=reason, **attrs)


class RemoteAuthError(RemoteError, PermissionError):
    """The lender and the borrower do not share the same token (either side may refuse)."""


class RemoteProtocolError(RemoteError):
    """A message that breaks the remote protocol: bad framing, a length over the limit, an
    unknown kind, a field of the wrong type or range."""


class RemoteVersionError(RemoteProtocolError):
    """The peer speaks another version of the remote protocol (``version``; this side speaks
    ``supported``)."""

    version: int
    supported: int

    def __init__(self, message: str = "", address: str = "", version: int = 0,
                 supported: int = 0, **attrs: Any) -> None:
        super().__init__(message, address=address, version=version, supported=supported,
                         **attrs)


def _install() -> None:
    from . import _core

    _core._register_errors(OffloadError, OutOfMemoryError, InvalidHandleError,
                           InvalidArgumentError, BackendError)


_install()
