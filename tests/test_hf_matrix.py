"""The compatibility matrix (docs/hf.md): tiny random models of every cache shape x the ways
users call ``generate``, with an OffloadedCache (both halves of an EncoderDecoderCache for the
encoder-decoder models) against transformers' default cache. Tokens AND scores must be bitwise
equal (torch.equal), and so must ``generate_many`` under fair and rr slicing against each
request run alone. Sized to run in well under a minute on 2 CPU cores."""

from __future__ import annotations

import warnings

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import hf_models  # noqa: E402
from aqua_offload.hf import OffloadedCache, cache_kwarg, generate_many, offloaded_cache_for  # noqa: E402
from conftest import AllQueued, run_with_timeout  # noqa: E402

ARCHS = list(hf_models.FACTORIES)
MODES = ["greedy_padded", "beam", "sample_seeded", "two_turn", "crop", "dict_scores"]
NEW = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture
def manager(small_manager):
    return small_manager


def _gen(model, inputs, kv, seed=None, **kw):
    """generate with ``kv`` (None: the default cache), warnings from the library are errors."""
    args = {"max_new_tokens": NEW, "do_sample": False, "return_dict_in_generate": True,
            "output_scores": True, **inputs, **kw}
    if kv is not None:
        args[cache_kwarg()] = kv
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            return model.generate(**args)


def _assert_same(out, ref) -> None:
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == NEW
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))
    for name in ("logits", "sequences_scores", "beam_indices"):
        a, b = getattr(out, name, None), getattr(ref, name, None)
        assert (a is None) == (b is None), name
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
        elif a is not None:
            assert all(torch.equal(x, y) for x, y in zip(a, b)), name


def _default_cache(model):
    """What generate makes by itself, made by hand (so that a second turn can reuse it)."""
    if model.config.is_encoder_decoder:
        return transformers.EncoderDecoderCache(transformers.DynamicCache(config=model.config),
                                                transformers.DynamicCache(config=model.config))
    return transformers.DynamicCache(config=model.config)


def _layers(kv) -> list:
    parts = [kv] if not hasattr(kv, "self_attention_cache") else [
        kv.self_attention_cache, kv.cross_attention_cache]
    return [layer for part in parts for layer in part.layers]


def _assert_same_layers(kv, ref_kv) -> None:
    """Every layer's tensors bitwise equal (read through ``layers[i]``: the offloaded ones are
    fetched on access), of every kind: attention keys/values, linear-attention states."""
    got, want = _layers(kv), _layers(ref_kv)
    assert len(got) == len(want)
    assert all(isinstance(a, type(b)) for a, b in zip(got, want))  # same kinds (or ours)
    for a, b in zip(got, want):
        for name in ("keys", "values"):
            ta, tb = getattr(a, name, None), getattr(b, name, None)
            assert (ta is None) == (tb is None)
            if ta is not None:
                assert ta.device.type == "cpu" and torch.equal(ta, tb)
        for name in ("conv_states", "recurrent_states"):
            da, db = getattr(a, name, None), getattr(b, name, None)
            assert (da is None) == (db is None)
            if da is not None:
                assert da.keys() == db.keys()
                assert all((da[k] is None and db[k] is None) or torch.equal(da[k], db[k])
                           for k in da)


def _offloaded_parts(kv) -> list[OffloadedCache]:
    if isinstance(kv, OffloadedCache):
        return [kv]
    return [kv.self_attention_cache, kv.cross_attention_cache]


