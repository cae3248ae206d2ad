"""OffloadedCache (aqua_offload.hf): a transformers DynamicCache whose full-attention layers live
offloaded between their uses. The acceptance criterion is correctness: greedy decoding gives
token-for-token the tokens of the default cache, whatever the model family, batch, tier sizes
or cache operations; and the cache gives every byte back to the tiers when it is done.

This file: greedy tokens, offloaded between uses, no leak, iteration, tier fallback, arguments
and import isolation. The cache operations (crop, batch selection, beam search...) are in
test_hf_cache_ops.py, the cache in a TimeSlicer in test_hf_cache_timeslice.py; the models and
checks they share in hf_cache_helpers.py."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from aqua_offload.hf import OffloadedCache  # noqa: E402
from aqua_offload.hf.layers import raw_keys, raw_values  # noqa: E402
from transformers.cache_utils import DynamicSlidingWindowLayer  # noqa: E402

from conftest import same_bytes  # noqa: E402
from hf_cache_helpers import (WINDOW, _assert_same_cache, assert_no_leak, full_layers,  # noqa: E402
                              gen, model_of, offloaded_full, prompts, sliding_layers,
                              small_manager)
from hf_models import _finish  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


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


# -- 5. tier fallback ---------------------------------------------------------------------
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


# -- 6. arguments ---------------------------------------------------------------------------
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


# -- 7. import isolation ------------------------------------------------------------------
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
