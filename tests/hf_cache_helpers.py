"""Shared by the OffloadedCache suites (test_hf_cache.py, test_hf_cache_ops.py,
test_hf_cache_timeslice.py): their tiny models with random weights, prompts, greedy generate,
and checks of an OffloadedCache (layers offloaded, same bytes as a DynamicCache, no leak).

Import it after ``pytest.importorskip("transformers")``: it imports transformers.
"""

from __future__ import annotations

import torch
import transformers
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import aqua_offload as aq
import hf_models
from aqua_offload.hf import cache_kwarg
from aqua_offload.hf.layers import raw_keys
from conftest import same_bytes
from hf_models import _finish

VOCAB = 384
WINDOW = 8  # sliding window of the sliding models: shorter than prompt + generation


# -- tiny models with random weights -------------------------------------------------------
# eos_token_id=None: generation never stops early, so every request makes max_new_tokens.
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=0)


def make_llama():
    """Llama with grouped-query attention (2 kv heads for 4 query heads)."""
    cfg = transformers.LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, **_COMMON)
    torch.manual_seed(0)
    return _finish(transformers.LlamaForCausalLM(cfg))


def make_gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=2,
                                  n_head=4, eos_token_id=None, bos_token_id=None,
                                  pad_token_id=0)
    torch.manual_seed(1)
    return _finish(transformers.GPT2LMHeadModel(cfg))


def make_qwen2_mixed():
    """Qwen2 with sliding-window layers around a full-attention one."""
    cfg = transformers.Qwen2Config(num_hidden_layers=3, num_key_value_heads=2,
                                   sliding_window=WINDOW, use_sliding_window=True,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention"], **_COMMON)
    torch.manual_seed(2)
    return _finish(transformers.Qwen2ForCausalLM(cfg))


def make_mistral():
    """Mistral: every layer slides."""
    cfg = transformers.MistralConfig(num_hidden_layers=2, num_key_value_heads=2,
                                     sliding_window=WINDOW, **_COMMON)
    torch.manual_seed(3)
    return _finish(transformers.MistralForCausalLM(cfg))


_FACTORIES = {"llama_gqa": make_llama, "gpt2": make_gpt2, "qwen2_sliding": make_qwen2_mixed,
              "mistral_sliding": make_mistral}
_MODELS: dict[str, torch.nn.Module] = {}


def model_of(family: str):
    if family not in _MODELS:
        _MODELS[family] = _FACTORIES[family]()
    return _MODELS[family]


def prompts(batch: int, length: int, seed: int, padded: bool = False) -> dict[str, torch.Tensor]:
    return hf_models.prompts(batch, length, seed, padded, vocab=VOCAB)


def gen(model, inputs, n, kv=None, **kw):
    """Greedy generate; ``kv``: the cache, under the keyword this transformers wants."""
    if kv is not None:
        kw[cache_kwarg()] = kv
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


def full_layers(cache) -> int:
    return sum(isinstance(layer, DynamicLayer) and not isinstance(layer, DynamicSlidingWindowLayer)
               for layer in cache.layers)


def sliding_layers(cache) -> int:
    return sum(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)


def offloaded_full(cache) -> bool:
    """Every full-attention layer of ``cache`` lives in the tiers (placeholders on meta)."""
    return all(cache.is_offloaded(i) and raw_keys(layer).device.type == "meta"
               for i, layer in enumerate(cache.layers)
               if isinstance(layer, DynamicLayer)
               and not isinstance(layer, DynamicSlidingWindowLayer))


def assert_no_leak(m: aq.OffloadManager) -> None:
    m.synchronize()
    st = m.stats()
    assert [t["used"] for t in st["tiers"]] == [0] * len(st["tiers"]), st["tiers"]
    assert st["live_handles"] == 0
    assert st["prefetched_bytes"] == 0


def small_manager(**kw) -> aq.OffloadManager:
    """A new emulation manager with 4 MiB tiers (``kw`` overrides): a plain function, not
    conftest.py's ``small_manager`` fixture (the caller closes it)."""
    kw.setdefault("peer_bytes", "4MiB")
    kw.setdefault("host_bytes", "4MiB")
    return aq.OffloadManager("cpu", **kw)


def _assert_same_cache(cache, ref_cache):
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    for (k, v, _), (rk, rv, _) in zip(list(cache), list(ref_cache)):
        assert same_bytes(k, rk) and same_bytes(v, rv)
