"""Validation: the real TimeSlicer against the simulator, on the same small workload.

The real side runs one thread per task on the emulation backend (``device="cpu"``, the
default) or on a GPU (``device="cuda:0"``: the host tier is then real pinned memory over PCIe;
``aqua-offload bench burst --validate`` picks the device as every benchmark does): each task
enters ``TimeSlicer.slice`` at its arrival time with a state of a few MiB of random tensors,
does ``steps`` steps of ``step_s`` (a sleep: a stand-in for a kernel that leaves the CPU to the
copy threads) and calls ``checkpoint()`` between steps, so preempted state is really paged out
to the host tier and back. The simulated side is a one-GPU scenario with ``max_batch = 1`` (the
slicer runs one slice at a time), a fixed step time and a host link, both calibrated on this
machine first: the step from timed sleeps, the link from timed ``offload_many``/``fetch_many``
of the same state. Both report TTFT (arrival to the end of the first step; nearest-rank
p50/p99) and throughput (steps over the makespan), and the turn order.

Not modelled (see docs/simulation.md): thread wake-up latency at each switch, Python overhead
in ``checkpoint``, contention of copies with the running task for the CPU.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .roofline import ModelSpec
from .scenario import GPUConfig, LinkSpec, Scenario, TraceSpec
from .simulate import RunResult, percentile, simulate
from .trace import TraceRequest

__all__ = ["ValidationTask", "Calibration", "Measured", "default_workload", "calibrate",
           "run_real", "simulate_workload", "validate", "format_validation", "compress_turns"]


@dataclass(frozen=True)
class ValidationTask:
    """A synthetic workload: arrives at ``arrival_s``, runs ``steps`` steps."""

    name: str
    arrival_s: float
    steps: int
    weight: float = 1.0


@dataclass(frozen=True)
class Calibration:
    """Measured on this machine: one step's real duration, copy bandwidth each way."""

    step_s: float
    out_bytes_per_s: float
    in_bytes_per_s: float


@dataclass
class Measured:
    """What the real slicer did: per-task TTFT (sorted), throughput and the turn order."""

    ttft_s: list[float]
    throughput_steps_s: float
    makespan_s: float
    turns: list[str]
    bytes_paged: int = 0
    per_task: dict[str, float] = field(default_factory=dict)


def default_workload(quick: bool = False) -> list[ValidationTask]:
    """Six tasks (four with ``quick``): a burst of three, then stragglers."""
    tasks = [ValidationTask("t0", 0.0, 8), ValidationTask("t1", 0.0, 6),
             ValidationTask("t2", 0.0, 10), ValidationTask("t3", 0.07, 5),
             ValidationTask("t4", 0.13, 8), ValidationTask("t5", 0.29, 6)]
    return tasks[:4] if quick else tasks


def compress_turns(ids: Sequence[Any]) -> list[Any]:
    """The sequence of turns: consecutive steps of the same task are one turn."""
    out: list[Any] = []
    for x in ids:
        if not out or out[-1] != x:
            out.append(x)
    return out


def _state(nbytes: int, seed: int, device: str = "cpu") -> list[Any]:
    import torch
    g = torch.Generator().manual_seed(seed)
    half = nbytes // 8  # two float32 tensors of nbytes / 2 each: never zeros
    return [(torch.rand(half, generator=g) + 1.0).to(device),
            (torch.rand(half, generator=g) + 1.0).to(device)]


def calibrate(state_bytes: int, step_s: float, samples: int = 5,
              device: str = "cpu") -> Calibration:
    """Time ``samples`` sleeps of ``step_s`` and offload/fetch round trips of a state of
    ``state_bytes`` on ``device`` (``"cpu"``: the emulation backend; ``"cuda:N"``: the host
    tier over PCIe) (medians)."""
    from ..manager import OffloadManager
    steps = []
    for _ in range(samples):
        t0 = time.perf_counter()
        time.sleep(step_s)
        steps.append(time.perf_counter() - t0)
    outs, ins = [], []
    with OffloadManager(device, peers=None, host_bytes=max(4 * state_bytes, 1 << 20)) as m:
        state = _state(state_bytes, 0, device)
        for _ in range(samples):
            t0 = time.perf_counter()
            hs = m.offload_many(state, release=True)
            m.synchronize()
            t1 = time.perf_counter()
            m.fetch_many(hs)
            _sync(device)
            t2 = time.perf_counter()
            outs.append(t1 - t0)
            ins.append(t2 - t1)
    nbytes = sum(t.numel() * t.element_size() for t in state)
    return Calibration(statistics.median(steps), nbytes / statistics.median(outs),
                       nbytes / statistics.median(ins))


