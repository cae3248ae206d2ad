"""Byte sizes given as integers or strings such as ``"8GiB"``, ``"512 MB"`` or ``"1.5GiB"``."""

from __future__ import annotations

import re
from decimal import Decimal, localcontext

from .errors import InvalidArgumentError

__all__ = ["parse_size", "format_size", "MAX_SIZE"]

# The largest size accepted: torch and Python (Py_ssize_t) count bytes in signed 64 bits, and no
# machine's address space comes near it. The core takes sizes as std::size_t and rounds them up
# to pages and blocks: a value near 2**64 would wrap around there (to a tiny allocation that is
# then written in full), so it must never get that far.
MAX_SIZE = (1 << 63) - 1

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
# ASCII digits only (``\d`` would take any script's digits); at most 64 of them, so that an
# absurd string is refused before any arithmetic on it.
_PATTERN = re.compile(r"\s*([0-9]{1,64}(?:\.[0-9]{0,64})?|\.[0-9]{1,64})\s*([a-zA-Z]{0,3})\s*",
                      re.ASCII)


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
        For negative numbers, sizes over :data:`MAX_SIZE` (2**63 - 1), unknown units,
        fractions of a byte, or other types (floats and bools included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgumentError(f"{name} must be an int or a string like '8GiB', got "
                                   f"{_short(value)}")
    if isinstance(value, int):
        n = int.__int__(value)  # the plain value of an int subclass (its methods may differ)
        if n < 0:
            raise InvalidArgumentError(f"{name} must not be negative, got {_short(n)}")
        _check_max(n, value, name)
        return n
    match = _PATTERN.fullmatch(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidArgumentError(
            f"{name}: cannot parse {_short(value)} as a size (examples: 4096, '512MiB', '8GiB', "
            "'1.5GB')")
    number, unit = match.groups()
    with localcontext() as ctx:
        ctx.prec = 200  # exact: 128 digits at most times a 13-digit unit (the default rounds at 28)
        scaled = Decimal(number) * _UNITS[unit.lower()]
        whole = scaled == scaled.to_integral_value()
    if not whole:
        raise InvalidArgumentError(f"{name}: {_short(value)} is not a whole number of bytes")
    n = int(scaled)
    _check_max(n, value, name)
    return n


def _check_max(n: int, value: int | str, name: str) -> None:
    if n > MAX_SIZE:
        raise InvalidArgumentError(f"{name}: {_short(value)} is too large (at most {MAX_SIZE} "
                                   f"bytes, {format_size(MAX_SIZE)})")


def _short(value: object) -> str:
    """``repr`` for a message, cut short (a size may be a huge int or a long string)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails; the type is enough
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else f"{text[:60]}...({len(text)} chars)"


def format_size(nbytes: int) -> str:
    """Format a byte count with binary units, e.g. ``format_size(3 << 29) == '1.50 GiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
