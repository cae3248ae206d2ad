"""The simulated server: preemption, admission control, paging tiers and reclaim, by hand."""

from __future__ import annotations

import dataclasses

import pytest

from aqua_offload.errors import InvalidArgumentError
from aqua_offload.sim.engine import EventEngine
from aqua_offload.sim.roofline import FixedStep, ModelSpec
from aqua_offload.sim.scenario import (GPUConfig, LinkSpec, ReclaimSpec, Scenario, TraceSpec,
                                       load_scenario)
from aqua_offload.sim.server import Server
from aqua_offload.sim.serving import Request, ServingEngine
from aqua_offload.sim.simulate import configurations, simulate
from aqua_offload.sim.trace import TraceRequest


def one_gpu(step_s=0.010, state=1_000_000, kv=0, memory=1 << 40, quantum_s=0.015,
            prefetch=False, max_batch=1, bw=1e9):
    model = ModelSpec("m", 0.0, 0, kv, state, step_s)
    gpu = GPUConfig(0, memory, "m", max_batch=max_batch)
    return Scenario("t", (gpu,), {"m": model}, (TraceSpec("burst"),),
                    links=LinkSpec(bw, 0.0, bw, 0.0), quantum_s=quantum_s, prefetch=prefetch)


def reqs(*specs):
    return [TraceRequest(t, p, o, "m") for t, p, o in specs]


def test_a_preemption_computed_by_hand():
    # A (3 steps) and B (2 steps) arrive at 0; steps 10 ms, quantum 15 ms, state 1 MB at
    # 1 GB/s (1 ms per copy), round robin, no prefetch.
    # A: 0-10 (first token), 10-20, yields (20 >= 15, B waits): page-out 20-21.
    # B: 20-30 (first token), 30-40 done. A granted at 40: page-in 40-41, runs 41-51.
    r = simulate(one_gpu(), "rr", "host", reqs((0, 1, 3), (0, 1, 2)), record_turns=True)
    a, b = r.requests
    assert (a.ttft_s, b.ttft_s) == (pytest.approx(0.010), pytest.approx(0.030))
    assert (a.done_s, b.done_s) == (pytest.approx(0.051), pytest.approx(0.040))
    assert (a.preemptions, b.preemptions) == (1, 0)
    assert a.stall_s == pytest.approx(0.001)
    assert r.paged_bytes == 2_000_000 and r.paging_s == pytest.approx(0.002)
    assert r.throughput_tok_s == pytest.approx(5 / 0.051)
    assert r.turns[0] == [0, 0, 1, 1, 0]


def test_prefetch_hides_the_page_in():
    # Same, with prefetch: A's page-in starts when B runs (after A's page-out lands at 21),
    # so A resumes at 40 and ends at 50.
    r = simulate(one_gpu(prefetch=True), "rr", "host", reqs((0, 1, 3), (0, 1, 2)))
    a, _ = r.requests
    assert a.done_s == pytest.approx(0.050) and a.stall_s == pytest.approx(0.0)


def test_admission_control_queues_until_kv_memory_is_free():
    # KV fits one request at a time: (10 + 5) tokens x 1000 B = 15 kB of 22.5 kB.
    sc = one_gpu(state=0, kv=1000, memory=22_500, max_batch=8, quantum_s=0.02)
    trace = reqs((0, 10, 5), (0, 10, 5))
    adm = simulate(sc, "admission", None, trace)
    a, b = adm.requests
    assert a.ttft_s == pytest.approx(0.010)
    assert b.ttft_s == pytest.approx(0.060)  # waits for A's 5 iterations, then prefills
    assert adm.paged_bytes == 0
    # Time slicing admits B by paging A out after its quantum: B's first token comes sooner.
    fair = simulate(sc, "fair", "host", trace)
    assert fair.requests[1].ttft_s < 0.060
    assert fair.preemptions >= 1 and fair.paged_out_bytes == fair.paged_in_bytes > 0


