"""Command line of the simulator: ``python -m aqua_offload.sim [SCENARIO|validate] ...``.

``SCENARIO`` is a built-in name (``--list``) or a ``.toml``/``.yaml`` file. Three pseudo-scenarios
do something else: ``validate`` runs the real TimeSlicer on the emulation backend against the
simulator (:mod:`aqua_offload.sim.validate`), ``sweep`` draws the regime map
(:mod:`aqua_offload.sim.sweep`) and ``place`` places models on GPUs and simulates the placement
against a naive one (:mod:`aqua_offload.sim.placer`), ``long-decode`` times FlexGen-style decoding
of a 32k-token prompt with the overflowing KV cache on a peer GPU vs host memory
(:mod:`aqua_offload.sim.offloaded_decode`). ``--json`` without a path prints only the
JSON document, on stdout. Exit status: 0 done, 1 validation out of tolerance, 2 unusable
scenario or arguments (a message on stderr, no traceback), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidArgumentError
from ..outputs import output_problem, plot_problem
from .scenario import POLICIES, TIERS, builtin_scenarios, load_scenario

__all__ = ["add_arguments", "run", "main"]


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds > 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    parser.add_argument("scenario", nargs="?", default="paper-burst",
                        help="built-in scenario name, a .toml/.yaml file, or 'validate', "
                             "'sweep', 'place', 'long-decode' (default: paper-burst)")
    parser.add_argument("--list", action="store_true", help="list the built-in scenarios")
    parser.add_argument("--json", type=Path, metavar="PATH", nargs="?", const=Path("-"),
                        help="write the results as JSON (no PATH or '-': only the JSON, on "
                             "stdout)")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="write an image (.png, .svg, .pdf, ...: its suffix): TTFT CDF and p99 per "
                             "policy/tier; sweep: heatmaps; place: per-model TTFT p99 (needs "
                             "matplotlib)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, metavar="POLICY",
                        help=f"policies to run (from: {', '.join(POLICIES)}; default: the "
                             "scenario's)")
    parser.add_argument("--tiers", nargs="+", choices=TIERS, metavar="TIER",
                        help="paging tiers for rr and fair (host, peer; default: the scenario's)")
    parser.add_argument("--seed", type=int, help="seed of the random traces")
    parser.add_argument("--quantum-ms", type=_positive_ms, metavar="MS",
                        help="time-slice quantum (default: the scenario's)")
    parser.add_argument("--quick", action="store_true",
                        help="validate: fewer tasks (about 1 s of workload); sweep: a small "
                             "grid (seconds)")
    parser.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                        help="sweep: worker processes (default 1)")
    parser.add_argument("--requests", type=_positive_int, nargs="+", metavar="N",
                        help="sweep: burst sizes (default: the grid's)")
    parser.add_argument("--pressures", type=_positive_float, nargs="+", metavar="X",
                        help="sweep: KV demand / capacity ratios (default: the grid's)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="sweep: a progress bar on stderr (default: when stderr is a "
                             "terminal; needs tqdm)")
    parser.add_argument("--spec", type=Path, metavar="PATH",
                        help="place: a placement problem (.toml; default: the built-in "
                             "example)")
    parser.add_argument("--policy", choices=("fair", "rr", "fcfs"), default="fair",
                        help="validate: the policy to compare (default fair)")
    parser.add_argument("--model", default="llama-3.1-8b", metavar="NAME",
                        help="long-decode: llama-3.1-8b (default) or llama-2-13b")
    parser.add_argument("--batch", type=_positive_int, nargs="+", metavar="N",
                        help="long-decode: batch sizes (default: a range around the overflow)")
    parser.add_argument("--prompt-tokens", type=_positive_int, default=32768, metavar="N",
                        help="long-decode: prompt length (default 32768)")
    parser.add_argument("--output-tokens", type=_positive_int, default=256, metavar="N",
                        help="long-decode: generated tokens per sequence (default 256)")
    parser.add_argument("--kv-budget", metavar="SIZE",
                        help="long-decode: free HBM for KV (default: 80 GiB - weights - 8 GiB)")
    parser.add_argument("--serial", action="store_true",
                        help="long-decode: link transfers add to HBM time instead of overlapping")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


PSEUDO = ("validate", "sweep", "place", "long-decode")


def check_outputs(args: argparse.Namespace) -> str | None:
    """Check ``--json`` and ``--plot`` before anything runs (a long simulation must not end
    in an unwritable path): the message of the first problem, or None."""
    plot = None if args.scenario == "validate" else args.plot  # validate plots nothing
    if args.spec is not None and args.scenario != "place":
        return "--spec is for 'place' only"
    if plot is not None and args.scenario == "long-decode":
        return "--plot: long-decode draws no plot (use --json)"
    if plot is not None:  # (matplotlib only with --plot: the plain run does without)
        problem = plot_problem(plot)
        if problem:
            return problem
    for what, path in (("--json", args.json), ("--plot", plot)):
        if path is not None and str(path) != "-":
            problem = output_problem(path, what)
            if problem:
                return problem
    return None


def run(args: argparse.Namespace) -> int:
    """Run what ``args`` asks for; print the table; return the exit status."""
    if args.list:
        for name, desc in builtin_scenarios().items():
            print(f"{name:<14} {desc}")
        print(f"{'validate':<14} the real TimeSlicer (emulation backend) vs the simulator")
        print(f"{'sweep':<14} the regime map: gains of time slicing over a grid of workloads")
        print(f"{'place':<14} place models on GPUs, lend memory, simulate vs a naive placement")
        print(f"{'long-decode':<14} decoding a 32k prompt with overflow KV on a peer GPU vs host")
        return 0
    problem = check_outputs(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.scenario == "validate":
            return _validate(args)
        if args.scenario == "sweep":
            return _sweep(args)
        if args.scenario == "place":
            return _place(args)
        if args.scenario == "long-decode":
            return _long_decode(args)
        scenario = load_scenario(args.scenario)
        changes = {}
        if args.seed is not None:
            changes["seed"] = args.seed
        if args.quantum_ms is not None:
            changes["quantum_s"] = args.quantum_ms / 1e3
        scenario = dataclasses.replace(scenario, **changes)
        from .simulate import run_scenario
        results = run_scenario(scenario, args.policies, args.tiers)
    except InvalidArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .report import PlotError, format_table, to_json, write_plot
    if not _stdout_json(args):
        print(format_table(results, f"scenario {scenario.name} (simulated): "
                                    f"{scenario.description}"))
    try:
        if args.json is not None:
            _write_json(args, to_json(scenario, results))
        if args.plot is not None:
            write_plot(args.plot, results, scenario.name)
            print(f"wrote {args.plot}")
    except (OSError, PlotError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _stdout_json(args: argparse.Namespace) -> bool:
    return args.json is not None and str(args.json) == "-"


def _write_json(args: argparse.Namespace, doc: Any) -> None:
    """Print ``doc`` on stdout (``--json`` alone or ``-``) or write it to the path."""
    text = json.dumps(doc, indent=2) + "\n"
    if _stdout_json(args):
        sys.stdout.write(text)
        return
    args.json.write_text(text)
    print(f"wrote {args.json}")


def _validate(args: argparse.Namespace) -> int:
    from .validate import format_validation, validate
    result = validate(quick=args.quick, policy=args.policy)
    if not _stdout_json(args):
        print(format_validation(result))
    if args.json is not None:
        try:
            _write_json(args, result)
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0 if result["ok"] else 1


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import DEFAULT_GRID, QUICK_GRID, SweepBase, format_sweep, grid_with, run_sweep
    from .sweep import write_heatmaps
    grid = grid_with(QUICK_GRID if args.quick else DEFAULT_GRID, requests=args.requests,
                     pressures=args.pressures)
    base = SweepBase() if args.seed is None else SweepBase(seed=args.seed)
    if args.quantum_ms is not None:
        base = dataclasses.replace(base, quantum_s=args.quantum_ms / 1e3)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    doc = run_sweep(grid, base, jobs=args.jobs, progress=progress)
    return _emit(args, doc, format_sweep, write_heatmaps)


def _emit(args: argparse.Namespace, doc: dict, text: Any, plot: Any) -> int:
    """Print ``doc`` as ``text(doc)`` (unless JSON goes to stdout), write ``--json`` and
    ``--plot``; 2 when a file cannot be written."""
    if not _stdout_json(args):
        print(text(doc))
    try:
        if args.json is not None:
            _write_json(args, doc)
        if args.plot is not None:
            plot(args.plot, doc)
            if not _stdout_json(args):
                print(f"wrote {args.plot}")
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _place(args: argparse.Namespace) -> int:
    from .placer import format_placement, load_problem, place_and_simulate, write_place_plot
    problem = load_problem(args.spec)
    doc = place_and_simulate(problem, seed=args.seed)
    return _emit(args, doc, format_placement, write_place_plot)


def _long_decode(args: argparse.Namespace) -> int:
    from ..sizes import parse_size
    from .offloaded_decode import DEFAULT_BATCHES, format_long_decode, long_decode, paper_case
    budget = None if args.kv_budget is None else parse_size(args.kv_budget, name="--kv-budget")
    results = [long_decode(paper_case(args.model, b, prompt_tokens=args.prompt_tokens,
                                      output_tokens=args.output_tokens, overlap=not args.serial,
                                      kv_budget_bytes=budget))
               for b in (args.batch or DEFAULT_BATCHES)]
    if not _stdout_json(args):
        print(format_long_decode(results))
    if args.json is not None:
        try:
            _write_json(args, {"scenario": "long-decode", "modelled": True,
                               "results": [r.to_dict() for r in results]})
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m aqua_offload.sim",
        description="Simulate an N-GPU server serving LLMs: admission control vs time slicing "
                    "with paging to host or peer GPUs (see docs/simulation.md).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # one line, not a traceback from wherever the signal landed
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
