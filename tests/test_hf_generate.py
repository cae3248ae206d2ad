"""generate_many (aqua_offload.hf): several HF generate requests on one shared model,
time-sliced per token by a TimeSlicer. Acceptance: every request gets exactly the tokens of a
solo ``model.generate``, whatever the policy, arrivals or preemptions; bad arguments fail
before any request starts; a failing request does not hang or break the others."""

from __future__ import annotations

import gc
import math
import threading
import time

import pytest
import torch

import aqua_offload as aq

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import aqua_offload.hf.generate as hf_generate  # noqa: E402
from aqua_offload.hf import GenerateResult, OffloadedCache, generate_many, summarize  # noqa: E402
from conftest import AllQueued, run_with_timeout  # noqa: E402

VOCAB = 320
NEW = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(7)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None  # never stops early: max_new_tokens every time
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture
def manager():
    m = aq.OffloadManager("cpu", peer_bytes="4MiB", host_bytes="16MiB")
    yield m
    m.close()


def ids(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def solo(model, request, n=NEW, **kw):
    kwargs = {"input_ids": request} if isinstance(request, torch.Tensor) else dict(request)
    with torch.no_grad():
        return model.generate(**kwargs, max_new_tokens=n, do_sample=False, **kw)


def assert_no_leak(m: aq.OffloadManager) -> None:
    m.synchronize()
    st = m.stats()
    assert [t["used"] for t in st["tiers"]] == [0] * len(st["tiers"])
    assert st["live_handles"] == 0 and st["prefetched_bytes"] == 0


def assert_consistent(r: GenerateResult, n_new: int) -> None:
    assert r.arrival_s >= 0
    assert 0 < r.ttft_s <= r.latency_s
    assert r.new_tokens == n_new
    assert r.preemptions >= 0 and r.bytes_paged_out >= 0 and r.bytes_paged_in >= 0
    assert r.output is not None


# -- 1. policies: solo tokens, input order, preemptions -----------------------------------
@pytest.mark.parametrize("policy", ["fcfs", "rr", "fair"])
def test_policies_give_solo_tokens_in_input_order(model, manager, policy):
    reqs = [ids(3, 1), ids(9, 2), ids(5, 3), ids(7, 4)]
    names = ["alpha", "beta", "gamma", "delta"]
    want = [solo(model, r) for r in reqs]
    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager, policy=policy)
    queued = transformers.StoppingCriteriaList([AllQueued(slicer, len(reqs))])  # (preemptions)
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, names=names, max_new_tokens=NEW, do_sample=False,
        stopping_criteria=queued))
    assert [r.name for r in results] == names
    for r, w, req in zip(results, want, reqs):
        assert torch.equal(r.sequences, w)
        assert torch.equal(r.sequences[:, : req.shape[-1]], req)
        assert_consistent(r, NEW)
    st = slicer.stats()
    assert sorted(s["name"] for s in st["slices"]) == sorted(names)
    assert all(s["status"] == "done" for s in st["slices"])
    assert sum(r.preemptions for r in results) == st["preemptions"]
    assert sum(r.bytes_paged_out for r in results) == st["bytes_paged_out"]
    if policy == "fcfs":
        assert all(r.preemptions == 0 for r in results)
        assert all(r.bytes_paged_out == 0 == r.bytes_paged_in for r in results)
    else:
        assert st["preemptions"] > 0
        assert st["bytes_paged_out"] > 0  # the parked requests' KV caches were paged out
        assert st["bytes_paged_out"] == st["bytes_paged_in"]  # and all came back
    s = summarize(results)
    assert s["requests"] == 4 and s["tokens"] == 4 * NEW
    assert s["preemptions"] == st["preemptions"]
    assert s["bytes_paged"] == st["bytes_paged_out"] + st["bytes_paged_in"]
    assert_no_leak(manager)
    slicer.close()


class _Recorder(transformers.StoppingCriteria):
    """Records which request made each token (by prompt), in the order the tokens were made;
    never stops anything."""

    def __init__(self, prompts):
        self.prompts = prompts
        self.events: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, input_ids, scores, **kwargs):
        for k, p in enumerate(self.prompts):
            n = p.shape[-1]
            if input_ids.shape[-1] > n and torch.equal(input_ids[:, :n], p):
                with self.lock:
                    self.events.append(k)
                break
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _runs(events: list[int]) -> int:
    return sum(1 for i, e in enumerate(events) if i == 0 or events[i - 1] != e)


