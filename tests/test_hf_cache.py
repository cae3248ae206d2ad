"""OffloadedCache (aqua_offload.hf): a transformers DynamicCache whose full-attention layers live
offloaded between their uses. The acceptance criterion is correctness: greedy decoding gives
token-for-token the tokens of the default cache, whatever the model family, batch, tier sizes
or cache operations; and the cache gives every byte back to the tiers when it is done."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from aqua_offload.hf import OffloadedCache, cache_kwarg, generate_many  # noqa: E402
from aqua_offload.hf.layers import raw_keys, raw_values  # noqa: E402
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402

from conftest import run_with_timeout, same_bytes  # noqa: E402
import hf_models  # noqa: E402

VOCAB = 384
WINDOW = 8  # sliding window of the sliding models: shorter than prompt + generation


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# -- tiny models with random weights -------------------------------------------------------
# eos_token_id=None: generation never stops early, so every request makes max_new_tokens.
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=0)


def _finish(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


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
    kw.setdefault("peer_bytes", "4MiB")
    kw.setdefault("host_bytes", "4MiB")
    return aq.OffloadManager("cpu", **kw)


# -- 1. greedy decoding gives the tokens of the default cache ---------------------------
@pytest.mark.parametrize("batch,padded", [(1, False), (3, False), (3, True)],
                         ids=["b1", "b3", "b3-padded"])
@pytest.mark.parametrize("family,offload_sliding", [
    ("llama_gqa", False), ("gpt2", False),
    ("qwen2_sliding", False), ("qwen2_sliding", True),
    ("mistral_sliding", False), ("mistral_sliding", True)])
def test_greedy_tokens_match_default_cache(family, offload_sliding, batch, padded):
    model = model_of(family)
    inputs = prompts(batch, 7, seed=10 + batch, padded=padded)
    n = 24
    ref = gen(model, inputs, n)  # the default cache
    m = small_manager()
    cache = OffloadedCache(m, config=model.config, offload_sliding=offload_sliding)
    out = gen(model, inputs, n, kv=cache)
    assert out.shape == (batch, 7 + n)
    assert torch.equal(out, ref)
    # and the cache holds bitwise the keys/values of a DynamicCache after the same decoding
    ref_cache = transformers.DynamicCache(config=model.config)
    assert torch.equal(gen(model, inputs, n, kv=ref_cache), ref)
    _assert_same_cache(cache, ref_cache)
    full, sliding = full_layers(cache), sliding_layers(cache)
    assert full + sliding == model.config.num_hidden_layers
    st = cache.stats()
    expect_offloaded = full + (sliding if offload_sliding else 0)
    assert st["offloaded_layers"] == expect_offloaded
    assert st["resident_layers"] == model.config.num_hidden_layers - expect_offloaded
    assert cache.get_seq_length() == 7 + n - 1
    cache.close()
    assert_no_leak(m)
    m.close()


def test_sliding_models_really_slide():
    """The sliding families are sliding in this transformers version: their cache has sliding
    layers that keep only the window, and the window changes the tokens."""
    for family, n_sliding in [("qwen2_sliding", 2), ("mistral_sliding", 2)]:
        model = model_of(family)
        ref = transformers.DynamicCache(config=model.config)
        inputs = prompts(1, 7, seed=5)
        gen(model, inputs, 24, kv=ref)
        assert sliding_layers(ref) == n_sliding
        for layer in ref.layers:
            expected = WINDOW - 1 if isinstance(layer, DynamicSlidingWindowLayer) else 7 + 23
            assert layer.keys.shape[-2] == expected
    # Same weights without the window: different tokens (so the window matters above).
    model = model_of("qwen2_sliding")
    cfg = transformers.Qwen2Config(**{**model.config.to_dict(), "use_sliding_window": False,
                                      "layer_types": ["full_attention"] * 3})
    full = _finish(transformers.Qwen2ForCausalLM(cfg))
    full.load_state_dict(model.state_dict())
    inputs = prompts(2, 7, seed=5)
    assert not torch.equal(gen(model, inputs, 24), gen(full, inputs, 24))


def test_default_manager_and_no_config():
    """Without a manager (the module's default for the model's device) and without a config
    (every layer a DynamicLayer, made lazily) the tokens are still the default cache's."""
    model = model_of("llama_gqa")
    inputs = prompts(2, 5, seed=21)
    ref = gen(model, inputs, 16)
    with OffloadedCache() as cache:
        out = gen(model, inputs, 16, kv=cache)
        assert torch.equal(out, ref)
        assert cache.stats()["offloaded_layers"] == model.config.num_hidden_layers
        assert offloaded_full(cache) and full_layers(cache) == len(cache.layers)
    assert cache.stats()["segments"] == 0 and cache.stats()["bytes_in_tiers"] == 0


