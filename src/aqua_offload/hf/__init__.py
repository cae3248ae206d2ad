"""HuggingFace transformers integration (needs ``pip install "aqua_offload[hf]"``).

- :class:`OffloadedCache`: a KV cache for ``model.generate`` that keeps only the layers in use
  on the device and offloads the others through an :class:`~aqua_offload.OffloadManager`.
- :func:`generate_many`: several ``generate`` requests on one model, time-sliced per token by a
  :class:`~aqua_offload.TimeSlicer`, with time to first token and latency per request.

``import aqua_offload`` never imports transformers; ``import aqua_offload.hf`` does.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("aqua_offload.hf needs transformers: pip install \"aqua_offload[hf]\"") from e

from .cache import OffloadedCache
from .compat import cache_kwarg
from .generate import GenerateResult, generate_many, summarize

__all__ = ["OffloadedCache", "GenerateResult", "generate_many", "summarize", "cache_kwarg",
           "offloaded_cache_for"]


def offloaded_cache_for(model: object, manager: object = None, **kwargs: object) -> object:
    """An offloaded KV cache for ``model``: an :class:`OffloadedCache`, or for an encoder-decoder
    model an ``EncoderDecoderCache`` whose self-attention and cross-attention halves are both
    OffloadedCaches. ``kwargs`` go to each OffloadedCache."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        from transformers import EncoderDecoderCache

        return EncoderDecoderCache(OffloadedCache(manager, config=cfg, **kwargs),  # type: ignore[arg-type]
                                   OffloadedCache(manager, config=cfg, **kwargs))  # type: ignore[arg-type]
    return OffloadedCache(manager, config=cfg, **kwargs)  # type: ignore[arg-type]
