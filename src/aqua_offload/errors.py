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


class PagedOutError(OffloadError, RuntimeError):
    """An operation would have read or written a tensor whose storage is paged out
    (raised by :func:`aqua_offload.debug_guard`)."""


def _install() -> None:
    from . import _core

    _core._register_errors(OffloadError, OutOfMemoryError, InvalidHandleError,
                           InvalidArgumentError, BackendError)


_install()
