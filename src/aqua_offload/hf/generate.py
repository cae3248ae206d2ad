"""generate_many: several HF ``generate`` requests on one model, time-sliced per token.

Each request runs ``model.generate`` in its own thread inside ``slicer.slice(state=cache)``;
a stopping criterion (called once per generated token, after the token exists) is the yield
point: it records the first token's time and calls ``checkpoint()``, where the slicer may
park the request and page its KV cache out. Only the slice holding the turn runs model code
(TimeSlicer, Note [Turns]), so the threads never run the shared model concurrently.
Per-request arguments, caches and seeds: hf/requests.py.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import InvalidArgumentError
from ..timeslice import Slice, TimeSlicer
from .compat import cache_kwarg
from .requests import (RngState, check_seeds, prepare_requests, request_caches,
                       resolve_factory, split_cache)

__all__ = ["GenerateResult", "generate_many", "summarize"]


@dataclass
class GenerateResult:
    """One request's outcome.

    Attributes
    ----------
    sequences : torch.Tensor
        What ``generate`` returned (its ``.sequences`` when it returned a ModelOutput).
    ttft_s : float
        Time to first token, from the request's arrival.
    latency_s : float
        From arrival to the end of its generate call.
    preemptions : int
        Times the slicer parked the request for another.
    new_tokens : int
        Tokens generated (per sequence of the batch).
    arrival_s : float
        Arrival offset from the start of ``generate_many``.
    bytes_paged_out, bytes_paged_in : int
        KV cache traffic caused by preemptions.
    output : Any
        The raw return value of ``generate``.
    """

    name: str
    sequences: torch.Tensor
    ttft_s: float
    latency_s: float
    preemptions: int
    new_tokens: int
    arrival_s: float
    bytes_paged_out: int = 0
    bytes_paged_in: int = 0
    output: Any = field(default=None, repr=False)


class _YieldPoint(StoppingCriteria):
    """Never stops generation: records the first token's time and yields the turn."""

    def __init__(self, slice_: Slice, clock: Callable[[], float],
                 rng: RngState | None = None) -> None:
        self.slice = slice_
        self.clock = clock
        self.rng = rng
        self.first_token: float | None = None
        self.calls = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.calls += 1
        if self.first_token is None:
            self.first_token = self.clock()
        if self.rng is not None:  # Note [Seeds] (hf/requests.py)
            self.rng.save()
        self.slice.checkpoint()
        if self.rng is not None:
            self.rng.restore()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_many(model: Any, inputs: Sequence[torch.Tensor | Mapping[str, Any]], *,
                  slicer: TimeSlicer | None = None, arrivals: Sequence[float] | None = None,
                  names: Sequence[str] | None = None, weights: Sequence[float] | None = None,
                  cache_factory: Any = None, seeds: Sequence[int | None] | None = None,
                  **generate_kwargs: Any) -> list[GenerateResult]:
    """Run several ``model.generate`` requests concurrently, time-sliced per token.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Shared by every request.
    inputs : sequence of tensors or mappings
        Per request: ``input_ids`` (a tensor), or the keyword arguments of ``generate``
        for it (e.g. a tokenizer's output: ``input_ids``, ``attention_mask``). A mapping may
        carry the request's own cache (``cache=`` or ``past_key_values=``, e.g. a previous
        turn's), not shared with another request; it is left open. Its other keys are merged
        with ``generate_kwargs`` (hf/requests.py, Note [Request arguments]).
    slicer : TimeSlicer, optional
        Schedules the requests (``policy="fcfs"`` runs each to completion in arrival order).
        Default: a ``fair`` slicer with a 20 ms quantum on the default manager of the model's
        device, closed on return.
    arrivals : sequence of float, optional
        Per request, seconds after the call at which it arrives (a burst: all 0, the default).
    names, weights : sequences, optional
        Slice names and ``fair`` weights per request.
    cache_factory : Cache class or callable, optional
        Makes each request's KV cache: a Cache class (``OffloadedCache`` is built on the
        slicer's manager; an encoder-decoder model gets an ``EncoderDecoderCache`` of two), or
        a function returning a new cache per call (e.g. ``lambda:
        OffloadedCache(manager, config=model.config)``). Default: ``DynamicCache``. The
        cache is the slice's state: its tensors are paged out when the request is preempted.
        Caches made here are closed when their request ends. A cache instance is refused (it
        would be shared by every request).
    seeds : sequence of int or None, optional
        Per request, a seed for sampling: the request gets the tokens of
        ``torch.manual_seed(seed); model.generate(...)`` run alone, whatever the interleaving
        (hf/requests.py, Note [Seeds]). None: unseeded (the global generators, shared).
    **generate_kwargs
        Passed to every ``generate`` call (``max_new_tokens``, ``do_sample``, ...).

    Returns
    -------
    list of GenerateResult
        In the order of ``inputs``. If a request raised, the first error is raised once every
        request has ended.

    Raises
    ------
    InvalidArgumentError
        Before any request starts: bad per-request sequences, inputs, slicer, seeds, a cache
        instance for all requests, or a cache shared by two requests.
    """
    n = len(inputs)
    arrivals = _per_request(arrivals, n, 0.0, "arrivals", lambda a: a >= 0)
    weights = _per_request(weights, n, 1.0, "weights", lambda w: w > 0)
    seeds = check_seeds(seeds, n)
    if names is None:
        names = [f"req-{i}" for i in range(n)]
    elif isinstance(names, str) or len(names) != n:
        raise InvalidArgumentError("generate_many: names needs one string per input")
    names = [str(x) for x in names]
    if slicer is not None and not isinstance(slicer, TimeSlicer):
        raise InvalidArgumentError(f"slicer must be a TimeSlicer, got {slicer!r}")
    shared, shared_cache = split_cache(dict(generate_kwargs), "generate_kwargs")
    make_cache = resolve_factory(model, cache_factory, shared_cache,
                                 slicer.manager if slicer is not None else None)
    requests = prepare_requests([_as_kwargs(x) for x in inputs], shared)
    own = slicer is None
    if own:
        from ..defaults import default_manager
        slicer = TimeSlicer(quantum_ms=20.0, manager=default_manager(model.device))
    clock = time.monotonic
    start = clock()
    results: list[GenerateResult | None] = [None] * n
    errors: list[BaseException] = []
    live: dict[int, int] = {}  # id of each live cache -> its request (made caches included)
    live_lock = threading.Lock()

    def claim(i: int, kv: Any) -> None:
        """A factory returning one cache twice would share it: refuse (Note [Request
        arguments])."""
        with live_lock:
            parts = request_caches(kv)
            for c in parts:
                if id(c) in live:
                    raise InvalidArgumentError(
                        f"generate_many: cache_factory returned, for request {i}, a cache that "
                        f"request {live[id(c)]} uses; it must make a new cache per call")
            for c in parts:
                live[id(c)] = i

    made_caches: list[Any] = []  # claimed until the call returns (and their ids not reused):
    # a factory handing out one cache twice is refused even after the first request finished

    for i, (_, kv) in enumerate(requests):
        if kv is not None:
            claim(i, kv)

    def run(i: int) -> None:
        kwargs, kv = requests[i]
        made = kv is None
        try:
            delay = start + arrivals[i] - clock()
            if delay > 0:
                time.sleep(delay)
            arrived = clock()
            if made:
                kv = make_cache()
                claim(i, kv)
                made_caches.append(kv)
            rng = RngState(seeds[i], model.device) if seeds[i] is not None else None
            try:
                with slicer.slice(state=kv, name=names[i], weight=weights[i]) as s:
                    if rng is not None:
                        rng.start()  # holding the turn (Note [Seeds])
                    point = _YieldPoint(s, clock, rng)
                    criteria = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []),
                                                     point])
                    call = {**kwargs, "stopping_criteria": criteria, cache_kwarg(): kv}
                    out = model.generate(**call)
            finally:  # a made OffloadedCache gives its tier memory back, also on failure
                if made and kv is not None:
                    for c in request_caches(kv):
                        close = getattr(c, "close", None)
                        if callable(close):
                            close()
            done = clock()
            seqs = getattr(out, "sequences", out)
            results[i] = GenerateResult(
                name=names[i], sequences=seqs,
                ttft_s=(point.first_token if point.first_token is not None else done) - arrived,
                latency_s=done - arrived, preemptions=s.preemptions,
                new_tokens=_new_tokens(seqs, kwargs, point.calls,
                                       bool(getattr(model.config, "is_encoder_decoder", False))),
                arrival_s=arrived - start, bytes_paged_out=s.bytes_paged_out,
                bytes_paged_in=s.bytes_paged_in, output=out)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), name=f"aqua-generate-{names[i]}")
               for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        if own:
            slicer.close()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def summarize(results: Sequence[GenerateResult]) -> dict[str, float]:
    """TTFT percentiles (nearest rank), throughput over the makespan, and paging traffic."""
    if not results:
        raise InvalidArgumentError("summarize: no results")
    ttft = sorted(r.ttft_s for r in results)
    first = min(r.arrival_s for r in results)
    makespan = max(r.arrival_s + r.latency_s for r in results) - first
    tokens = sum(r.new_tokens * int(r.sequences.shape[0]) for r in results)
    return {"requests": len(results), "ttft_p50_s": _percentile(ttft, 50),
            "ttft_p99_s": _percentile(ttft, 99), "makespan_s": makespan,
            "throughput_tok_s": tokens / makespan if makespan > 0 else float("inf"),
            "tokens": tokens, "preemptions": sum(r.preemptions for r in results),
            "bytes_paged": sum(r.bytes_paged_out + r.bytes_paged_in for r in results)}