def test_fcfs_policy_reproduces_admission_control():
    sc = load_scenario("long-prompt")
    trace = sc.trace()[:120]
    adm, fcfs = simulate(sc, "admission", None, trace), simulate(sc, "fcfs", None, trace)
    assert adm.ttft_s == fcfs.ttft_s and adm.throughput_tok_s == fcfs.throughput_tok_s
    assert fcfs.preemptions == 0


def test_peer_tier_pages_faster_than_host():
    sc = load_scenario("long-prompt")
    trace = sc.trace()[:150]
    host, peer = simulate(sc, "fair", "host", trace), simulate(sc, "fair", "peer", trace)
    per_byte = [r.paging_s / r.paged_bytes for r in (host, peer)]
    assert per_byte[1] < per_byte[0] / 3  # NVLink 370 GB/s vs PCIe 55 GB/s
    assert peer.stall_s < host.stall_s


def _lender_scenario(reclaim_at=None):
    model = ModelSpec("m", 1e9, 2_000_000_000, 2_000_000)
    gpus = (GPUConfig(0, 12_000_000_000, "m", max_batch=64),
            GPUConfig(1, 80_000_000_000, None, lends_bytes=8_000_000_000))
    reclaims = () if reclaim_at is None else (ReclaimSpec(1, reclaim_at, None),)
    trace = (TraceSpec("burst", requests=60, prompt_tokens=(200, 400), output_tokens=64),)
    return Scenario("r", gpus, {"m": model}, trace, reclaims=reclaims, quantum_s=0.05)


def test_reclaim_mid_run_moves_pages_to_host_and_loses_nothing():
    base = simulate(_lender_scenario(), "fair", "peer")
    assert base.migrated_bytes == 0 and base.paged_out_bytes > 0
    r = simulate(_lender_scenario(reclaim_at=0.3), "fair", "peer")
    assert r.migrated_bytes > 0
    assert all(q.done_s is not None and q.generated == q.output for q in r.requests)
    assert r.paged_out_bytes == r.paged_in_bytes  # every byte paged out came back
    assert r.placed_end_bytes == 0


def test_paged_bytes_with_a_reclaim_by_hand():
    # test_a_preemption_computed_by_hand on the peer tier of a lender (1 GB/s both links):
    # A's 1 MB lands on GPU 1 at 21 ms; GPU 1 reclaims at 25 ms: migration 25-26 ms over its
    # PCIe; A's page-in at 40 ms reads from the host: 40-41 ms. Three 1 MB copies.
    sc = dataclasses.replace(
        one_gpu(), gpus=(GPUConfig(0, 1 << 40, "m", max_batch=1),
                         GPUConfig(1, 1 << 40, None, lends_bytes=10**7)),
        reclaims=(ReclaimSpec(1, 0.025, None),))
    r = simulate(sc, "rr", "peer", reqs((0, 1, 3), (0, 1, 2)))
    assert (r.paged_out_bytes, r.paged_in_bytes, r.migrated_bytes) == (10**6,) * 3
    assert r.paged_bytes == 3_000_000 and r.paging_s == pytest.approx(0.003)
    assert r.fallback_bytes == 0 and r.requests[0].done_s == pytest.approx(0.051)


def test_paging_s_leaves_out_queueing_on_the_stream():
    # Two 1 MB page-outs to host at 1 GB/s on one stream: 0-1 ms and 1-2 ms. Each counts from
    # the moment the stream issues it: 2 ms in all, not 1 + 2 = 3 ms.
    sim = EventEngine()
    server = Server(sim, (GPUConfig(0, 1 << 40, "m"),), LinkSpec(1e9, 0.0, 1e9, 0.0))
    done = []
    for _ in range(2):
        server.page_out(0, 10**6, "host", lambda: done.append(sim.now))
    sim.run()
    assert done == [pytest.approx(0.001), pytest.approx(0.002)]
    assert server.paging_s == pytest.approx(0.002)


def _reclaim_server(lent=4000):
    sim = EventEngine()
    gpus = (GPUConfig(0, 1 << 40, "m"), GPUConfig(1, 1 << 40, None, lends_bytes=lent))
    server = Server(sim, gpus, LinkSpec(1e3, 0.0, 1e6, 0.0))
    ps = [server.page_out(0, 1000, "peer") for _ in range(4)]
    sim.run(until=0.1)  # all four have landed on GPU 1 (4 ms over NVLink)
    assert all(p.ready and p.tier == "peer" for p in ps)
    return sim, server, ps


