"""The state walker and the time slicer on a real transformers Cache (transformers is optional
for the package; the test extra installs it)."""

from __future__ import annotations

import threading

import pytest
import torch

import aqua_offload as aq
from aqua_offload.state import collect_tensors
from conftest import AllQueued

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def kv(cache):
    """The cache under the keyword this transformers' forward wants (cache= from 5.24)."""
    from aqua_offload.hf import cache_kwarg

    return {cache_kwarg(): cache}


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_dynamic_cache_tensors_are_found():
    model = tiny_llama()
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 8)), **kv(cache), use_cache=True)
    found = collect_tensors(cache, torch.device("cpu"))
    # one key and one value tensor per layer, (batch, kv heads, tokens, head dim)
    assert len(found) == 4 and all(t.shape == (1, 2, 8, 16) for t in found)


def test_time_sliced_decoding_gives_the_same_tokens():
    """Two decoding loops on one shared model, time-sliced with a yield point per forward and
    their caches paged out at every preemption, produce exactly the tokens of running alone."""
    model = tiny_llama()
    prompts = [torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(k))
               for k in range(2)]

    def decode(prompt, steps=12):
        cache = transformers.DynamicCache()
        ids = prompt
        with torch.no_grad():
            logits = model(ids, **kv(cache), use_cache=True).logits
            out = []
            for _ in range(steps):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt))
                logits = model(nxt, **kv(cache), use_cache=True).logits
        return out

    alone = [decode(p) for p in prompts]
    m = aq.OffloadManager("cpu", peer_bytes="2MiB", host_bytes="8MiB")
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="rr")
    # The first to hold the turn waits there until the other queues (generate would call it as
    # a stopping criterion): a zero quantum then preempts whatever the load, where the first
    # loop could otherwise finish before the second thread entered its slice.
    queued = AllQueued(ts, 2)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(k):
        try:
            cache = transformers.DynamicCache()
            with ts.slice(state=cache, name=f"req-{k}", hooks=model):
                ids = prompts[k]
                out = []
                with torch.no_grad():
                    logits = model(ids, **kv(cache), use_cache=True).logits
                    for _ in range(12):
                        nxt = logits[:, -1].argmax(-1, keepdim=True)
                        out.append(int(nxt))
                        queued(nxt, logits)
                        logits = model(nxt, **kv(cache), use_cache=True).logits
                results[k] = out
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[0], results[1]] == alone
    st = ts.stats()
    assert st["preemptions"] > 0 and st["bytes_paged_out"] == st["bytes_paged_in"] > 0
    m.synchronize()
    assert m.stats()["live_handles"] == 0