def _percentile(sorted_values: list[float], q: float) -> float:
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _new_tokens(seqs: Any, request: dict[str, Any], calls: int,
                encoder_decoder: bool = False) -> int:
    if encoder_decoder:  # the sequences are the decoder's: its start token(s), then new ones
        start = request.get("decoder_input_ids")
        prefix = int(start.shape[-1]) if isinstance(start, torch.Tensor) else 1
        if isinstance(seqs, torch.Tensor) and seqs.dim() == 2:
            return int(seqs.shape[-1] - prefix)
        return calls
    ids = request.get("input_ids")
    if isinstance(seqs, torch.Tensor) and isinstance(ids, torch.Tensor) and seqs.dim() == 2:
        return int(seqs.shape[-1] - ids.shape[-1])
    return calls  # one stopping-criteria call per generated token


def _per_request(values: Sequence[float] | None, n: int, default: float, what: str,
                 valid: Callable[[float], bool]) -> list[float]:
    if values is None:
        return [default] * n
    if isinstance(values, (str, bytes)) or len(values) != n:
        raise InvalidArgumentError(f"generate_many: {what} needs one number per input")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not (math.isfinite(v) and valid(float(v))):
            raise InvalidArgumentError(f"generate_many: bad {what} entry {v!r} (finite, "
                                       f"{'>= 0' if what == 'arrivals' else '> 0'})")
        out.append(float(v))
    return out


def _as_kwargs(x: Any) -> dict[str, Any]:
    if isinstance(x, torch.Tensor):
        return {"input_ids": x if x.dim() == 2 else x.unsqueeze(0)}
    if isinstance(x, Mapping):
        return dict(x)
    raise InvalidArgumentError(f"generate_many: an input must be a tensor of input_ids or a "
                               f"mapping of generate arguments, got {type(x).__name__}")
