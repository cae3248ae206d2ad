"""OffloadedCache and generate_many on a real GPU (streams, peer and host tiers). Marked `cuda`:
skipped with a reason on a machine without a GPU."""

from __future__ import annotations

import gc

import pytest
import torch

import aqua_offload as aq

pytestmark = pytest.mark.cuda
transformers = pytest.importorskip("transformers")

from aqua_offload.hf import OffloadedCache, cache_kwarg, generate_many  # noqa: E402
from conftest import AllQueued  # noqa: E402

DEV = "cuda:0"


@pytest.fixture(params=["host", "same-device-peer"])
def gpu_manager(request):
    peers = None if request.param == "host" else [0]
    m = aq.OffloadManager(DEV, peers=peers, peer_bytes="256MiB", host_bytes="256MiB")
    yield m
    m.close()


def _model(sliding: bool):
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if sliding:
        cfg = transformers.Qwen2Config(**common, sliding_window=8, use_sliding_window=True,
                                       max_window_layers=2)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model = model.to(DEV, torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _no_leak(m: aq.OffloadManager) -> None:
    torch.cuda.synchronize()
    st = m.stats()
    assert [t["used"] for t in st["tiers"]] == [0] * len(st["tiers"])
    assert st["live_handles"] == 0 and st["prefetched_bytes"] == 0


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("offload_sliding", [False, True])
def test_greedy_tokens_match_on_gpu(gpu_manager, sliding, offload_sliding):
    model = _model(sliding)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (3, 37), generator=g).to(DEV)
    ref = model.generate(ids, max_new_tokens=40, do_sample=False)
    with OffloadedCache(gpu_manager, config=model.config, offload_sliding=offload_sliding) as c:
        out = model.generate(ids, max_new_tokens=40, do_sample=False, **{cache_kwarg(): c})
        assert torch.equal(out, ref)
        assert c.stats()["offloaded_layers"] > 0
    _no_leak(gpu_manager)


def test_generate_many_time_sliced_on_gpu(gpu_manager):
    model = _model(False)
    g = torch.Generator().manual_seed(2)
    reqs = [torch.randint(1, 512, (1, 20 + 9 * i), generator=g).to(DEV) for i in range(4)]
    solo = [model.generate(r, max_new_tokens=24, do_sample=False) for r in reqs]
    for cache in (None, lambda: OffloadedCache(gpu_manager, config=model.config)):
        slicer = aq.TimeSlicer(quantum_ms=0, manager=gpu_manager, policy="rr")
        queued = transformers.StoppingCriteriaList([AllQueued(slicer, len(reqs))])
        res = generate_many(model, reqs, slicer=slicer, cache_factory=cache, max_new_tokens=24,
                            do_sample=False, stopping_criteria=queued)  # (preemptions)
        slicer.close()
        assert all(torch.equal(r.sequences, s) for r, s in zip(res, solo))
        assert sum(r.preemptions for r in res) > 0
        del res
        gc.collect()
        _no_leak(gpu_manager)
