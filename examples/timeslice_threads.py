"""Several workloads (threads) time-share one device under a TimeSlicer; print the schedule.

Each workload owns some state (a list of tensors standing in for a KV cache), arrives at its
own time, and runs a loop of matmuls with ``s.checkpoint()`` after every step. Two long
workloads arrive first, two short ones a little later. Under ``fcfs`` the short ones wait for
the long ones to finish; under ``fair`` they start at once, while the long ones are preempted
and their state is paged out and back in. At the end every cache is compared bitwise with the
same workload run alone, without time slicing.

    python examples/timeslice_threads.py [--device cuda:0|cpu] [--policy compare|fcfs|fair|rr]
                                         [--quantum-ms 2]

Without a GPU this runs on the emulation backend (CPU tensors, emulated peer and host tiers).
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass

import torch

import aqua_offload as aq


@dataclass(frozen=True)
class Workload:
    name: str
    arrival_s: float  # after the start of the run
    steps: int
    weight: float = 1.0


WORKLOADS = [
    Workload("long-A", 0.000, 80),
    Workload("long-B", 0.005, 80),
    Workload("short-C", 0.020, 4),
    Workload("short-D", 0.040, 4),
]
LAYERS, SEQ, DIM = 4, 64, 256


def make_cache(seed: int, device: torch.device) -> list[torch.Tensor]:
    """A KV cache: one key and one value tensor per layer."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SEQ, DIM, generator=g).to(device) for _ in range(2 * LAYERS)]


def step(cache: list[torch.Tensor], weight: torch.Tensor, i: int) -> None:
    """One "decoding step": a few matmuls reading the cache, then an in-place cache write."""
    h = cache[(2 * i) % len(cache)]
    for _ in range(3):
        h = torch.tanh(h @ weight)
    for layer in range(LAYERS):
        cache[2 * layer][i % SEQ].copy_(h[layer])          # keys
        cache[2 * layer + 1][i % SEQ].copy_(h[-1 - layer])  # values


def sync(device: torch.device) -> None:
    # So that the schedule shows when kernels ran, not when they were enqueued.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_caches(device: torch.device, weight: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every workload run alone, without time slicing: what the caches must end up as."""
    out = {}
    for k, w in enumerate(WORKLOADS):
        cache = make_cache(k, device)
        for i in range(w.steps):
            step(cache, weight, i)
        sync(device)
        out[w.name] = [t.cpu() for t in cache]
    return out