# -- 2. offloaded between uses, and incremental ----------------------------------------
def test_layers_offloaded_and_page_outs_incremental():
    """chunk_tokens=1: every token goes to the tiers at once (no resident tail)."""
    model = model_of("llama_gqa")
    batch, p, n = 2, 5, 40
    inputs = prompts(batch, p, seed=31)
    ref_cache = transformers.DynamicCache(config=model.config)
    ref = gen(model, inputs, n, kv=ref_cache)
    m = small_manager()
    cache = OffloadedCache(m, config=model.config, chunk_tokens=1, prefetch=True)
    out = gen(model, inputs, n, kv=cache)
    assert torch.equal(out, ref)
    layers = model.config.num_hidden_layers
    tokens = p + n - 1  # the last token is never fed back
    st = cache.stats()
    assert st["layers"] == layers and st["offloaded_layers"] == layers
    assert st["resident_layers"] == 0
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        keys, values = raw_keys(layer), raw_values(layer)  # the placeholders
        assert keys.device.type == "meta" and values.device.type == "meta"
        assert keys.shape == ref_layer.keys.shape == (batch, 2, tokens, 16)
        assert values.shape == ref_layer.values.shape
        assert keys.dtype == ref_layer.keys.dtype
    per_token = 2 * batch * 2 * 16 * 4  # keys + values, 2 kv heads of 16 floats
    # Exactly one copy of the cache lives in the tiers.
    assert st["bytes_in_tiers"] == layers * per_token * tokens
    assert m.stats()["tiers"][0]["used"] >= st["bytes_in_tiers"]
    # A full re-offload after every forward (prefill, then n - 1 steps) would copy this much:
    full_rewrite = layers * per_token * sum(p + k for k in range(n))
    assert layers * per_token * tokens <= st["bytes_offloaded"] < full_rewrite / 3
    # Binary-counter segments: O(log n) per layer (not one per step).
    assert layers <= st["segments"] <= layers * (2 + math.log2(n) + 1)
    assert m.stats()["live_handles"] >= st["segments"]
    # Something was fetched back at every step (the layers were really away).
    assert st["bytes_fetched"] >= (n - 1) * layers * per_token * p
    cache.close()
    assert_no_leak(m)
    m.close()


# -- 3. no pool leak ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["close", "context", "del"])
def test_no_leak_after_close_or_drop(how):
    model = model_of("qwen2_sliding")
    inputs = prompts(2, 6, seed=41)
    ref = gen(model, inputs, 20)
    m = small_manager()
    cache = OffloadedCache(m, config=model.config, offload_sliding=True)
    if how == "context":
        with cache:
            assert torch.equal(gen(model, inputs, 20, kv=cache), ref)
            st = m.stats()
            assert st["live_handles"] > 0 and sum(t["used"] for t in st["tiers"]) > 0
    else:
        assert torch.equal(gen(model, inputs, 20, kv=cache), ref)
        st = m.stats()
        assert st["live_handles"] > 0 and sum(t["used"] for t in st["tiers"]) > 0
        if how == "close":
            cache.close()
            assert cache.stats()["segments"] == 0 and cache.get_seq_length() == 0
        else:
            del cache
            gc.collect()
    assert_no_leak(m)
    m.close()


def test_close_then_reuse_gives_the_same_tokens():
    """close() empties the cache (reset); the same object then decodes a new request."""
    model = model_of("llama_gqa")
    m = small_manager()
    cache = OffloadedCache(m, config=model.config)
    a, b = prompts(1, 6, seed=51), prompts(2, 4, seed=52)
    assert torch.equal(gen(model, a, 16, kv=cache), gen(model, a, 16))
    cache.close()
    assert_no_leak(m)
    assert torch.equal(gen(model, b, 16, kv=cache), gen(model, b, 16))
    cache.reset()
    assert cache.get_seq_length() == 0
    assert_no_leak(m)
    m.close()