def _sync(device: str) -> None:
    """Wait for the device's streams (a fetch returns before a GPU copy lands)."""
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize(device)


def run_real(tasks: Sequence[ValidationTask], *, step_s: float, quantum_s: float,
             policy: str = "fair", state_bytes: int = 4 << 20, timeout_s: float = 60.0,
             device: str = "cpu") -> Measured:
    """Run ``tasks`` as threads under a real :class:`~aqua_offload.TimeSlicer` (host tier; on
    ``device``: ``"cpu"`` is the emulation backend). Tasks with equal arrival times enter in
    list order."""
    from ..manager import OffloadManager
    from ..timeslice import TimeSlicer
    host = max(4 * state_bytes * len(tasks), 1 << 20)
    turns: list[str] = []
    first: dict[str, float] = {}
    entered: dict[str, float] = {}
    done: dict[str, float] = {}
    errors: list[BaseException] = []
    with OffloadManager(device, peers=None, host_bytes=host) as m:
        ts = TimeSlicer(quantum_ms=quantum_s * 1e3, manager=m, policy=policy)
        states = [_state(state_bytes, k + 1, device) for k in range(len(tasks))]
        t0 = time.monotonic() + 0.05  # time for every thread to start

        def body(k: int, task: ValidationTask) -> None:
            try:
                while len(ts.stats()["slices"]) < k:  # predecessors enter first
                    time.sleep(0.0002)
                time.sleep(max(0.0, t0 + task.arrival_s - time.monotonic()))
                entered[task.name] = time.monotonic()
                with ts.slice(state=states[k], name=task.name, weight=task.weight) as s:
                    for i in range(task.steps):
                        turns.append(task.name)  # one slice runs at a time: no race
                        time.sleep(step_s)
                        if i == 0:
                            first[task.name] = time.monotonic()
                        if i < task.steps - 1:
                            s.checkpoint()
                done[task.name] = time.monotonic()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors.append(exc)

        threads = [threading.Thread(target=body, args=(k, t), daemon=True)
                   for k, t in enumerate(tasks)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout_s)
        if any(th.is_alive() for th in threads):
            raise RuntimeError(f"validation workload did not finish within {timeout_s} s")
        if errors:
            raise errors[0]
        stats = ts.stats()
        ts.close()
    ttft = {t.name: first[t.name] - entered[t.name] for t in tasks}
    start = min(entered.values())
    makespan = max(done.values()) - start
    return Measured(sorted(ttft.values()), sum(t.steps for t in tasks) / makespan, makespan,
                    compress_turns(turns), stats["bytes_paged_out"] + stats["bytes_paged_in"],
                    ttft)


def simulate_workload(tasks: Sequence[ValidationTask], calib: Calibration, *,
                      quantum_s: float, policy: str = "fair", state_bytes: int = 4 << 20,
                      record_turns: bool = True) -> RunResult:
    """The same workload in the simulator: one GPU, one slot, a host link at the measured
    bandwidth (average of both directions; latency folded into it)."""
    model = ModelSpec("task", 0.0, 0, 0, state_bytes, calib.step_s)
    gpu = GPUConfig(0, memory_bytes=1 << 50, serves="task", max_batch=1)
    bw = (calib.out_bytes_per_s + calib.in_bytes_per_s) / 2
    sc = Scenario(name="validation", gpus=(gpu,), models={"task": model},
                  traces=(TraceSpec("burst"),), links=LinkSpec(bw, 0.0, bw, 0.0),
                  quantum_s=quantum_s, policies=(policy,), tiers=("host",))
    trace = [TraceRequest(t.arrival_s, 1, t.steps, "task", t.weight) for t in tasks]
    result = simulate(sc, policy, None if policy == "fcfs" else "host", trace,
                      record_turns=record_turns)
    names = [t.name for t in tasks]
    result.turns = {g: [names[i] for i in ids] for g, ids in result.turns.items()}
    return result


