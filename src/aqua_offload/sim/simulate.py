"""Running a scenario: one simulation per (policy, tier), and the numbers each one yields.

Requests go to the GPUs serving their model in round-robin order of arrival. TTFT is from
arrival to the end of the request's prefill iteration (its first token); percentiles are
nearest-rank (the ceil(q/100 * n)-th smallest value, as :func:`aqua_offload.hf.summarize`);
throughput is output tokens over the makespan (first arrival to last completion).
``paged_bytes`` counts every paging copy (out, in, and reclaim migrations); ``paging_s`` sums
their durations from the moment their stream issues them to completion: latency and flow time
at the bandwidth they get while sharing channels with other streams, but not the time a copy
queued behind earlier copies on its own stream (server.py, Note [Streams]). Copies overlap, so
it can exceed the makespan. ``stall_s`` sums, over resumed turns, the time from the grant to
joining an iteration: waiting for KV memory, the page-in, and the end of the iteration in
flight (:class:`~aqua_offload.sim.serving.ServingEngine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import InvalidArgumentError
from .engine import EventEngine
from .roofline import step_model
from .scenario import POLICIES, TIERS, Scenario
from .server import Server
from .serving import Request, ServingEngine
from .trace import TraceRequest

__all__ = ["RunResult", "simulate", "run_scenario", "configurations", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise InvalidArgumentError("percentile of no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class RunResult:
    """The outcome of one (policy, tier) simulation."""

    policy: str
    tier: str | None
    ttft_s: list[float]           # sorted
    throughput_tok_s: float
    makespan_s: float
    tokens: int
    paged_bytes: int
    paging_s: float
    stall_s: float                # resumed turns: grant to joining a batch (memory, page-in)
    preemptions: int
    migrated_bytes: int
    fallback_bytes: int
    events: int
    paged_out_bytes: int = 0
    paged_in_bytes: int = 0
    placed_end_bytes: int = 0     # still in lent pools at the end (0: all paged back in)
    requests: list[Request] = field(repr=False, default_factory=list)
    turns: dict[int, list[Any]] = field(repr=False, default_factory=dict)

    @property
    def ttft_p50_s(self) -> float:
        return percentile(self.ttft_s, 50)

    @property
    def ttft_p99_s(self) -> float:
        return percentile(self.ttft_s, 99)

    def row(self) -> dict[str, Any]:
        """The JSON result entry (exactly the documented keys)."""
        return {"policy": self.policy, "tier": self.tier, "ttft_p50_s": self.ttft_p50_s,
                "ttft_p99_s": self.ttft_p99_s, "throughput_tok_s": self.throughput_tok_s,
                "paged_bytes": self.paged_bytes, "paging_s": self.paging_s}

    def details(self) -> dict[str, Any]:
        """More numbers of the run (the JSON ``details`` entry)."""
        return {"policy": self.policy, "tier": self.tier, "requests": len(self.ttft_s),
                "tokens": self.tokens, "makespan_s": self.makespan_s,
                "ttft_mean_s": sum(self.ttft_s) / len(self.ttft_s),
                "ttft_max_s": self.ttft_s[-1], "stall_s": self.stall_s,
                "preemptions": self.preemptions, "migrated_bytes": self.migrated_bytes,
                "fallback_bytes": self.fallback_bytes, "paged_out_bytes": self.paged_out_bytes,
                "paged_in_bytes": self.paged_in_bytes, "events": self.events}


def configurations(policies: Sequence[str] = POLICIES,
                   tiers: Sequence[str] = TIERS) -> list[tuple[str, str | None]]:
    """(policy, tier) pairs to run: admission and fcfs never page (tier None); rr and fair
    once per tier."""
    out: list[tuple[str, str | None]] = []
    for p in policies:
        if p not in POLICIES:
            raise InvalidArgumentError(f"unknown policy {p!r} (one of {', '.join(POLICIES)})")
        if p in ("admission", "fcfs"):
            out.append((p, None))
            continue
        for t in tiers:
            if t not in TIERS:
                raise InvalidArgumentError(f"unknown tier {t!r} (one of {', '.join(TIERS)})")
            out.append((p, t))
    return out


def simulate(scenario: Scenario, policy: str, tier: str | None,
             trace: Sequence[TraceRequest] | None = None, *,
             record_turns: bool = False) -> RunResult:
    """Simulate ``scenario`` under one policy (and paging tier); ``trace`` overrides the
    scenario's requests. ``record_turns`` keeps, per GPU, the ids of every iteration's
    requests (the schedule)."""
    if trace is None:
        trace = scenario.trace()
    if not trace:
        raise InvalidArgumentError("simulate: the trace has no requests")
    sim = EventEngine()
    server = Server(sim, scenario.gpus, scenario.links)
    engines: dict[str, list[ServingEngine]] = {}
    for g in scenario.gpus:
        if g.serves:
            model = scenario.models[g.serves]
            engines.setdefault(g.serves, []).append(ServingEngine(
                sim, server, g, model, step_model(scenario.gpu_spec, model), policy, tier,
                scenario.quantum_s, scenario.prefetch, record_turns))
    default = next(iter(engines))
    counters = dict.fromkeys(engines, 0)
    for k, tr in enumerate(trace):
        name = tr.model or default
        if name not in engines:
            raise InvalidArgumentError(f"request {k} targets model {name!r}, which no GPU serves")
        eng = engines[name][counters[name] % len(engines[name])]
        counters[name] += 1
        req = Request(k, tr.arrival_s, tr.prompt_tokens, tr.output_tokens, tr.weight)
        sim.schedule_at(tr.arrival_s, eng.arrive, req)
    for rc in scenario.reclaims:
        sim.schedule_at(rc.at_s, server.reclaim, rc.gpu, rc.nbytes)
    sim.run()
    everyone = [r for group in engines.values() for e in group for r in e.requests]
    unfinished = [r for r in everyone if r.done_s is None]
    if unfinished:  # a bug in the model, never a property of the workload
        raise RuntimeError(f"simulation ended with {len(unfinished)} unfinished requests, "
                           f"e.g. {unfinished[0]!r}")
    first = min(r.arrival_s for r in everyone)
    makespan = max(r.done_s for r in everyone if r.done_s is not None) - first
    tokens = sum(r.output for r in everyone)
    if not makespan > 0:  # every iteration took 0 s: a model that costs nothing
        raise InvalidArgumentError(
            "the run took no simulated time (makespan 0): throughput is undefined; give the "
            "model a nonzero cost (params, weights or step_ms)")
    return RunResult(
        policy=policy, tier=tier,
        ttft_s=sorted(r.ttft_s for r in everyone if r.ttft_s is not None),
        throughput_tok_s=tokens / makespan,
        makespan_s=makespan, tokens=tokens,
        paged_bytes=server.paged_out_bytes + server.paged_in_bytes + server.migrated_bytes,
        paging_s=server.paging_s, stall_s=sum(r.stall_s for r in everyone),
        preemptions=sum(r.preemptions for r in everyone),
        migrated_bytes=server.migrated_bytes, fallback_bytes=server.fallback_bytes,
        events=sim.processed, paged_out_bytes=server.paged_out_bytes,
        paged_in_bytes=server.paged_in_bytes, placed_end_bytes=server.placed_bytes(),
        requests=sorted(everyone, key=lambda r: r.id),
        turns={e.gpu.index: e.turns for g in engines.values() for e in g
               if e.turns is not None})


def run_scenario(scenario: Scenario, policies: Sequence[str] | None = None,
                 tiers: Sequence[str] | None = None) -> list[RunResult]:
    """Every configuration of the scenario (or of the given policies and tiers), in order."""
    trace = scenario.trace()
    return [simulate(scenario, p, t, trace)
            for p, t in configurations(policies or scenario.policies, tiers or scenario.tiers)]
