"""OffloadedCache under the cache operations transformers applies between forwards (crop,
batch_select_indices, reorder_cache, batch_repeat_interleave, and beam search and prompt-lookup
decoding that call them from inside generate), and at the edges (one-token prompts, bfloat16):
after each operation the cache holds bitwise a DynamicCache's bytes, and decoding further gives
the default cache's tokens."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from aqua_offload.hf import OffloadedCache  # noqa: E402

from conftest import same_bytes  # noqa: E402
from hf_cache_helpers import (_assert_same_cache, assert_no_leak, full_layers, gen,  # noqa: E402
                              make_llama, model_of, offloaded_full, prompts, small_manager)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# -- cache operations ---------------------------------------------------------------------
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