def _close(kv, m) -> None:
    for part in _offloaded_parts(kv):
        part.close()
    m.synchronize()
    st = m.stats()
    assert st["live_handles"] == 0 and [t["used"] for t in st["tiers"]] == [0] * len(st["tiers"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_default_cache(arch, mode, manager):
    model = hf_models.model(arch)
    enc_dec = model.config.is_encoder_decoder
    batch = {"greedy_padded": 3, "crop": 1}.get(mode, 2)  # assisted decoding: batch 1 only
    inputs = hf_models.prompts(batch, 7, seed=len(arch), padded=mode == "greedy_padded")
    kv = offloaded_cache_for(model, manager, prefetch=True)  # the prefetch path too (CPU: off by default)
    if mode in ("greedy_padded", "dict_scores", "beam", "sample_seeded"):
        kw = {"greedy_padded": {}, "dict_scores": {"output_logits": True},
              "beam": {"num_beams": 3, "num_return_sequences": 2},
              "sample_seeded": {"do_sample": True, "top_k": 20, "temperature": 0.8}}[mode]
        seed = 11 if mode == "sample_seeded" else None
        ref = _gen(model, inputs, None, seed, **kw)
        _assert_same(_gen(model, inputs, kv, seed, **kw), ref)
    elif mode == "two_turn":
        ref_kv = _default_cache(model)
        ref1, out1 = _gen(model, inputs, ref_kv), _gen(model, inputs, kv)
        _assert_same(out1, ref1)
        # The second turn feeds the whole conversation; the caches hold all but its new part.
        more = hf_models.prompts(2, 3, seed=99)["input_ids"]
        if enc_dec:  # the decoder goes on from its own output
            turn2 = {**inputs, "decoder_input_ids": torch.cat([ref1.sequences, more], -1)}
        else:
            ids = torch.cat([ref1.sequences, more], -1)
            turn2 = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        _assert_same(_gen(model, turn2, kv), _gen(model, turn2, ref_kv))
    else:  # crop
        if enc_dec or getattr(model, "_is_stateful", False):
            # No assisted decoding for encoder-decoder or stateful models: crop by hand,
            # recording the past so that linear-attention layers can be cropped too.
            ref_kv = _default_cache(model)
            kv.activate_past_recording()
            ref_kv.activate_past_recording()
            _assert_same(_gen(model, inputs, kv), _gen(model, inputs, ref_kv))
            length = ref_kv.get_seq_length()
            try:
                ref_kv.crop(-2)
            except TypeError as e:  # transformers 5.20's own crop of nemotron_h's conv states
                with pytest.raises(type(e)):  # the same refusal, not another error
                    kv.crop(-2)
            else:
                kv.crop(-2)
                assert kv.get_seq_length() == ref_kv.get_seq_length() == length - 2
                _assert_same_layers(kv, ref_kv)
        else:  # prompt-lookup decoding crops the cache after each rejected candidate
            rep = {k: torch.cat([v, v, v], -1) for k, v in inputs.items()}
            kw = {"prompt_lookup_num_tokens": 3}
            _assert_same(_gen(model, rep, kv, **kw), _gen(model, rep, None, **kw))
    assert any(part.stats()["bytes_offloaded"] > 0 or arch == "mistral"
               for part in _offloaded_parts(kv))  # mistral: every layer slides (resident)
    _close(kv, manager)


def _solo(model, request, seed):
    kw = {k: v for k, v in request.items()}
    return _gen(model, kw, None, seed)


@pytest.mark.parametrize("policy", ["fair", "rr"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_many_matches_solo(arch, policy, manager):
    """Three requests (a padded batch, a seeded sampled one, a beam search) time-sliced with a
    zero quantum (a preemption at every token) give each the tokens and scores of running
    alone with the default cache."""
    model = hf_models.model(arch)
    padded = hf_models.prompts(2, 6, seed=1, padded=True)
    requests = [padded,
                {**hf_models.prompts(1, 5, seed=2), "do_sample": True, "top_k": 20},
                {**hf_models.prompts(1, 4, seed=3), "num_beams": 2}]
    seeds = [None, 5, None]
    want = [_solo(model, r, s) for r, s in zip(requests, seeds)]
    slicer = aq.TimeSlicer(quantum_ms=0, manager=manager, policy=policy)
    queued = transformers.StoppingCriteriaList([AllQueued(slicer, len(requests))])
    requests = [{**r, "stopping_criteria": queued} for r in requests]  # (preemptions, below)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        results = run_with_timeout(lambda: generate_many(
            model, requests, slicer=slicer, cache_factory=OffloadedCache, seeds=seeds,
            max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
            output_scores=True))
    for r, w in zip(results, want):
        _assert_same(r.output, w)
        assert r.new_tokens == NEW  # counted on the decoder's side for encoder-decoders
    assert sum(r.preemptions for r in results) > 0
    slicer.close()
    manager.synchronize()
    assert manager.stats()["live_handles"] == 0
