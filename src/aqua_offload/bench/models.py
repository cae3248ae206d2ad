"""Models for the HF benchmarks and examples: small Llama-style models built from a config
(random weights, no download), or a local checkpoint by name.

Presets (GQA, like current LLMs; sizes chosen so a run takes seconds):

- ``tiny``: 4 layers, hidden 128, 4 heads / 2 KV heads, vocab 512 (CPU, emulation backend).
- ``small``: 16 layers, hidden 1024, 16 heads / 4 KV heads, vocab 32000, bf16 (a GPU).
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any, Iterator

import torch

from ..errors import InvalidArgumentError

__all__ = ["PRESETS", "ModelNotFound", "build_model", "bench_device", "device_label",
           "random_prompts", "cpu_threads"]


class ModelNotFound(InvalidArgumentError):
    """A model name that is neither a preset nor a local checkpoint: the benchmark commands
    report it as a usage error, and only it (another InvalidArgumentError from inside a run is
    a bug, whose traceback must show)."""


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                  max_position_embeddings=8192),
}


def build_model(name: str | None, device: torch.device | str, *, seed: int = 0) -> Any:
    """A causal LM in eval mode on ``device``.

    Parameters
    ----------
    name : str or None
        A preset (``tiny``, ``small``), or a model name or path loaded with
        ``AutoModelForCausalLM.from_pretrained(name, local_files_only=True)``. None: ``small``
        on a GPU, ``tiny`` on CPU.
    device : torch.device or str
    seed : int
        Seeds the random weights of a preset.

    Raises
    ------
    ModelNotFound
        ``name`` is neither a preset nor a checkpoint that loads without a download.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    device = torch.device(device)
    if name is None:
        name = "small" if device.type == "cuda" else "tiny"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name in PRESETS:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**PRESETS[name], torch_dtype=dtype))
        model = model.to(device=device, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as exc:  # transformers' own words, not about our presets
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelNotFound(
                f"model {name!r} is not a preset ({', '.join(PRESETS)}) and no local checkpoint "
                f"loads by that name or path ({reason})") from None
        model = model.to(device)
    model.eval()
    # Random weights emit any token, EOS included: never stop early, so runs are comparable.
    model.generation_config.eos_token_id = None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return model


def random_prompts(model: Any, lengths: list[int], *, batch: int = 1,
                   seed: int = 0) -> list[torch.Tensor]:
    """Random token ids (never a constant prompt), one ``[batch, length]`` tensor each."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return [torch.randint(1, vocab, (batch, n), generator=g).to(model.device) for n in lengths]


def bench_device(backend: str) -> tuple[str, torch.device]:
    """``backend`` (``auto`` resolved: cuda when a GPU is usable) and the device to run on."""
    from ..devices import cuda_usable

    if backend == "auto":
        backend = "cuda" if cuda_usable() else "emulation"
    if backend == "cuda":
        return backend, torch.device("cuda", torch.cuda.current_device())
    return backend, torch.device("cpu")


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int = 1) -> Iterator[None]:
    """On CPU, run torch ops with ``n`` intra-op threads for the duration.

    Why: every thread that runs torch CPU ops gets its own OpenMP team, and idle teams spin
    after each parallel region. With one thread per request (``generate_many``) that
    oversubscribes a small machine: measured on 2 cores, 8 requests served FCFS through threads
    took 2.2x as long as the same requests run one after another in the main thread; with one
    intra-op thread both take the same time. Small models gain nothing from intra-op threads.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_label(device: torch.device) -> str:
    """The device's name as benchmark rows carry it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine() or 'cpu'} CPU x{os.cpu_count()} (emulation)"
