"""The resident tail of an OffloadedCache (hf/cache.py, Note [Resident tail]): tokens decoded
after the first page out stay resident until ``chunk_tokens`` of them accumulated, then go to
the tiers as one segment, so a layer costs one page out per chunk instead of one per step."""

from __future__ import annotations

import copy

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import hf_models  # noqa: E402
from aqua_offload.hf import OffloadedCache, cache_kwarg  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture
def manager(checked_manager):
    return checked_manager


def gen(model, inputs, n, kv):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **{cache_kwarg(): kv})


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_decoded_tokens_wait_in_a_resident_tail(manager, chunk):
    model = hf_models.model("llama")  # 2 layers, 2 kv heads of 8 floats
    batch, p, n = 2, 5, 40
    inputs = hf_models.prompts(batch, p, seed=32)
    ref_cache = transformers.DynamicCache(config=model.config)
    ref = gen(model, inputs, n, ref_cache)
    before = manager.stats()["offloads"]
    cache = OffloadedCache(manager, config=model.config, chunk_tokens=chunk)
    assert torch.equal(gen(model, inputs, n, cache), ref)
    layers, tokens = model.config.num_hidden_layers, p + n - 1
    per_token = 2 * batch * 2 * 8 * 4
    st = cache.stats()
    assert st["offloaded_layers"] == layers
    tail = (tokens - p) % chunk  # the prompt went out whole at the first page out
    assert st["resident_tail_bytes"] == layers * per_token * tail
    assert st["bytes_in_tiers"] + st["resident_tail_bytes"] == layers * per_token * tokens
    # one page out per layer for the prompt, then one per chunk of decoded tokens
    assert manager.stats()["offloads"] - before == layers * (1 + (tokens - p) // chunk)
    for a, b in zip(cache.layers, ref_cache.layers):  # segments + tail = the whole layer
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    twin = copy.deepcopy(cache)  # the tail is copied, not shared
    assert twin.stats()["resident_tail_bytes"] == st["resident_tail_bytes"]
    if tail:
        assert twin._slots[0].tail[0] is not cache._slots[0].tail[0]
    for c in (cache, twin):
        c.close()
        assert c.stats()["resident_tail_bytes"] == 0


def test_a_rewrite_takes_the_tail_along(manager):
    """A cache operation that may rewrite the prefix (here: crop into the tail) pages the whole
    layer out again; decoding then goes on exactly as with the default cache."""
    model = hf_models.model("llama")
    inputs = hf_models.prompts(2, 5, seed=33)
    ref_cache = transformers.DynamicCache(config=model.config)
    cache = OffloadedCache(manager, config=model.config, chunk_tokens=8)
    seqs = gen(model, inputs, 6, ref_cache)
    assert torch.equal(gen(model, inputs, 6, cache), seqs)
    assert cache.stats()["resident_tail_bytes"] > 0
    cache.crop(-3)
    ref_cache.crop(-3)
    assert cache.stats()["resident_tail_bytes"] == 0  # rewritten whole into the tiers
    ids = seqs[:, : cache.get_seq_length() + 1]
    more = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(gen(model, more, 5, cache), gen(model, more, 5, ref_cache))
    cache.close()


@pytest.mark.parametrize("chunk", [0, -1, 1.5, True, "16"])
def test_bad_chunk_tokens_is_refused(chunk):
    with pytest.raises(aq.InvalidArgumentError, match="chunk_tokens"):
        OffloadedCache(aq.OffloadManager("cpu"), chunk_tokens=chunk)