def test_reclaims_do_not_migrate_what_is_already_leaving():
    # 4 x 1000 B on a 4000 B loan. Two reclaims of 1000 B: 1000 B must go each time; the
    # first migration is still running (1 s over a 1 kB/s PCIe) when the second comes.
    sim, server, _ = _reclaim_server()
    assert server.reclaim(1, 1000) == 1000
    assert server.reclaim(1, 1000) == 1000  # not 2000: the first placement is leaving
    sim.run()
    pool = server.pools[1]
    assert server.migrated_bytes == 2000 and pool.capacity == pool.used == 2000
    # a placement being paged in frees itself: a reclaim of its size migrates nothing
    sim, server, ps = _reclaim_server()
    server.page_in(ps[0], 0, lambda: None)
    assert server.reclaim(1, 1000) == 0
    sim.run()
    assert server.migrated_bytes == 0 and server.pools[1].used == 3000


def test_a_gpu_that_serves_and_lends_never_pages_into_itself():
    sim = EventEngine()
    gpus = (GPUConfig(0, 1 << 40, "m", lends_bytes=10_000),
            GPUConfig(1, 1 << 40, None, lends_bytes=1000))
    server = Server(sim, gpus, LinkSpec())
    p = server.page_out(0, 800, "peer")  # GPU 0's own loan has more room, but it is its own
    assert (p.tier, p.lender) == ("peer", 1)
    assert server.page_out(0, 800, "peer").tier == "host"  # GPU 1 is full: host, not GPU 0
    assert server.pools[0].used == 0 and server.fallback_bytes == 800
    assert server.page_out(1, 800, "peer").lender == 0  # others may use GPU 0's loan


def test_a_stale_prefetch_is_paged_out_so_the_head_can_run():
    # Under fair a newcomer gets ahead of a request that was prefetched (its KV reserved);
    # the newcomer does not fit next to that reservation and nothing running frees memory.
    # This trace deadlocked ("simulation ended with 4 unfinished requests"); the stale
    # prefetch is now paged out again, and every request finishes.
    model = ModelSpec("m", 0.0, 0, 1000, 500, 0.01)
    sc = Scenario("d", (GPUConfig(0, 34_000, "m", max_batch=1),), {"m": model},
                  (TraceSpec("burst"),), links=LinkSpec(1e7, 0.0, 5e7, 0.0), quantum_s=0.01,
                  prefetch=True)
    trace = [TraceRequest(a, p, o, "m", w) for a, p, o, w in [
        (0.0003, 11, 4, 1.0), (0.038, 8, 7, 3.5), (0.094, 11, 5, 1.0), (0.119, 2, 7, 2.0),
        (0.132, 14, 6, 1.0), (0.136, 6, 1, 1.0)]]
    for tier in ("host", "peer"):
        r = simulate(sc, "fair", tier, trace)
        assert all(q.done_s is not None and q.generated == q.output for q in r.requests)
        assert r.paged_out_bytes == r.paged_in_bytes and r.placed_end_bytes == 0
        assert r.requests[2].preemptions >= 1  # the request that was prefetched, then passed


def test_an_arrival_charges_only_running_requests():
    # max_batch 4, prefill budget 10 tokens, steps 10 ms, quantum 1 s (nobody yields), all
    # prompts 10 tokens. A prefills 0-10 ms; B (arrived at 0, granted mid-iteration) and C
    # (arrives at 5 ms: A is charged 5 ms, C starts at A's virtual runtime, 5 ms) join at
    # 10 ms: B prefills 10-20 ms, C waits for the prefill budget. D arrives at 15 ms: A and B
    # run and are charged; C holds a turn but does not run: it stays at 5 ms (was 10).
    sim = EventEngine()
    gpu = GPUConfig(0, 1 << 40, "m", max_batch=4, max_prefill_tokens=10)
    model = ModelSpec("m", 0.0, 0, 0, 0, 0.010)
    server = Server(sim, (gpu,), LinkSpec())
    eng = ServingEngine(sim, server, gpu, model, FixedStep(0.010), "fair", "host", 1.0)
    a, b, c, d = (Request(k, t, 10, 5) for k, t in enumerate((0.0, 0.0, 0.005, 0.015)))
    for r in (a, b, c, d):
        sim.schedule_at(r.arrival_s, eng.arrive, r)
    sim.run(until=0.016)
    assert list(eng.prefill) == [c] and eng.prefilling == [b]
    vr = eng.policy.vruntime
    assert (vr(a), vr(b), vr(c)) == (pytest.approx(0.015), pytest.approx(0.005),
                                     pytest.approx(0.005))
    sim.run()  # C is charged from the iteration it joins (20 ms), not from 10 ms
    assert c.first_token_s == pytest.approx(0.030) and c.done_s is not None


