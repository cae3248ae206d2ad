"""generate_many's arguments on the current transformers: the cache keyword the installed
version wants (no FutureWarning from the library's own calls), cache_factory (a Cache class or a
callable; an instance refused), per-request caches (isolated, left open for the next turn),
per-request generate arguments merged with the shared ones, and per-request seeds (a seeded
sampled request gives its solo tokens, whatever the interleaving)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import hf_models  # noqa: E402
from aqua_offload.hf import OffloadedCache, cache_kwarg, generate_many  # noqa: E402
from conftest import AllQueued, run_with_timeout  # noqa: E402

NEW = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture
def manager(small_manager):
    return small_manager


@pytest.fixture
def strict():
    """Warnings are errors (FutureWarning and DeprecationWarning included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def solo(model, request, seed=None, n=NEW, kv=None, **kw):
    args = {"max_new_tokens": n, "do_sample": False, **request, **kw}
    if kv is not None:
        args[cache_kwarg()] = kv
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**args)


def many(model, requests, manager, policy="rr", **kw):
    slicer = aq.TimeSlicer(quantum_ms=0, manager=manager, policy=policy)
    try:
        return run_with_timeout(lambda: generate_many(model, requests, slicer=slicer,
                                                      max_new_tokens=NEW, do_sample=False, **kw))
    finally:
        slicer.close()


def test_cache_keyword_follows_the_installed_transformers():
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert cache_kwarg() == ("cache" if "cache" in params else "past_key_values")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 24):
        assert cache_kwarg() == "cache"


@pytest.mark.parametrize("factory", [None, "class", "callable"])
def test_no_future_warning_from_the_library(manager, strict, factory):
    model = hf_models.model("llama")
    reqs = [hf_models.prompts(1, 5, seed=1), hf_models.prompts(2, 4, seed=2)]
    cf = {None: None, "class": OffloadedCache,
          "callable": lambda: OffloadedCache(manager, config=model.config)}[factory]
    results = many(model, reqs, manager, cache_factory=cf)
    for r, req in zip(results, reqs):
        assert torch.equal(r.sequences, solo(model, req))
    with OffloadedCache(manager, config=model.config) as kv:
        assert torch.equal(solo(model, reqs[1], kv=kv), results[1].sequences)


def test_cache_class_is_built_on_the_slicers_manager(manager):
    model = hf_models.model("llama")
    reqs = [hf_models.prompts(1, 5, seed=3), hf_models.prompts(1, 6, seed=4)]
    before = manager.stats()["offloads"]
    results = many(model, reqs, manager, cache_factory=OffloadedCache)
    assert manager.stats()["offloads"] > before  # the layers went to this manager's tiers
    for r, req in zip(results, reqs):
        assert torch.equal(r.sequences, solo(model, req))
    manager.synchronize()
    assert manager.stats()["live_handles"] == 0  # and were given back


def test_encoder_decoder_cache_class(manager):
    model = hf_models.model("t5")
    reqs = [hf_models.prompts(1, 5, seed=5), hf_models.prompts(2, 4, seed=6)]
    for cf in (transformers.EncoderDecoderCache, OffloadedCache):
        results = many(model, reqs, manager, cache_factory=cf)
        for r, req in zip(results, reqs):
            assert torch.equal(r.sequences, solo(model, req))


def test_old_cache_keyword_for_a_factory_still_works_with_a_warning(manager):
    model = hf_models.model("llama")
    reqs = [hf_models.prompts(1, 5, seed=7)]
    with pytest.warns(FutureWarning, match="cache_factory"):
        results = many(model, reqs, manager,
                       cache=lambda: OffloadedCache(manager, config=model.config))
    assert torch.equal(results[0].sequences, solo(model, reqs[0]))


def test_factory_returning_one_cache_twice_is_refused(manager):
    model = hf_models.model("llama")
    one = transformers.DynamicCache(config=model.config)
    reqs = [hf_models.prompts(1, 5, seed=8), hf_models.prompts(1, 4, seed=9)]
    with pytest.raises(aq.InvalidArgumentError, match="new cache per call"):
        many(model, reqs, manager, policy="fcfs", cache_factory=lambda: one)
    # whichever request got the cache first ran alone in it (prompts of 5 and 4 tokens): the
    # other was refused, before or after the first finished
    assert one.get_seq_length() in (5 + NEW - 1, 4 + NEW - 1)


