"""Burst benchmark: a burst of generate requests, FCFS vs time-sliced, host vs peer tier.

The AQUA experiment in miniature: ``requests`` prompts arrive at once (or ``spread_s`` apart)
at one model. ``fcfs`` serves them to completion in arrival order, as an engine without
preemption does; ``fair`` time-slices them per token (quantum ``quantum_ms``), paging each
preempted request's KV cache to the peer tier or to the host tier. Every request's tokens are
compared with a solo run. Rows: ``policy``, ``tier`` (None for fcfs: nothing is paged),
``ttft_p50_s``, ``ttft_p99_s``, ``throughput_tok_s``, ``bytes_paged``, ``preemptions``, and
ratios to fcfs in the same run: ``ttft_p99_gain`` (fcfs p99 / this p99; target >= 4) and
``throughput_ratio`` (this / fcfs; target >= 0.9); ``baseline`` is ``"fcfs"`` and ``ratio``
repeats ``ttft_p99_gain``, as in every benchmark's rows.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..manager import OffloadManager
from ..timeslice import TimeSlicer
from .measure import EMULATION_LABEL, VerificationError
from .models import bench_device, build_model, cpu_threads, device_label, random_prompts

__all__ = ["run_burst_benchmark", "format_burst_table", "run_burst_validation",
           "format_burst_validation"]


def run_burst_benchmark(*, model: str | None = None, backend: str = "auto", quick: bool = False,
                        requests: int | None = None, new_tokens: int | None = None,
                        quantum_ms: float = 20.0, spread_s: float = 0.0,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the burst under fcfs, fair+host and fair+peer; returns ``{"device", "backend",
    "label", "model", "config", "rows", "requests"}`` (``requests``: per-request TTFTs).

    Raises
    ------
    VerificationError
        A request generated different tokens than when run alone.
    """
    backend, device = bench_device(backend)
    with cpu_threads(device):  # see cpu_threads: one intra-op thread on CPU
        return _run_burst(model, backend, device, quick, requests, new_tokens, quantum_ms,
                          spread_s, progress)


def _run_burst(model: str | None, backend: str, device: torch.device, quick: bool,
               requests: int | None, new_tokens: int | None, quantum_ms: float, spread_s: float,
               progress: Callable[[str], None] | None) -> dict[str, Any]:
    from ..hf import generate_many, summarize

    cuda = backend == "cuda"
    lm = build_model(model, device)
    requests = requests or (6 if quick else 16)
    new_tokens = new_tokens or (16 if quick else 64)
    lengths = [(32 if quick or not cuda else 256) * (1 + i % 4) for i in range(requests)]
    prompts = random_prompts(lm, lengths)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    solo = [lm.generate(p, **kwargs) for p in prompts]  # also the warm-up
    peer = device.index if cuda else "emu:1"
    configs = [("fcfs", None), ("fair", "host"), ("fair", "peer")]
    rows, per_request = [], {}
    for policy, tier in configs:
        if progress:
            progress(f"{policy} {tier or ''}".strip())
        peers = [peer] if tier == "peer" else None
        with OffloadManager(device, peers=peers) as m:
            slicer = TimeSlicer(quantum_ms=quantum_ms, manager=m, policy=policy)
            results = generate_many(lm, prompts, slicer=slicer,
                                    arrivals=[i * spread_s for i in range(requests)], **kwargs)
            slicer.close()
        for r, ref in zip(results, solo):
            if not torch.equal(r.sequences, ref):
                raise VerificationError(f"{policy}/{tier}: {r.name} generated different tokens "
                                        "than alone")
        s = summarize(results)
        rows.append({"policy": policy, "tier": tier, "ttft_p50_s": s["ttft_p50_s"],
                     "ttft_p99_s": s["ttft_p99_s"], "throughput_tok_s": s["throughput_tok_s"],
                     "makespan_s": s["makespan_s"], "bytes_paged": s["bytes_paged"],
                     "preemptions": s["preemptions"]})
        per_request[f"{policy}/{tier}"] = [r.ttft_s for r in results]
    base = rows[0]
    label = device_label(device)
    for r in rows:
        r["ttft_p99_gain"] = base["ttft_p99_s"] / r["ttft_p99_s"]
        r["throughput_ratio"] = r["throughput_tok_s"] / base["throughput_tok_s"]
        r["baseline"], r["ratio"] = "fcfs", r["ttft_p99_gain"]
        r["device"], r["backend"] = label, backend
    return {"device": label, "backend": backend,
            "label": EMULATION_LABEL if backend == "emulation" else None,
            "model": model or ("small" if cuda else "tiny"),
            "config": {"requests": requests, "new_tokens": new_tokens, "prompt_tokens": lengths,
                       "quantum_ms": quantum_ms, "spread_s": spread_s},
            "rows": rows, "requests": per_request}


def format_burst_table(result: dict[str, Any]) -> str:
    lines = [f"*** {result['label']} ***"] if result["label"] else []
    c = result["config"]
    lines.append(f"device: {result['device']}   backend: {result['backend']}   model: "
                 f"{result['model']}   {c['requests']} requests x {c['new_tokens']} tokens, "
                 f"quantum {c['quantum_ms']:g} ms")
    lines.append(f"{'policy':<6} {'tier':<5} {'TTFT p50':>10} {'TTFT p99':>10} {'tok/s':>9} "
                 f"{'paged':>10} {'preempt':>8} {'p99 gain':>9} {'tput':>6}")
    for r in result["rows"]:
        lines.append(f"{r['policy']:<6} {r['tier'] or '-':<5} {r['ttft_p50_s'] * 1e3:>8.1f}ms "
                     f"{r['ttft_p99_s'] * 1e3:>8.1f}ms {r['throughput_tok_s']:>9.1f} "
                     f"{r['bytes_paged'] / 2**20:>7.1f}MiB {r['preemptions']:>8} "
                     f"{r['ttft_p99_gain']:>8.1f}x {r['throughput_ratio']:>6.2f}")
    return "\n".join(lines)


def run_burst_validation(*, backend: str = "auto", quick: bool = False, policy: str = "fair"
                         ) -> dict[str, Any]:
    """``bench burst --validate``: the same small workload through the real
    :class:`~aqua_offload.TimeSlicer` on this machine's backend and through the simulator with
    costs calibrated here (:func:`aqua_offload.sim.validate.validate`); returns its result
    (relative errors of TTFT p50/p99 and throughput, turn orders) plus ``device``, ``backend``,
    ``label`` and ``rows`` for the JSON and plot paths of the other benchmarks."""
    from ..sim.validate import validate

    backend, device = bench_device(backend)
    name = "cpu" if backend == "emulation" else str(device)
    result = validate(quick=quick, policy=policy, device=name)
    label = device_label(device)
    result.update({"device": label, "backend": backend,
                   "label": EMULATION_LABEL if backend == "emulation" else None,
                   "rows": [{"metric": k, "real": result["real"][k], "sim": result["sim"][k],
                             "rel_error": result["rel_error"][k], "device": label,
                             "backend": backend} for k in result["real"]]})
    return result


def format_burst_validation(result: dict[str, Any]) -> str:
    """The validation table, under the emulation label when it ran on the emulation backend."""
    from ..sim.validate import format_validation

    head = [f"*** {result['label']} ***"] if result["label"] else []
    return "\n".join(head + [f"device: {result['device']}", format_validation(result)])
