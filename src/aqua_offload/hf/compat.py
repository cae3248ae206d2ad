"""What the installed transformers wants, found by feature detection (not version compares).

transformers 5.24 renamed ``generate(past_key_values=...)`` to ``generate(cache=...)`` (the old
name warns with a FutureWarning and goes in 6.0); 5.23 knows only ``past_key_values``. The
rename is visible in the signature of ``GenerationMixin.prepare_inputs_for_generation``, which
names the cache argument explicitly in both versions.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["cache_kwarg", "with_cache", "transformers_version"]


@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """The keyword under which ``generate`` (and the models' ``forward``) take a KV cache:
    ``"cache"`` on transformers >= 5.24, ``"past_key_values"`` before."""
    from transformers.generation.utils import GenerationMixin

    try:
        params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    except (TypeError, ValueError):  # pragma: no cover - an unreadable signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def with_cache(kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
    """``kwargs`` plus ``cache`` under the keyword the installed transformers wants."""
    return {**kwargs, cache_kwarg(): cache}


def transformers_version() -> str:
    """The installed transformers version string (for reports and benchmarks)."""
    import transformers

    return str(transformers.__version__)