def run(policy: str, device: torch.device, quantum_ms: float, m: aq.OffloadManager,
        weight: torch.Tensor) -> tuple[dict, list[tuple[float, str, str]], dict]:
    """Run every workload in its own thread; return the slicer's stats, the event log and the
    final caches."""
    slicer = aq.TimeSlicer(quantum_ms=quantum_ms, manager=m, policy=policy)
    log: list[tuple[float, str, str]] = []
    log_lock = threading.Lock()
    caches: dict[str, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    t0 = time.monotonic() + 0.01  # the common start, a moment after every thread exists

    def event(name: str, what: str) -> None:
        with log_lock:
            log.append((time.monotonic() - t0, name, what))

    def worker(k: int, w: Workload) -> None:
        try:
            cache = make_cache(k, device)
            caches[w.name] = cache
            time.sleep(max(0.0, t0 + w.arrival_s - time.monotonic()))
            event(w.name, "arrive")
            with slicer.slice(state=cache, name=w.name, weight=w.weight) as s:
                event(w.name, "run")
                for i in range(w.steps):
                    step(cache, weight, i)
                    sync(device)
                    before = s.preemptions
                    event(w.name, "pause")
                    s.checkpoint()  # may page the cache out, wait for a turn, page it back in
                    if s.preemptions != before:  # it was preempted: a new turn starts
                        event(w.name, "run")
                event(w.name, "done")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k, w), name=w.name, daemon=True)
               for k, w in enumerate(WORKLOADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        if t.is_alive():
            raise RuntimeError(f"workload {t.name} did not finish (deadlock?)")
    if errors:
        raise errors[0]
    slicer.close()
    return slicer.stats(), sorted(log), caches


def turns(log: list[tuple[float, str, str]]) -> list[tuple[str, float, float]]:
    """(name, start, end) of every turn, from the event log: a turn starts at a "run" event and
    ends at the last "pause" before the slice's next "run" (it was preempted there) or at
    "done"."""
    out: list[tuple[str, float, float]] = []
    start: dict[str, float] = {}
    last_pause: dict[str, float] = {}
    for t, name, what in log:
        if what == "run":
            if name in start:
                out.append((name, start[name], last_pause[name]))
            start[name] = t
        elif what == "pause":
            last_pause[name] = t
        elif what == "done":
            out.append((name, start.pop(name), t))
    return sorted(out, key=lambda x: x[1])


def print_schedule(log: list[tuple[float, str, str]], width: int = 72) -> None:
    segments = turns(log)
    end = max(t for t, _, _ in log)
    arrive = {name: t for t, name, what in log if what == "arrive"}
    done = {name: t for t, name, what in log if what == "done"}
    col = end / width
    print(f"  schedule ('#' running, '.' waiting; one column = {col * 1e3:.2f} ms):")
    for w in WORKLOADS:
        row = []
        for c in range(width):
            lo, hi = c * col, (c + 1) * col
            if any(n == w.name and s < hi and e > lo for n, s, e in segments):
                row.append("#")
            elif arrive[w.name] < hi and done[w.name] > lo:
                row.append(".")
            else:
                row.append(" ")
        print(f"  {w.name:>8} |{''.join(row)}|")
    shown = segments if len(segments) <= 16 else segments[:12]
    print("  turns: " + ", ".join(f"{n} {s * 1e3:.1f}-{e * 1e3:.1f}ms" for n, s, e in shown)
          + (f", ... ({len(segments)} turns in all)" if len(shown) < len(segments) else ""))


def print_table(stats: dict, log: list[tuple[float, str, str]]) -> None:
    done = {name: t for t, name, what in log if what == "done"}
    print(f"  {'slice':>8} {'weight':>6} {'arrive':>8} {'1st run':>8} {'wait':>8} {'run':>8} "
          f"{'finish':>8} {'preempt':>7} {'paged out':>10} {'paged in':>10}")
    by_name = {s["name"]: s for s in stats["slices"]}
    for w in WORKLOADS:
        s = by_name[w.name]
        print(f"  {w.name:>8} {s['weight']:>6.1f} {w.arrival_s * 1e3:>6.1f}ms "
              f"{s['time_to_first_run_s'] * 1e3:>6.1f}ms {s['wait_s'] * 1e3:>6.1f}ms "
              f"{s['run_s'] * 1e3:>6.1f}ms {done[w.name] * 1e3:>6.1f}ms {s['preemptions']:>7} "
              f"{aq.format_size(s['bytes_paged_out']):>10} {aq.format_size(s['bytes_paged_in']):>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda:N or cpu (default: GPU if any)")
    parser.add_argument("--policy", default="compare", choices=["compare", "fcfs", "fair", "rr"],
                        help="scheduling policy; 'compare' runs fcfs, then fair (default)")
    parser.add_argument("--quantum-ms", type=float, default=2.0, help="time slice (default 2)")
    args = parser.parse_args(argv)

    device = torch.device(args.device if args.device else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        # Small matmuls: one intra-op thread. More only contend with the emulation's copy
        # workers, and OpenMP barriers stall whenever another process takes a core.
        torch.set_num_threads(1)
    policies = ["fcfs", "fair"] if args.policy == "compare" else [args.policy]
    weight = (torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(99)) / DIM ** 0.5
              ).to(device)
    expected = reference_caches(device, weight)

    ok = True
    summary = []
    with aq.OffloadManager(device, peer_bytes="16MiB", host_bytes="64MiB") as m:
        label = " (EMULATION: host memory standing in for GPUs)" \
            if m.stats()["backend"] == "emulation" else ""
        print(f"device {device}{label}, quantum {args.quantum_ms} ms, "
              f"{len(WORKLOADS)} workloads, cache {aq.format_size(2 * LAYERS * SEQ * DIM * 4)} each")
        for policy in policies:
            stats, log, caches = run(policy, device, args.quantum_ms, m, weight)
            print(f"\npolicy {policy}: {stats['preemptions']} preemptions, "
                  f"{aq.format_size(stats['bytes_paged_out'])} paged out, "
                  f"{aq.format_size(stats['bytes_paged_in'])} paged in")
            print_schedule(log)
            print_table(stats, log)
            for name, cache in caches.items():
                if any(aq.is_offloaded(t) for t in cache):
                    print(f"  ERROR: {name}'s cache is still paged out")
                    ok = False
                elif not all(torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
                             for a, b in zip(cache, expected[name])):
                    print(f"  ERROR: {name}'s cache differs from running it alone")
                    ok = False
            if ok:
                print("  every cache is bitwise identical to running its workload alone")
            short = [s["time_to_first_run_s"] for s in stats["slices"]
                     if s["name"].startswith("short")]
            makespan = max(t for t, _, what in log if what == "done")
            summary.append((policy, sum(short) / len(short), makespan))
        m.synchronize()
        if m.stats()["live_handles"] != 0:
            print("ERROR: the manager still holds handles")
            ok = False

    if len(summary) > 1:
        print()
        for policy, ttfr, makespan in summary:
            print(f"{policy:>5}: short workloads start after {ttfr * 1e3:6.1f} ms on average; "
                  f"all done after {makespan * 1e3:6.1f} ms")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