@pytest.mark.parametrize("policy", ["fcfs", "rr"])
def test_token_order_follows_the_policy(model, manager, policy):
    """fcfs runs each request to completion (its tokens form one run); rr with a zero
    quantum interleaves them token by token. Only the order is checked, never durations."""
    reqs = [ids(4, 11), ids(6, 12), ids(5, 13)]
    rec = _Recorder(reqs)
    slicer = aq.TimeSlicer(quantum_ms=0, manager=manager, policy=policy)
    queued = AllQueued(slicer, len(reqs))  # every request queued before the first runs on
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, max_new_tokens=NEW, do_sample=False,
        stopping_criteria=transformers.StoppingCriteriaList([queued, rec])))
    assert sorted(rec.events) == sorted(list(range(3)) * NEW)
    if policy == "fcfs":
        assert _runs(rec.events) == 3
        assert all(r.preemptions == 0 for r in results)
    else:
        assert _runs(rec.events) > 3
        assert sum(r.preemptions for r in results) > 0
    for r, req in zip(results, reqs):
        assert torch.equal(r.sequences, solo(model, req))


def test_default_slicer(model):
    """slicer=None: a fair slicer on the default manager of the model's device."""
    reqs = [ids(5, 21), ids(4, 22)]
    results = run_with_timeout(lambda: generate_many(model, reqs, max_new_tokens=12,
                                                     do_sample=False))
    assert [r.name for r in results] == ["req-0", "req-1"]
    for r, req in zip(results, reqs):
        assert torch.equal(r.sequences, solo(model, req, 12))
        assert_consistent(r, 12)


def test_offloaded_cache_requests(model, manager):
    reqs = [ids(6, 31), ids(3, 32)]
    slicer = aq.TimeSlicer(quantum_ms=0, manager=manager, policy="rr")
    queued = transformers.StoppingCriteriaList([AllQueued(slicer, len(reqs))])  # (preemptions)
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, cache_factory=lambda: OffloadedCache(manager, config=model.config),
        max_new_tokens=NEW, do_sample=False, stopping_criteria=queued))
    for r, req in zip(results, reqs):
        assert torch.equal(r.sequences, solo(model, req))
    assert sum(r.preemptions for r in results) > 0
    assert_no_leak(manager)


# -- 2. arrivals -----------------------------------------------------------------------------
def test_late_arrival(model, manager):
    reqs = [ids(5, 41), ids(6, 42)]
    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager, policy="fair")
    t0 = time.monotonic()
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, arrivals=[0.0, 0.2], names=["early", "late"],
        max_new_tokens=NEW, do_sample=False))
    wall = time.monotonic() - t0
    early, late = results
    assert (early.name, late.name) == ("early", "late")
    assert late.arrival_s >= 0.2 - 0.005
    assert early.arrival_s <= late.arrival_s
    for r, req in zip(results, reqs):
        assert torch.equal(r.sequences, solo(model, req))
        assert_consistent(r, NEW)
        # ttft and latency are measured from the request's own arrival: arrival + latency is
        # the end of the request, within the call (measuring from the call's start would
        # count the 0.2 s twice for the late one).
        assert r.arrival_s + r.ttft_s <= r.arrival_s + r.latency_s <= wall + 0.005
    s = summarize(results)
    assert s["makespan_s"] == pytest.approx(
        max(r.arrival_s + r.latency_s for r in results) - early.arrival_s)
    assert s["makespan_s"] >= late.arrival_s - early.arrival_s
    assert s["throughput_tok_s"] == pytest.approx(2 * NEW / s["makespan_s"])
    assert_no_leak(manager)


# -- 3. bad arguments fail before any thread starts ------------------------------------------
class _NoThreads:
    """Stands in for the threading module inside generate.py: creating a thread fails."""

    class Thread:
        def __init__(self, *a, **k):
            raise AssertionError("generate_many created a thread before validating")


class _SpyModel:
    """A model whose generate must never be reached."""

    def __init__(self, real):
        self.config = real.config
        self.device = real.device
        self.calls = 0

    def generate(self, **kw):
        self.calls += 1
        raise AssertionError("generate was called")