# -- 4. iteration yields the reference cache's tensors -----------------------------------
@pytest.mark.parametrize("family,offload_sliding", [
    ("llama_gqa", False), ("gpt2", False), ("qwen2_sliding", False), ("qwen2_sliding", True)])
def test_iteration_matches_dynamic_cache(family, offload_sliding):
    model = model_of(family)
    inputs = prompts(2, 6, seed=61)
    ref_cache = transformers.DynamicCache(config=model.config)
    ref = gen(model, inputs, 20, kv=ref_cache)
    m = small_manager()
    cache = OffloadedCache(m, config=model.config, offload_sliding=offload_sliding)
    assert torch.equal(gen(model, inputs, 20, kv=cache), ref)
    offloaded = cache.stats()["offloaded_layers"]
    assert offloaded >= 1
    for _ in range(2):  # iterating does not consume or change the offloaded cache
        got = list(cache)
        want = list(ref_cache)
        assert len(got) == len(want) == model.config.num_hidden_layers
        for (k, v, sw), (rk, rv, rsw) in zip(got, want):
            assert k.device.type == "cpu" and v.device.type == "cpu"
            assert same_bytes(k, rk) and same_bytes(v, rv)
            assert (sw is None) == (rsw is None)
            if sw is not None:
                assert same_bytes(sw, rsw)
        assert cache.stats()["offloaded_layers"] == offloaded
    assert offloaded_full(cache)
    cache.close()
    assert_no_leak(m)
    m.close()


# -- 5. cache operations ------------------------------------------------------------------
def _assert_same_cache(cache, ref_cache):
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    for (k, v, _), (rk, rv, _) in zip(list(cache), list(ref_cache)):
        assert same_bytes(k, rk) and same_bytes(v, rv)


def _decoded_pair(family, offload_sliding=False, batch=3, p=6, n=14, seed=71):
    model = model_of(family)
    inputs = prompts(batch, p, seed=seed)
    ref_cache = transformers.DynamicCache(config=model.config)
    seqs = gen(model, inputs, n, kv=ref_cache)
    m = small_manager()
    cache = OffloadedCache(m, config=model.config, offload_sliding=offload_sliding)
    assert torch.equal(gen(model, inputs, n, kv=cache), seqs)
    return model, m, cache, ref_cache, seqs


def _continue(model, cache, ref_cache, ids, n=10):
    """Generate further from both caches (only the uncached tokens are fed): same tokens."""
    out = gen(model, {"input_ids": ids}, n, kv=cache)
    ref = gen(model, {"input_ids": ids}, n, kv=ref_cache)
    assert torch.equal(out, ref)
    assert out.shape[-1] == ids.shape[-1] + n
    _assert_same_cache(cache, ref_cache)
    return out


def _finish_cache(m, cache):
    layers = full_layers(cache)
    assert cache.stats()["offloaded_layers"] >= layers
    assert offloaded_full(cache)
    cache.close()
    assert_no_leak(m)
    m.close()


def test_crop_matches_and_continues():
    model, m, cache, ref_cache, seqs = _decoded_pair("llama_gqa")
    length = cache.get_seq_length()
    cache.crop(-5)
    ref_cache.crop(-5)
    assert cache.get_seq_length() == length - 5
    _assert_same_cache(cache, ref_cache)
    st = cache.stats()
    # Rewritten whole: one segment per layer, the cache offloaded again.
    assert st["offloaded_layers"] == model.config.num_hidden_layers
    assert st["segments"] == model.config.num_hidden_layers
    # Continue from the cropped cache: the cache holds length - 5 tokens of seqs; feed two
    # more tokens of seqs (uncached) and decode further.
    _continue(model, cache, ref_cache, seqs[:, : length - 5 + 2])
    # Crop by zero is a no-op.
    before = [(k.clone(), v.clone()) for k, v, _ in cache]
    cache.crop(0)
    assert all(same_bytes(k, bk) and same_bytes(v, bv)
               for (k, v, _), (bk, bv) in zip(cache, before))
    _finish_cache(m, cache)


@pytest.mark.parametrize("family,offload_sliding", [("llama_gqa", False), ("gpt2", False),
                                                    ("qwen2_sliding", True)])
