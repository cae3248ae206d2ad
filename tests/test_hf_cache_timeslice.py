"""OffloadedCache in a TimeSlicer: requests time-sliced by generate_many, each with its own
offloaded cache, give the tokens of running alone; a preemption drops the prefetched layer;
the cache's priority argument is checked."""

from __future__ import annotations

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from aqua_offload.hf import OffloadedCache, generate_many  # noqa: E402

from conftest import AllQueued, run_with_timeout  # noqa: E402
from hf_cache_helpers import (_assert_same_cache, assert_no_leak, gen, model_of,  # noqa: E402
                              prompts, small_manager)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# -- in a TimeSlicer ------------------------------------------------------------------------
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

    queued = transformers.StoppingCriteriaList([AllQueued(slicer, len(reqs))])  # (preemptions)
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, cache_factory=make, max_new_tokens=20, do_sample=False,
        stopping_criteria=queued))
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