@pytest.mark.parametrize("case", [
    "shared_cache", "arrivals_len", "names_len", "weights_len", "negative_arrival",
    "nan_arrival", "inf_arrival", "string_input", "list_input", "none_input",
    "slicer_str", "slicer_object",
    "negative_weight", "nan_weight", "mapping_with_shared_cache", "string_arrival",
    "shared_cache_new_name", "factory_is_instance", "factory_not_callable", "bad_seed",
    "seeds_len", "request_cache_not_a_cache", "both_cache_names"])
def test_bad_arguments_raise_before_threads(model, manager, monkeypatch, case):
    spy = _SpyModel(model)
    good = [ids(4, 51), ids(5, 52)]
    kw: dict = {"max_new_tokens": 4}
    inputs: list = list(good)
    if case == "shared_cache":
        kw["past_key_values"] = transformers.DynamicCache()
    elif case == "arrivals_len":
        kw["arrivals"] = [0.0]
    elif case == "names_len":
        kw["names"] = ["a", "b", "c"]
    elif case == "weights_len":
        kw["weights"] = [1.0]
    elif case == "negative_arrival":
        kw["arrivals"] = [0.0, -0.5]
    elif case == "nan_arrival":
        kw["arrivals"] = [float("nan"), 0.0]
    elif case == "inf_arrival":
        kw["arrivals"] = [0.0, float("inf")]
    elif case == "string_input":
        inputs = [good[0], "hello world"]
    elif case == "list_input":
        inputs = [good[0], [1, 2, 3]]
    elif case == "none_input":
        inputs = [None, good[1]]
    elif case == "slicer_str":
        kw["slicer"] = "fair"
    elif case == "slicer_object":
        kw["slicer"] = object()
    elif case == "negative_weight":
        kw["weights"] = [1.0, -1.0]
    elif case == "nan_weight":
        kw["weights"] = [1.0, float("nan")]
    elif case == "mapping_with_shared_cache":
        shared = transformers.DynamicCache()
        inputs = [{"input_ids": good[0], "cache": shared},
                  {"input_ids": good[1], "past_key_values": shared}]
    elif case == "shared_cache_new_name":  # empty, so falsy: must not be ignored
        kw["cache"] = transformers.DynamicCache()
    elif case == "factory_is_instance":
        kw["cache_factory"] = transformers.DynamicCache()
    elif case == "factory_not_callable":
        kw["cache_factory"] = 3
    elif case == "bad_seed":
        kw["seeds"] = [1, -2]
    elif case == "seeds_len":
        kw["seeds"] = [1]
    elif case == "request_cache_not_a_cache":
        inputs = [good[0], {"input_ids": good[1], "cache": [(1, 2)]}]
    elif case == "both_cache_names":
        inputs = [good[0], {"input_ids": good[1], "cache": transformers.DynamicCache(),
                            "past_key_values": transformers.DynamicCache()}]
    elif case == "string_arrival":
        kw["arrivals"] = [0.0, "soon"]
    monkeypatch.setattr(hf_generate, "threading", _NoThreads)
    with pytest.raises(aq.InvalidArgumentError):
        generate_many(spy, inputs, **kw)
    assert spy.calls == 0
    monkeypatch.undo()
    # and the same call with the bad argument fixed works (the check is specific)
    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager)
    out = run_with_timeout(lambda: generate_many(model, good, slicer=slicer,
                                                 max_new_tokens=4, do_sample=False))
    assert [torch.equal(r.sequences, solo(model, g, 4)) for r, g in zip(out, good)] == [True] * 2


# -- 4. a failing request -----------------------------------------------------------------
class _RaiseOnThirdToken(transformers.StoppingCriteria):
    """Raises in the request whose prompt is ``prompt``, on its 3rd call there; never stops
    any other request."""

    def __init__(self, prompt: torch.Tensor):
        self.prompt = prompt
        self.calls = 0
        self.other_calls = 0
        self.lock = threading.Lock()

    def __call__(self, input_ids, scores, **kwargs):
        p = self.prompt.shape[-1]
        mine = input_ids.shape[-1] > p and torch.equal(input_ids[:, :p], self.prompt)
        with self.lock:
            if mine:
                self.calls += 1
                if self.calls == 3:
                    raise RuntimeError("boom in the user's stopping criterion")
            else:
                self.other_calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
