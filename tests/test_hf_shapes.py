"""OffloadedCache with every cache shape transformers builds: hybrid linear-attention layers
(Qwen3-Next), dummy layers between attention layers (NemotronH mlp/moe blocks), cross-attention
caches (Bart, T5: both halves of an EncoderDecoderCache offloaded), and ``layers[i].keys`` read
directly by model code while the layer is offloaded."""

from __future__ import annotations

import gc

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import hf_models  # noqa: E402
from aqua_offload.hf import OffloadedCache, cache_kwarg, offloaded_cache_for  # noqa: E402
from aqua_offload.hf.layers import OffloadedLayer, raw_keys  # noqa: E402
import transformers.cache_utils as _cache_utils  # noqa: E402

# Hybrid caches (DummyLayer, LinearAttentionLayer) came with transformers 5.2x; the previous
# releases we support build no such layers, so those tests have nothing to check there.
DummyLayer = getattr(_cache_utils, "DummyLayer", None)
LinearAttentionLayer = getattr(_cache_utils, "LinearAttentionLayer", None)
hybrid = pytest.mark.skipif(
    DummyLayer is None or LinearAttentionLayer is None,
    reason=f"transformers {transformers.__version__} has no DummyLayer/LinearAttentionLayer")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture
def manager(checked_manager):
    return checked_manager


def gen(model, inputs, n, kv=None, **kw):
    if kv is not None:
        kw[cache_kwarg()] = kv
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


def same_layers(a_layers, b_layers) -> None:
    assert len(a_layers) == len(b_layers)
    for a, b in zip(a_layers, b_layers):
        for name in ("keys", "values"):
            ta, tb = getattr(a, name, None), getattr(b, name, None)
            assert (ta is None) == (tb is None)
            if ta is not None:
                assert torch.equal(ta, tb)


# -- hybrid linear attention (Qwen3-Next) ---------------------------------------------------
@hybrid
def test_qwen3_next_beam_search_and_crop(manager):
    model = hf_models.model("qwen3_next")
    inputs = hf_models.prompts(2, 6, seed=1)
    ref = gen(model, inputs, 8, num_beams=3)
    cache = OffloadedCache(manager, config=model.config)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [LinearAttentionLayer, OffloadedLayer, LinearAttentionLayer]
    assert torch.equal(gen(model, inputs, 8, cache, num_beams=3), ref)
    assert [type(layer) for layer in cache.layers] == kinds  # linear layers left as they are
    assert cache.is_offloaded(1) and not cache.is_offloaded(0)
    # crop (recording the past, so that the linear layers can be cropped as well)
    cache.close()
    cache = OffloadedCache(manager, config=model.config)
    ref_cache = transformers.DynamicCache(config=model.config)
    for c in (cache, ref_cache):
        c.activate_past_recording()
        gen(model, inputs, 8, c)
    cache.crop(-3)
    ref_cache.crop(-3)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 6 + 8 - 1 - 3
    same_layers(cache.layers, ref_cache.layers)
    for a, b in zip(cache.layers[::2], ref_cache.layers[::2]):  # the linear layers' states
        assert all(torch.equal(a.conv_states[k], b.conv_states[k]) for k in a.conv_states)
    cache.close()


# -- dummy layers (NemotronH) ---------------------------------------------------------------
@hybrid
@pytest.mark.parametrize("op", ["reorder_cache", "crop"])  # (transformers' linear layers
# have no batch_select_indices / batch_repeat_interleave)
def test_nemotron_h_dummy_layers_through_cache_operations(manager, op):
    model = hf_models.model("nemotron_h")
    inputs = hf_models.prompts(3, 6, seed=2)
    cache = OffloadedCache(manager, config=model.config)
    ref_cache = transformers.DynamicCache(config=model.config)
    if op == "crop":
        cache.activate_past_recording()
        ref_cache.activate_past_recording()
    assert torch.equal(gen(model, inputs, 6, cache), gen(model, inputs, 6, ref_cache))
    assert sum(isinstance(layer, DummyLayer) for layer in cache.layers) == 2
    arg = {"reorder_cache": torch.tensor([2, 0, 1]), "crop": -2}[op]
    getattr(cache, op)(arg)
    getattr(ref_cache, op)(arg)
    same_layers(cache.layers, ref_cache.layers)
    assert cache.is_offloaded(2)  # the attention layer went back to the tiers
    assert all(layer.keys is None for layer in cache.layers if isinstance(layer, DummyLayer))
    cache.close()


@hybrid
def test_nemotron_h_beam_search(manager):
    model = hf_models.model("nemotron_h")
    inputs = hf_models.prompts(2, 5, seed=3)
    cache = OffloadedCache(manager, config=model.config)
    assert torch.equal(gen(model, inputs, 8, cache, num_beams=3),
                       gen(model, inputs, 8, num_beams=3))
    cache.close()


