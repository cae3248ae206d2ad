"""Discrete-event simulator of an N-GPU server serving LLMs with time slicing and paging.

It answers "what would the library do on an 8-GPU NVLink server" without one: GPUs with
memory, PCIe and NVLink links shared by fluid max-min fair transfers, models timed by a
roofline, producers lending spare memory (and reclaiming it), and request traces, served under
admission control or under the *same* policy classes as :class:`aqua_offload.TimeSlicer`
(``fair``, ``rr``, ``fcfs``), paging preempted requests to host or to a peer GPU.

>>> from aqua_offload.sim import load_scenario, run_scenario
>>> results = run_scenario(load_scenario("paper-burst"))

Command line: ``python -m aqua_offload.sim [SCENARIO|validate|sweep|place|long-decode]
[--json [F]] [--plot F]``: a scenario, the validation against the real slicer, the regime map
(:mod:`~aqua_offload.sim.sweep`), the placer (:mod:`~aqua_offload.sim.placer`) or offloaded
decoding of one long prompt (:mod:`~aqua_offload.sim.offloaded_decode`).
``import aqua_offload`` does not import this package; it imports no torch of its own and
matplotlib only to plot. See docs/simulation.md.
"""

from __future__ import annotations

from .engine import Event, EventEngine
from .links import Channel, Network, Transfer
from .roofline import FixedStep, GPUSpec, ModelSpec, Roofline, H100_SXM
from .scenario import (GPUConfig, LinkSpec, ReclaimSpec, Scenario, ScenarioError, TraceSpec,
                       builtin_scenarios, load_scenario, parse_scenario)
from .server import Server
from .serving import Request, ServingEngine
from .simulate import RunResult, configurations, percentile, run_scenario, simulate
from .trace import TraceError, TraceRequest, burst_trace, load_csv_trace, poisson_trace
from .sweep import DEFAULT_GRID, QUICK_GRID, SweepBase, SweepGrid, run_sweep
from .placer import PlacementError, PlacementProblem, load_problem, naive_placement, place
from .offloaded_decode import LongDecodeCase, LongDecodeResult, long_decode, paper_case

__all__ = [
    "Event", "EventEngine", "Channel", "Network", "Transfer",
    "GPUSpec", "ModelSpec", "Roofline", "FixedStep", "H100_SXM",
    "Scenario", "GPUConfig", "LinkSpec", "ReclaimSpec", "TraceSpec", "ScenarioError",
    "load_scenario", "parse_scenario", "builtin_scenarios",
    "Server", "Request", "ServingEngine",
    "RunResult", "simulate", "run_scenario", "configurations", "percentile",
    "TraceRequest", "TraceError", "burst_trace", "poisson_trace", "load_csv_trace",
    "SweepBase", "SweepGrid", "QUICK_GRID", "DEFAULT_GRID", "run_sweep",
    "PlacementError", "PlacementProblem", "load_problem", "naive_placement", "place",
    "LongDecodeCase", "LongDecodeResult", "long_decode", "paper_case",
]
