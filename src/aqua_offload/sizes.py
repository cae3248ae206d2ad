"""Byte sizes given as integers or strings such as ``"8GiB"``, ``"512 MB"`` or ``"1.5GiB"``."""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import InvalidArgumentError

__all__ = ["parse_size", "format_size"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Return ``value`` as a number of bytes.

    Parameters
    ----------
    value : int or str
        A non-negative integer, or a number with an optional unit: ``B``, decimal ``KB MB GB TB``
        or binary ``KiB MiB GiB TiB`` (case-insensitive).
    name : str
        What the size is for, used in error messages.

    Raises
    ------
    InvalidArgumentError
        For negative numbers, unknown units, fractions of a byte, or other types.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgumentError(f"{name} must be an int or a string like '8GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"{name} must not be negative, got {value}")
        return value
    match = _PATTERN.match(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidArgumentError(
            f"{name}: cannot parse {value!r} as a size (examples: 4096, '512MiB', '8GiB', '1.5GB')")
    number, unit = match.groups()
    scaled = Decimal(number) * _UNITS[unit.lower()]
    if scaled != int(scaled):
        raise InvalidArgumentError(f"{name}: {value!r} is not a whole number of bytes")
    return int(scaled)


def format_size(nbytes: int) -> str:
    """Format a byte count with binary units, e.g. ``format_size(3 << 29) == '1.50 GiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