# -- cross-attention caches (Bart, T5) ------------------------------------------------------
@pytest.mark.parametrize("arch", ["bart", "t5"])
@pytest.mark.parametrize("beams", [1, 3])
def test_encoder_decoder_with_both_halves_offloaded(manager, arch, beams):
    model = hf_models.model(arch)
    inputs = hf_models.prompts(2, 7, seed=4)
    ref_cache = transformers.EncoderDecoderCache(transformers.DynamicCache(config=model.config),
                                                 transformers.DynamicCache(config=model.config))
    ref = gen(model, inputs, 8, ref_cache, num_beams=beams)
    cache = offloaded_cache_for(model, manager)
    assert isinstance(cache, transformers.EncoderDecoderCache)
    assert torch.equal(gen(model, inputs, 8, cache, num_beams=beams), ref)
    self_half, cross_half = cache.self_attention_cache, cache.cross_attention_cache
    for half in (self_half, cross_half):
        st = half.stats()
        assert st["offloaded_layers"] == st["layers"] == 2
        assert st["bytes_fetched"] > 0
    # The cross-attention layers were read at every step after the first: fetched on access.
    assert cross_half.stats()["bytes_fetched"] >= 6 * cross_half.stats()["bytes_in_tiers"]
    same_layers(self_half.layers, ref_cache.self_attention_cache.layers)
    same_layers(cross_half.layers, ref_cache.cross_attention_cache.layers)
    for half in (self_half, cross_half):
        half.close()


# -- layers[i].keys while offloaded ----------------------------------------------------------
def _decoded(manager, n=6):
    model = hf_models.model("llama")
    inputs = hf_models.prompts(2, 5, seed=5)
    # chunk_tokens=1: the whole layer lives in the tiers (no resident tail), so a read fetches
    # exactly the layer's bytes
    cache = OffloadedCache(manager, config=model.config, chunk_tokens=1)
    ref_cache = transformers.DynamicCache(config=model.config)
    assert torch.equal(gen(model, inputs, n, cache), gen(model, inputs, n, ref_cache))
    cache.aqua_preempt()  # no prefetch in flight: every read below is a real fetch
    return model, inputs, cache, ref_cache


def test_reading_keys_fetches_once_per_pair_and_stays_offloaded(manager):
    model, inputs, cache, ref_cache = _decoded(manager)
    layer, ref_layer = cache.layers[1], ref_cache.layers[1]
    assert raw_keys(layer).device.type == "meta"
    before = cache.stats()
    keys = layer.keys
    after_keys = cache.stats()
    values = layer.values  # the second half of the pair: no second fetch
    after = cache.stats()
    assert torch.equal(keys, ref_layer.keys) and torch.equal(values, ref_layer.values)
    assert keys.device.type == "cpu" and keys.shape == ref_layer.keys.shape
    layer_bytes = keys.nbytes + values.nbytes
    assert after_keys["bytes_fetched"] - before["bytes_fetched"] == layer_bytes
    assert after["bytes_fetched"] == after_keys["bytes_fetched"]
    assert after["offloaded_layers"] == before["offloaded_layers"] == 2
    assert cache.is_offloaded(1) and raw_keys(layer).device.type == "meta"
    # shapes and lengths never fetch
    assert layer.get_seq_length() == ref_layer.get_seq_length()
    assert cache.get_mask_sizes(1, 1) == ref_cache.get_mask_sizes(1, 1)
    assert cache.stats()["bytes_fetched"] == after["bytes_fetched"]
    # and decoding goes on exactly as before
    ids = gen(model, inputs, 6)
    more = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(gen(model, more, 4, cache), gen(model, more, 4, ref_cache))
    cache.close()


def test_writing_an_offloaded_layer_brings_it_in(manager):
    """A write from outside (as transformers' own layer offloading does) replaces the data:
    the layer is resident, and its next page out rewrites it whole."""
    model, inputs, cache, ref_cache = _decoded(manager)
    layer = cache.layers[0]
    new = ref_cache.layers[0].keys * 2
    layer.keys = new
    assert not cache.is_offloaded(0)
    assert layer.keys is new
    assert torch.equal(layer.values, ref_cache.layers[0].values)  # brought in, not lost
    ref_cache.layers[0].keys = new.clone()
    ids = gen(model, inputs, 6)
    more = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(gen(model, more, 4, cache), gen(model, more, 4, ref_cache))
    assert cache.is_offloaded(0)
    same_layers(cache.layers, ref_cache.layers)
    cache.close()


def test_a_layer_outliving_its_cache_says_so(manager):
    _, _, cache, _ = _decoded(manager)
    layer = cache.layers[0]
    del cache
    gc.collect()
    with pytest.raises(aq.InvalidHandleError, match="outlived"):
        layer.keys  # noqa: B018
