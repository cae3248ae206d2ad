"""Command line of the benchmarks: ``aqua-offload bench {copy,tiers,hf,burst,remote} ...``, also
``python -m aqua_offload.bench ...``.

One subcommand per benchmark; each prints a table on stdout and can write its results as JSON
(``--json PATH``) and a plot (``--plot PATH``, a PNG; needs matplotlib). :func:`main` takes the
arguments as a list, so a test can call it; :func:`add_benchmarks` lends the subcommands to the
``aqua-offload`` console script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..devices import cuda_usable
from ..outputs import output_problem, plot_problem
from ..sizes import parse_size
from . import burst, copy, hf, models, plot, remote, tiers

__all__ = ["add_benchmarks", "build_parser", "main"]


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)
    return parse


def _seconds_or_ms(text: str) -> float:
    """A finite number >= 0 (a quantum, a spread between arrivals)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _size_arg(text: str) -> int:
    try:
        n = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n > 0:
        return n
    raise argparse.ArgumentTypeError("sizes must be positive")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument("--plot", type=Path, metavar="PATH",
                   help="also draw the results into this image (.png, .svg, .pdf, ...: its "
                        "suffix; needs matplotlib)")


def _add_copy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("copy", help="copy bandwidth of offload/fetch vs the raw copy",
                       description=(copy.__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a few sizes up to 64 MiB and fewer samples")
    p.add_argument("--sizes", nargs="+", type=_size_arg, metavar="SIZE",
                   help="copy sizes, e.g. 4KiB 1MiB 256MiB (default: a sweep)")
    _add_output(p)
    p.add_argument("--backend", choices=("auto", "emulation", "cuda"), default="auto",
                   help="default: cuda when a GPU is usable, else emulation")
    p.add_argument("--samples", type=_int_at_least(3),
                   help="timed samples per point (>= 3; default 7, 5 with --quick)")
    p.add_argument("--warmup", type=_int_at_least(0), default=1,
                   help="untimed batches first (default 1)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure a copy while a matmul runs (default: on)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   default=sys.stderr.isatty(), help="a progress bar on stderr")
    p.set_defaults(func=_run_copy)


def _run(name: str, args: argparse.Namespace, run: Callable[[], dict],
         table: Callable[[dict], str]) -> int:
    """Run one benchmark: refuse a missing GPU, print its table, write its JSON and plot.

    What would make the outputs fail (no matplotlib, an unwritable place) is checked before
    the run, so a long benchmark is not lost at the end."""
    def usage_error(message: str) -> int:
        print(f"aqua_offload.bench {name}: {message}", file=sys.stderr)
        return 2

    if args.backend == "cuda" and not cuda_usable():
        return usage_error("--backend cuda needs a GPU and a CUDA build")
    problems = [plot_problem(args.plot) if args.plot is not None else None,
                *(output_problem(path, what) for what, path in (("--json", args.json),
                                                                ("--plot", args.plot))
                  if path is not None)]
    problem = next((p for p in problems if p), None)
    if problem:
        return usage_error(problem)
    try:
        result = run()
    except models.ModelNotFound as exc:  # found only when the run loads it
        return usage_error(str(exc))
    except copy.VerificationError as exc:
        print(f"aqua_offload.bench {name}: FAILED: {exc}", file=sys.stderr)
        return 1
    print(table(result))
    try:
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"\nwrote {args.json}")
        if args.plot is not None:
            plot.plot_result(name, result, args.plot)
            print(f"wrote {args.plot}")
    except OSError as exc:
        return usage_error(str(exc))
    return 0


def _run_copy(args: argparse.Namespace) -> int:
    return _run("copy", args, lambda: copy.run_copy_benchmark(
        args.sizes, backend=args.backend, quick=args.quick, samples=args.samples,
        warmup=args.warmup, progress=args.progress, overlap=args.overlap), copy.format_table)


def _add_tiers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiers", help="batched small transfers and reclaim of live data",
                       description=(tiers.__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reclaim 64 MiB instead of 1 GiB")
    _add_output(p)
    p.add_argument("--backend", choices=("auto", "emulation", "cuda"), default="auto")
    p.add_argument("--samples", type=_int_at_least(3), default=5)
    p.add_argument("--reclaim-bytes", type=_size_arg, default=None, metavar="SIZE")
    p.set_defaults(func=_run_tiers)


def _run_tiers(args: argparse.Namespace) -> int:
    return _run("tiers", args, lambda: tiers.run_tier_benchmark(
        backend=args.backend, quick=args.quick, samples=args.samples,
        reclaim_bytes=args.reclaim_bytes), tiers.format_tier_table)


def _progress(args: argparse.Namespace, name: str) -> Callable[[str], None] | None:
    if not args.progress:
        return None
    return lambda step: print(f"[bench {name}] {step} ...", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a tiny run (CPU-friendly)")
    p.add_argument("--model", metavar="NAME",
                   help="a preset (tiny, small) or a local checkpoint; default: small on a "
                        "GPU, tiny on CPU")
    _add_output(p)
    p.add_argument("--backend", choices=("auto", "emulation", "cuda"), default="auto")
    p.add_argument("--new-tokens", type=_int_at_least(1), metavar="N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   default=sys.stderr.isatty(), help="progress on stderr")


def _add_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hf", help="generate tokens/s with the offloaded KV cache vs the others",
                       description=(hf.__doc__ or "").split("\n\n")[0])
    _add_model_args(p)
    p.add_argument("--samples", type=_int_at_least(3), default=3)
    p.add_argument("--batch", type=_int_at_least(1))
    p.add_argument("--prompt-tokens", type=_int_at_least(1), metavar="N")
    p.set_defaults(func=lambda a: _run("hf", a, lambda: hf.run_hf_benchmark(
        model=a.model, backend=a.backend, quick=a.quick, samples=a.samples, batch=a.batch,
        prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, progress=_progress(a, "hf")),
        hf.format_hf_table))


def _add_burst(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("burst", help="TTFT under a burst: FCFS vs time-sliced (host, peer)",
                       description=(burst.__doc__ or "").split("\n\n")[0])
    _add_model_args(p)
    p.add_argument("--requests", type=_int_at_least(1), metavar="N")
    p.add_argument("--quantum-ms", type=_seconds_or_ms, default=20.0)
    p.add_argument("--spread-s", type=_seconds_or_ms, default=0.0,
                   help="seconds between arrivals (default 0: all at once)")
    p.add_argument("--validate", action="store_true",
                   help="instead: one small workload through the real TimeSlicer and through "
                        "the simulator calibrated on this machine; prints the errors")
    p.set_defaults(func=_run_burst)


def _run_burst(a: argparse.Namespace) -> int:
    if a.validate:
        if a.plot is not None:
            print("aqua_offload.bench burst: --validate draws no plot", file=sys.stderr)
            return 2
        return _run("burst", a, lambda: burst.run_burst_validation(
            backend=a.backend, quick=a.quick), burst.format_burst_validation)
    return _run("burst", a, lambda: burst.run_burst_benchmark(
        model=a.model, backend=a.backend, quick=a.quick, requests=a.requests,
        new_tokens=a.new_tokens, quantum_ms=a.quantum_ms, spread_s=a.spread_s,
        progress=_progress(a, "burst")), burst.format_burst_table)


def _add_remote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("remote", help="remote client vs raw NIXL vs memcpy (a loopback "
                       "lender, or --lender)",
                       description=(remote.__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 KiB, 1 MiB, 16 MiB")
    p.add_argument("--sizes", nargs="+", type=_size_arg, metavar="SIZE")
    p.add_argument("--samples", type=_int_at_least(3), default=5)
    p.add_argument("--tls", metavar="UCX_TLS", help="UCX transports of both sides (e.g. tcp; "
                   "with --lender, of this side)")
    p.add_argument("--lender", metavar="HOST:PORT",
                   help="a running lender to measure against (e.g. `aqua-offload lend` on "
                   "another node) instead of a child process on loopback")
    p.add_argument("--token-file", metavar="PATH", help="with --lender: the shared token's file")
    p.add_argument("--token-env", metavar="NAME",
                   help="with --lender: the token's environment variable (default "
                   "AQUA_OFFLOAD_REMOTE_TOKEN)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.set_defaults(func=_run_remote, backend="auto", plot=None)


def _run_remote(a: argparse.Namespace) -> int:
    from ..remote import nixl_unavailable

    reason = nixl_unavailable()
    if reason is not None:
        print(f"aqua_offload.bench remote: {reason}", file=sys.stderr)
        return 2
    token = None
    if a.lender is None and (a.token_file or a.token_env):
        print("aqua_offload.bench remote: --token-file/--token-env go with --lender",
              file=sys.stderr)
        return 2
    if a.lender is not None:
        from ..errors import OffloadError
        from ..remote.protocol import load_token

        try:
            token = load_token(token_file=a.token_file, token_env=a.token_env)
            remote.check_lender(a.lender, token, remote.sizes_for(a.sizes, a.quick)).close()
        except OffloadError as exc:  # a bad address or token, no lender, one too small
            print(f"aqua_offload.bench remote: {exc}", file=sys.stderr)
            return 2
    return _run("remote", a, lambda: remote.run_remote_benchmark(
        a.sizes, quick=a.quick, samples=a.samples, tls=a.tls, lender=a.lender, token=token),
        remote.format_remote_table)


def add_benchmarks(sub: argparse._SubParsersAction) -> None:
    """Add one subcommand per benchmark to ``sub``; each sets ``func(args) -> int``."""
    _add_copy(sub)
    _add_tiers(sub)
    _add_hf(sub)
    _add_burst(sub)
    _add_remote(sub)


DESCRIPTION = "aqua_offload benchmarks (method and results: docs/benchmarks.md)."


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser, one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog=prog or "python -m aqua_offload.bench",
                                     description=DESCRIPTION)
    add_benchmarks(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str | os.PathLike[str]] | None = None, prog: str | None = None) -> int:
    """Run a benchmark subcommand.

    Parameters
    ----------
    argv : sequence of str or path-like, optional
        The arguments, e.g. ``["copy", "--quick", "--json", "out.json"]``; default
        ``sys.argv[1:]``.
    prog : str, optional
        Program name shown in usage messages (a console script passes its own).

    Returns
    -------
    int
        Exit status: 0 on success, 1 when a copy produced wrong bytes, 2 for a usage error
        (argparse exits with 2 itself on bad arguments), 130 when interrupted (Ctrl-C).
    """
    parser = build_parser(prog)
    args = parser.parse_args(None if argv is None else [os.fspath(a) for a in argv])
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # one line, not a traceback from wherever the signal landed
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