def test_batch_select_indices_matches_and_continues(family, offload_sliding):
    model, m, cache, ref_cache, seqs = _decoded_pair(family, offload_sliding)
    idx = torch.tensor([2, 0])
    cache.batch_select_indices(idx)
    ref_cache.batch_select_indices(idx)
    _assert_same_cache(cache, ref_cache)
    assert next(iter(cache))[0].shape[0] == 2
    out = _continue(model, cache, ref_cache, seqs[idx])
    assert torch.equal(out[:, : seqs.shape[-1]], seqs[idx])
    _finish_cache(m, cache)


@pytest.mark.parametrize("family,offload_sliding", [("llama_gqa", False),
                                                    ("qwen2_sliding", True)])
def test_reorder_cache_matches_and_continues(family, offload_sliding):
    model, m, cache, ref_cache, seqs = _decoded_pair(family, offload_sliding)
    beam = torch.tensor([1, 2, 0])
    cache.reorder_cache(beam)
    ref_cache.reorder_cache(beam)
    _assert_same_cache(cache, ref_cache)
    _continue(model, cache, ref_cache, seqs[beam])
    _finish_cache(m, cache)


@pytest.mark.parametrize("family,offload_sliding", [("llama_gqa", False),
                                                    ("qwen2_sliding", True)])
def test_batch_repeat_interleave_matches_and_continues(family, offload_sliding):
    model, m, cache, ref_cache, seqs = _decoded_pair(family, offload_sliding, batch=2)
    cache.batch_repeat_interleave(2)
    ref_cache.batch_repeat_interleave(2)
    _assert_same_cache(cache, ref_cache)
    assert next(iter(cache))[0].shape[0] == 4
    _continue(model, cache, ref_cache, seqs.repeat_interleave(2, dim=0))
    _finish_cache(m, cache)


def test_beam_search_matches_default_cache():
    """Beam search drives reorder_cache / batch_repeat_interleave from inside generate."""
    model = model_of("llama_gqa")
    inputs = prompts(2, 5, seed=81)
    ref = gen(model, inputs, 10, num_beams=3)
    m = small_manager()
    cache = OffloadedCache(m, config=model.config)
    out = gen(model, inputs, 10, num_beams=3, kv=cache)
    assert torch.equal(out, ref)
    cache.close()
    assert_no_leak(m)
    m.close()


def test_prompt_lookup_decoding_crops_inside_generate():
    """Prompt-lookup (assisted) decoding crops the cache after rejected candidates, from
    inside generate: same tokens as the default cache."""
    model = model_of("llama_gqa")
    base = prompts(1, 6, seed=85)["input_ids"]
    inputs = {"input_ids": torch.cat([base, base, base], dim=-1)}
    ref_cache = transformers.DynamicCache(config=model.config)
    ref = gen(model, inputs, 20, prompt_lookup_num_tokens=3, kv=ref_cache)
    assert torch.equal(ref, gen(model, inputs, 20, prompt_lookup_num_tokens=3))
    m = small_manager()
    cache = OffloadedCache(m, config=model.config)
    assert torch.equal(gen(model, inputs, 20, prompt_lookup_num_tokens=3,
                           kv=cache), ref)
    _assert_same_cache(cache, ref_cache)
    _finish_cache(m, cache)


@pytest.mark.parametrize("p,n", [(1, 1), (1, 8), (6, 1)])
def test_short_prompts_and_single_token(p, n):
    model = model_of("llama_gqa")
    inputs = prompts(2, p, seed=87)
    ref_cache = transformers.DynamicCache(config=model.config)
    ref = gen(model, inputs, n, kv=ref_cache)
    m = small_manager()
    cache = OffloadedCache(m, config=model.config)
    assert torch.equal(gen(model, inputs, n, kv=cache), ref)
    assert cache.get_seq_length() == p + n - 1
    _assert_same_cache(cache, ref_cache)
    _finish_cache(m, cache)


def test_half_precision_is_bitwise():
    """bfloat16 keys/values survive the byte packing of segments bit for bit."""
    model = make_llama().to(torch.bfloat16)
    inputs = prompts(2, 5, seed=89)
    ref_cache = transformers.DynamicCache(config=model.config)
    ref = gen(model, inputs, 12, kv=ref_cache)
    m = small_manager()
    cache = OffloadedCache(m, config=model.config)
    assert torch.equal(gen(model, inputs, 12, kv=cache), ref)
    assert all(layer.keys.dtype == torch.bfloat16 for layer in cache.layers)
    _assert_same_cache(cache, ref_cache)
    assert next(iter(cache))[0].dtype == torch.bfloat16
    _finish_cache(m, cache)


