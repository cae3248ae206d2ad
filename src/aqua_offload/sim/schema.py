"""Strict validation of parsed scenario documents: typed getters that name the key path.

Every getter takes the value and its full key path (``gpus[1].memory``) and either returns the
converted value or raises :class:`ScenarioError` whose message starts with that path.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..errors import InvalidArgumentError
from ..sizes import parse_size

__all__ = ["ScenarioError"]


class ScenarioError(InvalidArgumentError):
    """A scenario that cannot be simulated; the message names the key path."""


_MISSING = object()


def _fail(path: str, msg: str) -> ScenarioError:
    return ScenarioError(f"{path}: {msg}" if path else msg)


def _table(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"expected a table, got {type(value).__name__}")
    return value


def _check_keys(d: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        where = f"{path}." if path else ""
        raise _fail(f"{where}{unknown[0]}", f"unknown key (allowed here: {', '.join(allowed)})")


def _get(d: dict[str, Any], key: str, path: str, conv: Callable[[Any, str], Any],
         default: Any = _MISSING) -> Any:
    full = f"{path}.{key}" if path else key
    if key not in d:
        if default is _MISSING:
            raise _fail(full, "required key is missing")
        return default
    return conv(d[key], full)


def _num(low: float = 0.0, strict: bool = False) -> Callable[[Any, str], float]:
    def conv(v: Any, path: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(path, f"expected a finite number, got {v!r}")
        if v < low or (strict and v == low):
            raise _fail(path, f"must be {'>' if strict else '>='} {low}, got {v!r}")
        return float(v)
    return conv


def _int(low: int = 0, high: int | None = None) -> Callable[[Any, str], int]:
    def conv(v: Any, path: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(path, f"expected an integer, got {v!r}")
        if v < low:
            raise _fail(path, f"must be >= {low}, got {v}")
        if high is not None and v > high:
            raise _fail(path, f"must be <= {high:,}, got {v:,} (a limit of the simulator)")
        return v
    return conv


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _fail(path, f"expected a string, got {v!r}")
    return v


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(path, f"expected true or false, got {v!r}")
    return v


def _size(v: Any, path: str) -> int:
    try:
        return parse_size(v, name=path)
    except InvalidArgumentError as exc:
        raise ScenarioError(str(exc)) from None


def _tokens(v: Any, path: str) -> int | tuple[int, int]:
    if isinstance(v, list):
        if len(v) != 2:
            raise _fail(path, f"a range is [low, high], got {v!r}")
        lo, hi = _int(1)(v[0], f"{path}[0]"), _int(1)(v[1], f"{path}[1]")
        if lo > hi:
            raise _fail(path, f"low > high in {v!r}")
        return (lo, hi)
    return _int(1)(v, path)


def _choices(options: tuple[str, ...]) -> Callable[[Any, str], tuple[str, ...]]:
    def conv(v: Any, path: str) -> tuple[str, ...]:
        if not isinstance(v, list) or not v:
            raise _fail(path, f"expected a non-empty list, got {v!r}")
        for k, x in enumerate(v):
            if x not in options:
                raise _fail(f"{path}[{k}]", f"{x!r} is not one of {', '.join(options)}")
        return tuple(dict.fromkeys(v))
    return conv
