"""copy.deepcopy of an OffloadedCache: transformers' documented prefix reuse (compute a prompt
prefix once, deep-copy the cache per continuation) gives the tokens of the same recipe with a
DynamicCache; the copy shares the manager and owns its own handles."""

from __future__ import annotations

import copy

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import hf_models  # noqa: E402
from conftest import check_no_leak  # noqa: E402
from aqua_offload.hf import OffloadedCache, cache_kwarg, offloaded_cache_for  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture
def manager(small_manager):
    return small_manager




def kv(cache):
    return {cache_kwarg(): cache}


def prefix_reuse(model, make_cache, prefix, continuations, n=6):
    """The recipe of transformers' docs ("Re-use Cache to continue generation"): run the
    prefix once into a cache, then deepcopy it for each continuation."""
    prompt_cache = make_cache()
    with torch.no_grad():
        model(**prefix, **kv(prompt_cache), use_cache=True)
    outs = []
    for cont in continuations:
        ids = torch.cat([prefix["input_ids"], cont], -1)
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=n, do_sample=False,
                                       return_dict_in_generate=True, output_scores=True,
                                       **kv(copy.deepcopy(prompt_cache))))
    return prompt_cache, outs


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3_next"])
def test_prefix_reuse_matches_dynamic_cache(manager, arch):
    model = hf_models.model(arch)
    prefix = hf_models.prompts(1, 8, seed=1)
    conts = [hf_models.prompts(1, k, seed=10 + k)["input_ids"] for k in (2, 3, 5)]
    ref_prompt, ref = prefix_reuse(
        model, lambda: transformers.DynamicCache(config=model.config), prefix, conts)
    prompt, outs = prefix_reuse(
        model, lambda: OffloadedCache(manager, config=model.config), prefix, conts)
    for out, want in zip(outs, ref):
        assert torch.equal(out.sequences, want.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.scores, want.scores))
        getattr(out, cache_kwarg()).close()  # the copy generate used (out.cache from 5.24)
    # the prompt cache itself is untouched by its continuations
    assert prompt.get_seq_length() == 8
    assert prompt.stats()["offloaded_layers"] >= 1
    for a, b in zip(prompt.layers, ref_prompt.layers):
        if hasattr(b, "keys") and b.keys is not None:
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    prompt.close()
    check_no_leak(manager)


def _decoded(manager, **kw):
    model = hf_models.model("gemma3")  # one sliding (resident) layer, one offloaded layer
    inputs = hf_models.prompts(2, 6, seed=2)
    cache = OffloadedCache(manager, config=model.config, **kw)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=8, do_sample=False, **kv(cache))
    return model, cache


def test_copy_shares_the_manager_and_owns_its_handles(manager):
    _, cache = _decoded(manager)
    live = manager.stats()["live_handles"]
    twin = copy.deepcopy(cache)
    assert twin._manager is cache._manager is manager
    mine = {id(seg.handle) for s in cache._slots for seg in s.segments}
    theirs = {id(seg.handle) for s in twin._slots for seg in s.segments}
    assert mine and theirs and not mine & theirs
    assert manager.stats()["live_handles"] == 2 * live
    assert twin.stats()["bytes_in_tiers"] == cache.stats()["bytes_in_tiers"] > 0
    assert twin.stats()["offloaded_layers"] == cache.stats()["offloaded_layers"] == 1
    # the layers are the copy's own, bound to the copy
    assert all(a is not b for a, b in zip(twin.layers, cache.layers))
    assert twin.layers[1].__dict__["_aq_cache"]() is twin
    # fetching from the copy does not touch the original's bookkeeping or data
    before, twin_before = cache.stats(), twin.stats()
    keys = twin.layers[1].keys
    assert cache.stats() == before
    assert twin.stats()["bytes_fetched"] - twin_before["bytes_fetched"] == sum(
        seg.handle.nbytes for seg in twin._slots[1].segments) > 0
    assert torch.equal(keys, cache.layers[1].keys)
    # closing the original leaves the copy whole
    want = [(k.clone(), v.clone()) for k, v, _ in cache]
    cache.close()
    assert cache.get_seq_length() == 0
    got = list(twin)
    assert all(torch.equal(k, wk) and torch.equal(v, wv)
               for (k, v, _), (wk, wv) in zip(got, want))
    assert twin.get_seq_length() == 6 + 8 - 1
    twin.close()
    check_no_leak(manager)


def test_resident_layers_are_copied_not_shared(manager):
    _, cache = _decoded(manager)
    twin = copy.copy(cache)  # a shallow copy would share handles: it copies deeply too
    assert not cache.is_offloaded(0)  # the sliding layer stays resident
    original = cache.layers[0].keys.clone()
    twin.layers[0].keys.mul_(3)
    assert torch.equal(cache.layers[0].keys, original)
    cache.close()
    twin.close()
    check_no_leak(manager)


def test_copies_decode_independently(manager):
    """Two copies of one cache fed different tokens: each gives the tokens of a DynamicCache
    copied the same way."""
    model, cache = _decoded(manager)
    ref = transformers.DynamicCache(config=model.config)
    inputs = hf_models.prompts(2, 6, seed=2)
    with torch.no_grad():
        seqs = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kv(ref))
    for k, extra in enumerate([3, 7]):
        ids = torch.cat([seqs, torch.full((2, 1), extra + k)], -1)
        a, b = copy.deepcopy(cache), copy.deepcopy(ref)
        args = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                    do_sample=False)
        with torch.no_grad():
            assert torch.equal(model.generate(**args, **kv(a)), model.generate(**args, **kv(b)))
        a.close()
    cache.close()
    check_no_leak(manager)


def test_encoder_decoder_cache_deepcopies(manager):
    model = hf_models.model("bart")
    inputs = hf_models.prompts(2, 6, seed=3)
    cache = offloaded_cache_for(model, manager)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=5, do_sample=False, **kv(cache))
    twin = copy.deepcopy(cache)
    for half, other in ((twin.self_attention_cache, cache.self_attention_cache),
                        (twin.cross_attention_cache, cache.cross_attention_cache)):
        assert half is not other and half._manager is manager
        for a, b in zip(half.layers, other.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    for c in (cache, twin):
        c.self_attention_cache.close()
        c.cross_attention_cache.close()
    check_no_leak(manager)