def _rel(sim: float, real: float) -> float:
    return abs(sim - real) / real if real else float("inf")


def validate(*, quick: bool = False, policy: str = "fair", step_s: float = 0.02,
             quantum_s: float = 0.06, state_bytes: int = 4 << 20, tolerance: float = 0.25,
             tasks: Sequence[ValidationTask] | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """Calibrate, run the real slicer and the simulator on the same workload, compare
    (``device``: ``"cpu"`` for the emulation backend, ``"cuda:N"`` for a GPU).

    Returns a dict with the calibration, both sides' TTFT p50/p99 and throughput, their
    relative errors, the turn orders, and ``ok`` (every error within ``tolerance``).
    """
    tasks = list(tasks or default_workload(quick))
    calib = calibrate(state_bytes, step_s, device=device)
    real = run_real(tasks, step_s=step_s, quantum_s=quantum_s, policy=policy,
                    state_bytes=state_bytes, device=device)
    sim = simulate_workload(tasks, calib, quantum_s=quantum_s, policy=policy,
                            state_bytes=state_bytes)
    pairs = {"ttft_p50_s": (sim.ttft_p50_s, percentile(real.ttft_s, 50)),
             "ttft_p99_s": (sim.ttft_p99_s, percentile(real.ttft_s, 99)),
             "throughput_steps_s": (sim.throughput_tok_s, real.throughput_steps_s)}
    errors = {k: _rel(s, r) for k, (s, r) in pairs.items()}
    sim_turns = compress_turns(sim.turns.get(0, []))
    backend = ("emulation (device='cpu', host tier)" if device == "cpu" else
               f"cuda ({device}, host tier)")
    return {"backend": backend, "device": device, "policy": policy,
            "tasks": len(tasks), "step_s": step_s, "quantum_s": quantum_s,
            "state_bytes": state_bytes, "tolerance": tolerance,
            "calibration": {"step_s": calib.step_s, "out_bytes_per_s": calib.out_bytes_per_s,
                            "in_bytes_per_s": calib.in_bytes_per_s},
            "real": {k: r for k, (_, r) in pairs.items()},
            "sim": {k: s for k, (s, _) in pairs.items()},
            "rel_error": errors, "ok": all(e <= tolerance for e in errors.values()),
            "real_turns": real.turns, "sim_turns": sim_turns,
            "same_turn_order": real.turns == sim_turns}


def format_validation(v: dict[str, Any]) -> str:
    """A short table of :func:`validate`'s result."""
    c = v["calibration"]
    lines = [f"validation: real TimeSlicer ({v['backend']}) vs simulator, policy {v['policy']}, "
             f"{v['tasks']} tasks, step {v['step_s'] * 1e3:.0f} ms, quantum "
             f"{v['quantum_s'] * 1e3:.0f} ms, state {v['state_bytes'] >> 20} MiB",
             f"calibration: step {c['step_s'] * 1e3:.2f} ms, copy out "
             f"{c['out_bytes_per_s'] / 1e9:.2f} GB/s, in {c['in_bytes_per_s'] / 1e9:.2f} GB/s",
             f"{'metric':<20} {'real':>10} {'sim':>10} {'rel err':>8}"]
    for k in v["real"]:
        lines.append(f"{k:<20} {v['real'][k]:>10.4f} {v['sim'][k]:>10.4f} "
                     f"{v['rel_error'][k]:>7.1%}")
    lines.append(f"turn order identical: {v['same_turn_order']}")
    lines.append(f"{'PASS' if v['ok'] else 'FAIL'}: every relative error "
                 f"{'within' if v['ok'] else 'NOT within'} {v['tolerance']:.0%}")
    return "\n".join(lines)