def test_reclaim_timing_by_hand():
    # 1 GB paged to the peer over NVLink (10 GB/s: 0.1 s); the lender reclaims at 0.2 s:
    # migration over its PCIe (1 GB/s) 0.2-1.2; a page-in asked at 0.5 waits for it, then
    # reads from host over the consumer's PCIe: 1.2-2.2.
    sim = EventEngine()
    gpus = (GPUConfig(0, 1 << 40, "m"), GPUConfig(1, 1 << 40, None, lends_bytes=2 * 10**9))
    server = Server(sim, gpus, LinkSpec(1e9, 0.0, 10e9, 0.0))
    p = server.page_out(0, 10**9, "peer")
    assert p.tier == "peer" and server.pools[1].used == 10**9
    sim.schedule_at(0.2, server.reclaim, 1, None)
    back = []
    sim.schedule_at(0.5, server.page_in, p, 0, lambda: back.append(sim.now))
    sim.run(until=1.0)
    assert server.pools[1].capacity == 0 and server.pools[1].used == 10**9  # still moving
    sim.run()
    assert back == [pytest.approx(2.2)]
    assert p.tier == "host" and server.pools[1].used == 0
    assert server.migrated_bytes == 10**9 and server.paged_in_bytes == 10**9


def test_peer_falls_back_to_host_when_lent_memory_is_full():
    sim = EventEngine()
    gpus = (GPUConfig(0, 1 << 40, "m"), GPUConfig(1, 1 << 40, None, lends_bytes=1000))
    server = Server(sim, gpus, LinkSpec())
    assert server.page_out(0, 800, "peer").tier == "peer"
    assert server.page_out(0, 800, "peer").tier == "host"
    assert server.fallback_bytes == 800


def test_configurations_and_bad_requests():
    assert configurations(["admission", "fair"], ["host", "peer"]) == [
        ("admission", None), ("fair", "host"), ("fair", "peer")]
    with pytest.raises(InvalidArgumentError):
        configurations(["lottery"])
    with pytest.raises(InvalidArgumentError, match="needs"):  # KV larger than the GPU
        simulate(one_gpu(state=0, kv=1000, memory=5000), "fair", "host", reqs((0, 10, 5)))
    with pytest.raises(InvalidArgumentError, match="tier"):
        simulate(one_gpu(), "fair", None, reqs((0, 1, 2)))


def test_a_model_that_costs_nothing_is_refused_not_infinite_throughput():
    free = dataclasses.replace(one_gpu(), models={"m": ModelSpec("m", 0.0, 0, 0, 0)})
    with pytest.raises(InvalidArgumentError, match="makespan 0"):
        simulate(free, "admission", None, reqs((0, 1, 2)))


def test_paper_burst_runs_in_seconds_and_slicing_beats_admission_on_p99():
    import time
    sc = load_scenario("paper-burst")
    t0 = time.perf_counter()
    res = {(r.policy, r.tier): r for r in
           (simulate(sc, p, t) for p, t in [("admission", None), ("fair", "peer")])}
    assert time.perf_counter() - t0 < 20  # "seconds on a laptop", with slack for a busy CI
    assert res[("fair", "peer")].ttft_p99_s < res[("admission", None)].ttft_p99_s
    assert dataclasses.replace(sc, seed=1).trace() != sc.trace()