@pytest.mark.parametrize("key", ["cache", "past_key_values"])
def test_requests_with_their_own_caches_for_two_turns(manager, key):
    """Each request carries its own cache (isolated from the others), left open: a second
    generate_many continues both conversations, as two solo turns would."""
    model = hf_models.model("llama")
    reqs = [hf_models.prompts(1, 5, seed=10), hf_models.prompts(2, 4, seed=11)]
    caches = [OffloadedCache(manager, config=model.config) for _ in reqs]
    refs = [transformers.DynamicCache(config=model.config) for _ in reqs]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        turn1 = many(model, [{**r, key: c} for r, c in zip(reqs, caches)], manager)
    follow = []
    for r, t, ref in zip(reqs, turn1, refs):
        assert torch.equal(t.sequences, solo(model, r, kv=ref))
        ids = torch.cat([t.sequences, torch.full((t.sequences.shape[0], 2), 7)], -1)
        follow.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert all(c.get_seq_length() == 0 or c.stats()["segments"] > 0 for c in caches)
    turn2 = many(model, [{**f, key: c} for f, c in zip(follow, caches)], manager)
    for f, t, ref in zip(follow, turn2, refs):
        assert torch.equal(t.sequences, solo(model, f, kv=ref))
    for c in caches:
        c.close()


class _StopAfter(transformers.StoppingCriteria):
    """Stops once the sequences are ``length`` long; counts its calls."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.length)


def test_per_request_generate_arguments_are_merged(manager):
    model = hf_models.model("llama")
    a, b, c = (hf_models.prompts(1, 5, seed=s) for s in (12, 13, 14))
    shared, own = _StopAfter(10 ** 6), _StopAfter(5 + 3)
    reqs = [{**a, "stopping_criteria": transformers.StoppingCriteriaList([own])},
            {**b, "max_new_tokens": 2},
            {**c, "logits_processor": transformers.LogitsProcessorList(
                [transformers.MinLengthLogitsProcessor(3, eos_token_id=5)])}]
    results = many(model, reqs, manager,
                   stopping_criteria=transformers.StoppingCriteriaList([shared]))
    assert results[0].sequences.shape[-1] == 5 + 3  # its own criterion stopped it
    assert torch.equal(results[0].sequences, solo(model, a, n=3))
    assert results[1].sequences.shape[-1] == 5 + 2  # its own max_new_tokens
    assert torch.equal(results[1].sequences, solo(model, b, n=2))
    assert torch.equal(results[2].sequences, solo(model, reqs[2]))
    assert shared.calls == 3 + 2 + NEW  # the shared criterion ran for every request
    assert own.calls == 3


# -- seeds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["rr", "fair"])
def test_seeded_sampling_gives_solo_tokens_time_sliced(manager, policy):
    model = hf_models.model("llama")
    sampled = {"do_sample": True, "top_k": 30, "temperature": 0.9}
    reqs = [{**hf_models.prompts(1, 5, seed=15), **sampled},
            {**hf_models.prompts(2, 4, seed=16), **sampled},
            {**hf_models.prompts(1, 6, seed=17), **sampled}]  # unseeded: draws in between
    seeds = [123, 456, None]
    want = [solo(model, r, seed=s, n=12) for r, s in zip(reqs[:2], seeds[:2])]
    assert not torch.equal(want[0], solo(model, reqs[0], seed=124, n=12))  # seeds matter
    for _ in range(2):
        slicer = aq.TimeSlicer(quantum_ms=0, manager=manager, policy=policy)
        queued = transformers.StoppingCriteriaList([AllQueued(slicer, len(reqs))])
        results = run_with_timeout(lambda: generate_many(
            model, reqs, slicer=slicer, seeds=seeds, max_new_tokens=12,
            stopping_criteria=queued))  # (every request queued before the first decodes on)
        slicer.close()
        assert sum(r.preemptions for r in results) > 0
        for r, w in zip(results[:2], want):
            assert torch.equal(r.sequences, w)
