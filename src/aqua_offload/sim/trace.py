"""Request traces: Poisson arrivals, bursts, or a CSV file.

A trace is a list of :class:`TraceRequest` sorted by arrival (stable: equal arrival times keep
their order, which is also the order the simulator admits them in). Random traces draw from a
``random.Random(seed)`` of their own, so a scenario and a seed fix the trace exactly.

CSV format: a header with at least ``arrival_s,prompt_tokens,output_tokens`` (an optional
``model`` column names the model; an optional ``weight`` column the fair-share weight), one
request per line, ``#`` comments and blank lines ignored.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..errors import InvalidArgumentError

__all__ = ["TraceRequest", "TraceError", "TokenSpec", "burst_trace", "poisson_trace",
           "load_csv_trace", "draw_tokens"]

TokenSpec = Union[int, tuple[int, int]]  # a fixed count, or an inclusive uniform range


class TraceError(InvalidArgumentError):
    """A trace that cannot be used (the message names the file and line, or the field)."""


@dataclass(frozen=True)
class TraceRequest:
    """One request: when it arrives, how long its prompt is, how many tokens it generates."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    model: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise TraceError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise TraceError(f"prompt_tokens and output_tokens must be >= 1, got "
                             f"{self.prompt_tokens!r} and {self.output_tokens!r}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise TraceError(f"weight must be a positive finite number, got {self.weight!r}")


def draw_tokens(spec: TokenSpec, rng: random.Random) -> int:
    """A token count from a fixed ``int`` or an inclusive ``(low, high)`` range."""
    if isinstance(spec, tuple):
        return rng.randint(spec[0], spec[1])
    return spec


def _sorted(requests: list[TraceRequest]) -> list[TraceRequest]:
    return sorted(requests, key=lambda r: r.arrival_s)  # stable


def burst_trace(requests: int, prompt_tokens: TokenSpec, output_tokens: TokenSpec, *,
                at_s: float = 0.0, window_s: float = 0.0, seed: int = 0,
                model: str | None = None, weight: float = 1.0) -> list[TraceRequest]:
    """``requests`` arrivals spread uniformly at random over ``[at_s, at_s + window_s]``
    (all at ``at_s`` when the window is 0), each of fair-share ``weight``."""
    rng = random.Random(seed)
    out = []
    for _ in range(requests):
        t = at_s + (rng.uniform(0.0, window_s) if window_s > 0 else 0.0)
        out.append(TraceRequest(t, draw_tokens(prompt_tokens, rng),
                                draw_tokens(output_tokens, rng), model, weight))
    return _sorted(out)


def poisson_trace(requests: int, rate_per_s: float, prompt_tokens: TokenSpec,
                  output_tokens: TokenSpec, *, start_s: float = 0.0, seed: int = 0,
                  model: str | None = None, weight: float = 1.0) -> list[TraceRequest]:
    """``requests`` arrivals of a Poisson process of ``rate_per_s`` starting at ``start_s``,
    each of fair-share ``weight``."""
    if not rate_per_s > 0:
        raise TraceError(f"rate_per_s must be > 0, got {rate_per_s!r}")
    rng = random.Random(seed)
    out, t = [], start_s
    for _ in range(requests):
        t += rng.expovariate(rate_per_s)
        out.append(TraceRequest(t, draw_tokens(prompt_tokens, rng),
                                draw_tokens(output_tokens, rng), model, weight))
    return out


_REQUIRED = ("arrival_s", "prompt_tokens", "output_tokens")
_OPTIONAL = ("model", "weight")


def load_csv_trace(path: str | Path) -> list[TraceRequest]:
    """Read a CSV trace (module docstring). Raises :class:`TraceError` with the file and line
    for a missing file, a missing or unknown column, or a value that is not a valid number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise TraceError(f"{path}: empty trace (expected a header {','.join(_REQUIRED)})")
    rows = list(csv.reader([line for _, line in lines]))
    header = [h.strip() for h in rows[0]]
    missing = [h for h in _REQUIRED if h not in header]
    unknown = [h for h in header if h not in _REQUIRED + _OPTIONAL]
    if missing or unknown:
        raise TraceError(f"{path}:{lines[0][0]}: bad header {header}: "
                         + (f"missing {missing}" if missing else f"unknown columns {unknown}")
                         + f" (columns: {', '.join(_REQUIRED + _OPTIONAL)})")
    out = []
    for (lineno, _), row in zip(lines[1:], rows[1:]):
        if len(row) != len(header):
            raise TraceError(f"{path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        rec = dict(zip(header, (v.strip() for v in row)))
        try:
            arrival = _number(rec["arrival_s"], float, "arrival_s")
            prompt = _number(rec["prompt_tokens"], int, "prompt_tokens")
            output = _number(rec["output_tokens"], int, "output_tokens")
            weight = _number(rec.get("weight") or "1", float, "weight")
            out.append(TraceRequest(arrival, prompt, output, rec.get("model") or None, weight))
        except TraceError as exc:
            raise TraceError(f"{path}:{lineno}: {exc}") from None
    if not out:
        raise TraceError(f"{path}: the trace has a header but no requests")
    return _sorted(out)


def _number(text: str, kind: type, name: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise TraceError(f"{name}: {text!r} is not {'an integer' if kind is int else 'a number'}"
                         ) from None
    return value