# -- 6. tier fallback ---------------------------------------------------------------------
def test_host_tier_fallback_gives_the_same_tokens():
    model = model_of("llama_gqa")
    inputs = prompts(2, 6, seed=91)
    ref = gen(model, inputs, 24)
    m = aq.OffloadManager("cpu", peer_bytes="1KiB", host_bytes="4MiB")
    cache = OffloadedCache(m, config=model.config)
    assert torch.equal(gen(model, inputs, 24, kv=cache), ref)
    tiers = {t["tier"]: t for t in m.stats()["tiers"]}
    assert tiers["host"]["used"] > 0  # the layers did not fit the peer tier
    assert tiers["peer"]["used"] <= tiers["peer"]["capacity"]
    assert cache.stats()["offloaded_layers"] == model.config.num_hidden_layers
    # and the data that went down the cascade comes back intact
    ref_cache = transformers.DynamicCache(config=model.config)
    gen(model, inputs, 24, kv=ref_cache)
    _assert_same_cache(cache, ref_cache)
    cache.close()
    assert_no_leak(m)
    m.close()


@pytest.mark.parametrize("tiers", [dict(peer_bytes=0, host_bytes=0),
                                   dict(peer_bytes="256B", host_bytes="256B")],
                         ids=["empty", "tiny"])
def test_no_room_anywhere_stays_resident(tiers):
    """A token's keys (3 rows x 2 heads x 16 floats = 384 B) fit in no 256 B tier."""
    model = model_of("llama_gqa")
    inputs = prompts(3, 6, seed=101)
    ref_cache = transformers.DynamicCache(config=model.config)
    ref = gen(model, inputs, 16, kv=ref_cache)
    m = aq.OffloadManager("cpu", **tiers)
    cache = OffloadedCache(m, config=model.config)
    assert torch.equal(gen(model, inputs, 16, kv=cache), ref)
    st = cache.stats()
    assert st["offloaded_layers"] == 0
    assert st["resident_layers"] == model.config.num_hidden_layers
    assert st["segments"] == 0 and st["bytes_offloaded"] == 0
    assert all(layer.keys.device.type == "cpu" for layer in cache.layers)
    _assert_same_cache(cache, ref_cache)
    cache.crop(-3)  # rewriting operations cope too
    ref_cache.crop(-3)
    _assert_same_cache(cache, ref_cache)
    cache.close()
    assert_no_leak(m)
    m.close()


def test_partly_full_tiers_give_the_same_tokens():
    """Tiers that hold some segments and refuse others (layers flip between offloaded and
    resident, full rewrites after a refusal): still the same tokens and cache, no leak."""
    model = model_of("llama_gqa")
    inputs = prompts(2, 6, seed=111)
    ref_cache = transformers.DynamicCache(config=model.config)
    ref = gen(model, inputs, 30, kv=ref_cache)
    m = aq.OffloadManager("cpu", peer_bytes="8KiB", host_bytes="8KiB")
    cache = OffloadedCache(m, config=model.config)
    assert torch.equal(gen(model, inputs, 30, kv=cache), ref)
    st = cache.stats()
    assert st["bytes_offloaded"] > 0  # some offloads succeeded...
    assert st["resident_layers"] > 0  # ...and some layers did not fit at the end
    _assert_same_cache(cache, ref_cache)
    cache.close()
    assert_no_leak(m)
    m.close()


# -- 7. arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["cpu", object(), 0])
def test_manager_must_be_an_offload_manager(bad):
    with pytest.raises(aq.InvalidArgumentError):
        OffloadedCache(bad)


def test_manager_of_another_device_is_refused():
    """The model computes on a device the manager does not serve (here: meta tensors)."""
    m = small_manager()
    cache = OffloadedCache(m)
    k = torch.empty(1, 2, 3, 16, device="meta")
    with pytest.raises(aq.InvalidArgumentError, match="meta"):
        cache.update(k, k, 0)
    assert cache.get_seq_length() == 0
    assert_no_leak(m)
    m.close()


def test_close_of_a_never_used_cache():
    cache = OffloadedCache()
    cache.close()
    assert cache.stats()["layers"] == 0
    assert "OffloadedCache" in repr(cache)