@pytest.mark.parametrize("offloaded", [False, True], ids=["dynamic", "offloaded"])
def test_failing_request_propagates_after_the_others(model, manager, policy, offloaded):
    reqs = [ids(5, 61), ids(7, 62), ids(4, 63)]
    bad = 1
    crit = _RaiseOnThirdToken(reqs[bad])
    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager, policy=policy)
    make = (lambda: OffloadedCache(manager, config=model.config)) if offloaded else None
    with pytest.raises(RuntimeError, match="boom"):
        run_with_timeout(lambda: generate_many(
            model, reqs, slicer=slicer, cache_factory=make, names=["a", "b", "c"],
            stopping_criteria=transformers.StoppingCriteriaList([crit]),
            max_new_tokens=NEW, do_sample=False))
    assert crit.calls == 3
    assert crit.other_calls == 2 * NEW  # the other two requests ran to the end
    status = {s["name"]: s["status"] for s in slicer.stats()["slices"]}
    assert status == {"a": "done", "b": "failed", "c": "done"}
    assert slicer.running is None
    if not offloaded:  # every preempted cache was paged back in
        assert_no_leak(manager)
    # the slicer is still usable: the good requests again, with the same tokens
    good = [reqs[0], reqs[2]]
    results = run_with_timeout(lambda: generate_many(
        model, good, slicer=slicer, cache_factory=make, max_new_tokens=NEW, do_sample=False))
    for r, req in zip(results, good):
        assert torch.equal(r.sequences, solo(model, req))
    slicer.close()
    # Once the slicer is gone, nothing of the failed request is left in the tiers (the test
    # below checks the same while the slicer lives).
    del slicer, results
    gc.collect()
    assert_no_leak(manager)


def test_failed_request_gives_its_offloaded_cache_back(model, manager):
    reqs = [ids(5, 65), ids(7, 66)]
    crit = _RaiseOnThirdToken(reqs[1])
    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager)
    with pytest.raises(RuntimeError, match="boom"):
        run_with_timeout(lambda: generate_many(
            model, reqs, slicer=slicer, cache_factory=lambda: OffloadedCache(manager, config=model.config),
            stopping_criteria=transformers.StoppingCriteriaList([crit]),
            max_new_tokens=NEW, do_sample=False))
    gc.collect()
    assert_no_leak(manager)  # the user's slicer is still alive here


def test_finished_requests_caches_are_not_retained(model, manager):
    import weakref

    refs = []

    def make():
        c = transformers.DynamicCache(config=model.config)
        refs.append(weakref.ref(c))
        return c

    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager)
    run_with_timeout(lambda: generate_many(model, [ids(5, 67), ids(4, 68)], slicer=slicer,
                                           cache_factory=make, max_new_tokens=8, do_sample=False))
    gc.collect()
    assert len(refs) == 2
    assert [r() for r in refs] == [None, None]


def test_failing_request_with_the_default_slicer_does_not_hang(model):
    reqs = [ids(5, 71), ids(6, 72)]
    crit = _RaiseOnThirdToken(reqs[0])
    with pytest.raises(RuntimeError, match="boom"):
        run_with_timeout(lambda: generate_many(
            model, reqs, stopping_criteria=transformers.StoppingCriteriaList([crit]),
            max_new_tokens=12, do_sample=False))
    assert crit.calls == 3 and crit.other_calls == 12


def test_user_stopping_criteria_still_apply(model, manager):
    """A user criterion that stops generation early is honoured (the yield point never stops
    anything itself)."""

    class StopAt(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= 10)

    reqs = [ids(4, 81), ids(6, 82)]
    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager)
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, max_new_tokens=NEW, do_sample=False,
        stopping_criteria=transformers.StoppingCriteriaList([StopAt()])))
    for r, req in zip(results, reqs):
        assert r.sequences.shape[-1] == 10
        assert r.new_tokens == 10 - req.shape[-1]
        assert torch.equal(r.sequences, solo(model, req)[:, :10])


# -- 5. summarize ---------------------------------------------------------------------------
def _result(ttft, arrival, latency, new_tokens, batch=1, pre=0, out=0, inn=0, name="r"):
    return GenerateResult(name=name, sequences=torch.ones(batch, 3 + new_tokens, dtype=torch.long),
                          ttft_s=ttft, latency_s=latency, preemptions=pre,
                          new_tokens=new_tokens, arrival_s=arrival, bytes_paged_out=out,
                          bytes_paged_in=inn)


