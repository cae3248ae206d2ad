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
from .generate import GenerateResult, generate_many, summarize

__all__ = ["OffloadedCache", "GenerateResult", "generate_many", "summarize"]