# -- 8. import isolation ------------------------------------------------------------------
def test_import_aqua_offload_does_not_import_transformers():
    # the aqua_offload this test imported (a source tree with the extension, or an install)
    where = os.path.dirname(os.path.dirname(os.path.abspath(aq.__file__)))
    env = {**os.environ, "PYTHONPATH": where + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import sys, aqua_offload; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "import aqua_offload.hf; assert 'transformers' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


# -- 9. in a TimeSlicer ---------------------------------------------------------------------
@pytest.mark.parametrize("family,offload_sliding", [("llama_gqa", False),
                                                    ("qwen2_sliding", False),
                                                    ("qwen2_sliding", True)])
def test_time_sliced_offloaded_caches_give_solo_tokens(family, offload_sliding):
    model = model_of(family)
    reqs = [prompts(1, 5, seed=121)["input_ids"], prompts(1, 9, seed=122)["input_ids"],
            prompts(2, 6, seed=123)]
    solo = [gen(model, {"input_ids": reqs[0]}, 20), gen(model, {"input_ids": reqs[1]}, 20),
            gen(model, reqs[2], 20)]
    m = small_manager(host_bytes="8MiB")
    slicer = aq.TimeSlicer(quantum_ms=0, manager=m, policy="rr")
    caches: list[OffloadedCache] = []

    def make():
        c = OffloadedCache(m, config=model.config, offload_sliding=offload_sliding)
        caches.append(c)
        return c

    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, cache_factory=make, max_new_tokens=20, do_sample=False))
    assert len(caches) == 3
    for r, want in zip(results, solo):
        assert torch.equal(r.sequences, want)
    assert sum(r.preemptions for r in results) > 0
    if family == "qwen2_sliding" and not offload_sliding:
        # the resident sliding layers were paged out by the slicer at preemptions
        assert sum(r.bytes_paged_out for r in results) > 0
    # generate_many closed every cache; nothing is left in the tiers
    assert all(c.stats()["segments"] == 0 for c in caches)
    assert_no_leak(m)
    st = slicer.stats()
    assert [s["status"] for s in st["slices"]] == ["done"] * 3
    slicer.close()
    m.close()


def test_time_sliced_fair_quantum_1ms():
    """The brief's setting: a fair slicer with a 1 ms quantum, two requests."""
    model = model_of("llama_gqa")
    reqs = [prompts(1, 6, seed=131)["input_ids"], prompts(1, 4, seed=132)["input_ids"]]
    solo = [gen(model, {"input_ids": r}, 24) for r in reqs]
    m = small_manager()
    slicer = aq.TimeSlicer(quantum_ms=1, manager=m, policy="fair")
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, cache_factory=lambda: OffloadedCache(m, config=model.config),
        max_new_tokens=24, do_sample=False))
    assert [r.name for r in results] == ["req-0", "req-1"]
    for r, want in zip(results, solo):
        assert torch.equal(r.sequences, want)
        assert r.new_tokens == 24
    assert_no_leak(m)
    slicer.close()
    m.close()


def test_aqua_preempt_drops_the_prefetched_layer():
    model = model_of("llama_gqa")
    m = small_manager()
    cache = OffloadedCache(m, config=model.config, prefetch=True)
    inputs = prompts(1, 6, seed=141)
    ref_cache = transformers.DynamicCache(config=model.config)
    gen(model, inputs, 12, kv=ref_cache)
    gen(model, inputs, 12, kv=cache)
    # The last layer's update prefetched the first layer for the next step.
    assert m.stats()["prefetched_bytes"] > 0
    cache.aqua_preempt()
    assert m.stats()["prefetched_bytes"] == 0
    assert cache.stats()["offloaded_layers"] == model.config.num_hidden_layers
    _assert_same_cache(cache, ref_cache)
    cache.close()
    assert_no_leak(m)
    m.close()


def test_prefetch_off_gives_the_same_tokens():
    model = model_of("gpt2")
    inputs = prompts(2, 5, seed=151)
    m = small_manager()
    with OffloadedCache(m, config=model.config, prefetch=False) as cache:
        assert torch.equal(gen(model, inputs, 16, kv=cache), gen(model, inputs, 16))
        assert m.stats()["prefetched_bytes"] == 0
        assert m.stats()["prefetches"] == 0
    assert_no_leak(m)
    m.close()


@pytest.mark.parametrize("priority", [float("nan"), "high", True])
def test_bad_priority_is_refused(priority):
    with pytest.raises(aq.InvalidArgumentError):
        OffloadedCache(aq.OffloadManager("cpu"), priority=priority)