def test_summarize_hand_computed():
    rs = [_result(0.5, 0.0, 2.0, 10, pre=1, out=100, inn=100),
          _result(0.1, 0.5, 1.0, 20, batch=2, pre=2, out=50, inn=40),
          _result(0.3, 1.0, 3.0, 5),
          _result(0.2, 0.25, 0.5, 8, pre=3),
          _result(0.4, 2.0, 0.5, 7)]
    s = summarize(rs)
    assert s["requests"] == 5
    # ttft sorted: 0.1 0.2 0.3 0.4 0.5; nearest rank: p50 -> ceil(2.5) = 3rd, p99 -> 5th
    assert s["ttft_p50_s"] == 0.3
    assert s["ttft_p99_s"] == 0.5
    # makespan: last end (1.0 + 3.0 = 4.0) minus first arrival (0.0)
    assert s["makespan_s"] == pytest.approx(4.0)
    tokens = 10 + 20 * 2 + 5 + 8 + 7
    assert s["tokens"] == tokens == 70
    assert s["throughput_tok_s"] == pytest.approx(70 / 4.0)
    assert s["preemptions"] == 6
    assert s["bytes_paged"] == 290


def test_summarize_percentile_ranks():
    # 200 requests with ttft 1..200 (shuffled): p50 = 100th, p99 = 198th value
    values = list(range(1, 201))
    order = torch.randperm(200, generator=torch.Generator().manual_seed(3)).tolist()
    rs = [_result(float(values[i]), 1.0, 500.0, 1) for i in order]
    s = summarize(rs)
    assert s["ttft_p50_s"] == 100.0 and s["ttft_p99_s"] == 198.0
    assert s["makespan_s"] == pytest.approx(500.0)  # first arrival is 1.0, not 0
    # one request: every percentile is that request
    one = summarize([_result(0.7, 3.0, 2.0, 4)])
    assert one["ttft_p50_s"] == one["ttft_p99_s"] == 0.7
    assert one["makespan_s"] == pytest.approx(2.0)
    assert one["throughput_tok_s"] == pytest.approx(2.0)
    # 3 requests: p50 = ceil(1.5) = 2nd, p99 = 3rd
    three = summarize([_result(t, 0.0, 1.0, 1) for t in (0.9, 0.1, 0.5)])
    assert (three["ttft_p50_s"], three["ttft_p99_s"]) == (0.5, 0.9)


def test_summarize_zero_makespan_and_empty():
    s = summarize([_result(0.0, 1.0, 0.0, 4)])
    assert s["makespan_s"] == 0 and s["tokens"] == 4
    assert math.isinf(s["throughput_tok_s"]) and s["throughput_tok_s"] > 0
    with pytest.raises(aq.InvalidArgumentError):
        summarize([])


# -- 6. batch inputs -------------------------------------------------------------------------
def test_batch_mapping_input_matches_solo(model, manager):
    batch_ids = ids(7, 91, batch=2)
    mask = torch.ones_like(batch_ids)
    batch_ids[1, :3] = 0  # left padding of the second row
    mask[1, :3] = 0
    reqs = [{"input_ids": batch_ids, "attention_mask": mask}, ids(5, 92)[0]]  # 1-D tensor too
    want = [solo(model, reqs[0]), solo(model, reqs[1].unsqueeze(0))]
    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager, policy="rr")
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, max_new_tokens=NEW, do_sample=False))
    assert results[0].sequences.shape == (2, 7 + NEW)
    for r, w in zip(results, want):
        assert torch.equal(r.sequences, w)
        assert_consistent(r, NEW)
    assert summarize(results)["tokens"] == 3 * NEW
    assert_no_leak(manager)


def test_return_dict_in_generate(model, manager):
    reqs = [ids(5, 101), ids(4, 102)]
    slicer = aq.TimeSlicer(quantum_ms=1, manager=manager)
    results = run_with_timeout(lambda: generate_many(
        model, reqs, slicer=slicer, max_new_tokens=8, do_sample=False,
        return_dict_in_generate=True, output_scores=True))
    for r, req in zip(results, reqs):
        assert torch.equal(r.sequences, solo(model, req, 8))
        assert r.output.sequences is r.sequences
        assert len(r.output.scores) == 8
        assert r.new_tokens == 8
