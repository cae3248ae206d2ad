"""Per-request arguments of generate_many: merging, caches and seeds, all checked before any
request starts.

Note [Request arguments]
A request is ``input_ids`` or a mapping of ``generate`` arguments; ``generate_many``'s own
``**generate_kwargs`` apply to every request. A key given in both is merged, never passed twice
(a "got multiple values" TypeError inside a thread): ``stopping_criteria`` and
``logits_processor`` are concatenated (the shared ones first), any other key takes the request's
value. The cache: a request may carry its own (``cache=`` or ``past_key_values=``, e.g. the
cache of a previous turn), which must not be shared with another request (both would write
into it: wrong tokens); the others get one from ``cache_factory``. A cache instance among the
shared ``generate_kwargs`` would be shared by every request: refused.

Note [Seeds]
Requests run in threads that share torch's global random generators, so a sampled request's
tokens would depend on the interleaving. A seeded request seeds the generators when its slice
first holds the turn (as ``torch.manual_seed(seed)`` before a solo ``generate``), saves their
state at every yield point before giving the turn away, and restores it when it has the turn
again. Only the slice holding the turn runs model code (TimeSlicer, Note [Turns]), so between
its yield points nothing else draws from the generators: the request draws exactly the numbers
it would draw alone.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import InvalidArgumentError

__all__ = ["prepare_requests", "resolve_factory", "request_caches", "split_cache", "RngState",
           "check_seeds"]

_CACHE_KEYS = ("cache", "past_key_values")
_LISTS = ("stopping_criteria", "logits_processor")


def _is_cache(obj: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(obj, Cache)


def split_cache(kwargs: dict[str, Any], where: str) -> tuple[dict[str, Any], Any]:
    """``kwargs`` without its cache keys, and the cache it carried (None if none)."""
    given = [k for k in _CACHE_KEYS if kwargs.get(k) is not None]
    if len(given) > 1:
        raise InvalidArgumentError(f"generate_many: {where} passes both cache= and "
                                   "past_key_values=; pass one")
    cache = kwargs[given[0]] if given else None
    return {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}, cache


def resolve_factory(model: Any, cache_factory: Any, shared_cache: Any,
                    manager: Any) -> Callable[[], Any]:
    """The function making each request's cache (Note [Request arguments]).

    ``cache_factory`` is a Cache class (built for the model, on ``manager`` for an
    OffloadedCache; both halves for an encoder-decoder model) or a callable returning a new
    cache per call; ``shared_cache`` is what ``generate_kwargs`` carried under ``cache=`` or
    ``past_key_values=``: a factory there is the old spelling (accepted with a FutureWarning),
    an instance is refused.
    """
    if shared_cache is not None:
        if _is_cache(shared_cache) or not callable(shared_cache):
            raise InvalidArgumentError(
                "generate_many: a cache instance passed for all requests would be shared by "
                "them (each would write into the others' cache: wrong tokens). Pass "
                "cache_factory=<a Cache class or a function making one cache per request>, "
                "or give a request its own cache in its mapping")
        if cache_factory is not None:
            raise InvalidArgumentError("generate_many: pass cache_factory= only (cache= is "
                                       "transformers' argument for one cache instance)")
        warnings.warn("generate_many(cache=<factory>) is renamed cache_factory=", FutureWarning,
                      stacklevel=3)
        cache_factory = shared_cache
    if cache_factory is None:
        return lambda: _build(model, _dynamic_cache_class(), manager)
    if _is_cache(cache_factory):
        raise InvalidArgumentError(
            "generate_many: cache_factory must make a new cache per request (a Cache class or "
            "a function), not be a cache: one instance would be shared by every request")
    if isinstance(cache_factory, type):
        from transformers.cache_utils import Cache

        if not issubclass(cache_factory, Cache):
            raise InvalidArgumentError(f"generate_many: cache_factory class "
                                       f"{cache_factory.__name__} is not a transformers Cache")
        cls = cache_factory
        return lambda: _build(model, cls, manager)
    if not callable(cache_factory):
        raise InvalidArgumentError(f"generate_many: cache_factory must be a Cache class or a "
                                   f"callable, got {type(cache_factory).__name__}")
    return cache_factory


def _dynamic_cache_class() -> type:
    from transformers import DynamicCache

    return DynamicCache


def _build(model: Any, cls: type, manager: Any) -> Any:
    """A cache of class ``cls`` for ``model``: an EncoderDecoderCache of two for an
    encoder-decoder model; an OffloadedCache on ``manager``."""
    from transformers import EncoderDecoderCache

    from .cache import OffloadedCache

    def one() -> Any:
        if issubclass(cls, OffloadedCache):
            return cls(manager, config=model.config)
        return cls(config=model.config)

    if issubclass(cls, EncoderDecoderCache):
        inner = _dynamic_cache_class()
        return cls(inner(config=model.config), inner(config=model.config))
    if getattr(model.config, "is_encoder_decoder", False):
        return EncoderDecoderCache(one(), one())
    return one()


def request_caches(cache: Any) -> list[Any]:
    """The cache objects a request writes to (both halves of an EncoderDecoderCache)."""
    out = [cache]
    for name in ("self_attention_cache", "cross_attention_cache"):
        inner = getattr(cache, name, None)
        if inner is not None:
            out.append(inner)
    return out


def prepare_requests(requests: Sequence[dict[str, Any]],
                     generate_kwargs: Mapping[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """Per request: its merged ``generate`` arguments (without a cache) and its own cache (or
    None). Refuses a cache shared by two requests (Note [Request arguments])."""
    seen: dict[int, int] = {}
    out = []
    for i, req in enumerate(requests):
        req, cache = split_cache(req, f"request {i}")
        if cache is not None:
            if not _is_cache(cache):
                raise InvalidArgumentError(f"generate_many: request {i}'s cache must be a "
                                           f"transformers Cache, got {type(cache).__name__}")
            for c in request_caches(cache):
                if id(c) in seen:
                    raise InvalidArgumentError(
                        f"generate_many: requests {seen[id(c)]} and {i} share a cache; both "
                        "would write into it (wrong tokens). Give each request its own cache")
                seen[id(c)] = i
        merged = dict(generate_kwargs)
        for key, value in req.items():
            if key in _LISTS and merged.get(key) is not None and value is not None:
                merged[key] = _list_class(key)([*merged[key], *value])
            else:
                merged[key] = value
        out.append((merged, cache))
    return out


def _list_class(key: str) -> type:
    from transformers import LogitsProcessorList, StoppingCriteriaList

    return StoppingCriteriaList if key == "stopping_criteria" else LogitsProcessorList


class RngState:
    """The random generators a request draws from, kept across its yield points
    (Note [Seeds])."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        self.device = device
        self._state: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def start(self) -> None:
        """Seed the generators (the request holds the turn)."""
        torch.manual_seed(self.seed)

    def save(self) -> None:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self._state = (torch.get_rng_state(), cuda)

    def restore(self) -> None:
        if self._state is None:
            return
        cpu, cuda = self._state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)


def check_seeds(seeds: Sequence[int | None] | None, n: int) -> list[int | None]:
    """One ``int`` (or None: unseeded) per request."""
    if seeds is None:
        return [None] * n
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) != n:
        raise InvalidArgumentError("generate_many: seeds needs one int (or None) per input")
    out: list[int | None] = []
    for s in seeds:
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)
                              or not 0 <= s < 2 ** 64):
            raise InvalidArgumentError(f"generate_many: bad seed {s!r} (an int in "
                                       "[0, 2**64) or None)")
        out.append(s)
    return out
