"""``aqua-offload lend`` / ``python -m aqua_offload.remote``: lend memory over NIXL or the ledger.

Serves an arena of host memory (``--host-bytes``) or GPU memory (``--device cuda:N --bytes``)
to borrowers that hold the shared token (``--token-file``, or the environment variable named by
``--token-env``, default AQUA_OFFLOAD_REMOTE_TOKEN), on one address (``--address``, default
127.0.0.1: this host only). With ``--keep``, lends whatever the device has free above that
reserve, and reclaims when free memory falls below it. Runs until SIGINT or SIGTERM.

With ``--ledger [PATH]`` it lends GPU memory (``--device cuda:N --bytes``, elastic with
``--keep``) to processes of this host through the lending ledger instead (an offer that
``OffloadManager(..., peers="lent")`` leases; :mod:`.ledger_lending`), and NIXL is not used
nor imported. One process lends one way: the NIXL options (``--address``, ``--port``,
``--token-file``, ``--token-env``) and ``--host-bytes`` are refused with ``--ledger``, so the
two never promise the same bytes. At SIGINT/SIGTERM the offer is withdrawn, waiting up to
``--withdraw-timeout`` seconds for the consumers to give the memory back.

Exit status: 0, or 2 for a usage error (bad size, address, token) or a start that failed;
with ``--ledger``, 1 when consumers still held memory at ``--withdraw-timeout`` (their
offer stays asked back in full, and the ledger's recovery takes it over at exit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from ..errors import OffloadError
from ..sizes import format_size, parse_size

__all__ = ["add_arguments", "run", "run_ledger", "main"]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lend`` (also used by the ``aqua-offload`` console script)."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--host-bytes", type=_size, metavar="SIZE",
                      help="lend this much host memory (pinned when CUDA is usable)")
    what.add_argument("--device", metavar="cuda:N", help="lend memory of this GPU (with --bytes)")
    parser.add_argument("--bytes", type=_size, metavar="SIZE", dest="nbytes",
                        help="how much GPU memory to lend (with --device)")
    parser.add_argument("--keep", type=_size, metavar="SIZE",
                        help="elastic: lend what is free above this reserve; the size given "
                             "with --host-bytes/--bytes is then the most ever lent")
    # None, not the defaults: --ledger must tell given NIXL options from absent ones
    parser.add_argument("--address", default=None,
                        help="address to listen on, optionally with the port (HOST, "
                        "HOST:PORT, [V6]:PORT; default 127.0.0.1; only it is bound)")
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port (default: any free one)")
    parser.add_argument("--segment", type=_size, default=64 << 20, metavar="SIZE",
                        help="granule of growth and reclaim, and the largest block "
                             "(default 64MiB)")
    parser.add_argument("--token-file", type=Path, metavar="PATH",
                        help="read the shared token from this file")
    parser.add_argument("--token-env", metavar="NAME", default=None,
                        help="read the token from this environment variable "
                             "(default AQUA_OFFLOAD_REMOTE_TOKEN)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="with --keep: how often free memory is checked (default 1)")
    parser.add_argument("--ready-file", type=Path, metavar="PATH",
                        help="write {address, port, pid} as JSON here once serving "
                             "(with --ledger: {ledger, device, offers, pid})")
    parser.add_argument("--ledger", nargs="?", const="", default=None, metavar="PATH",
                        help="lend GPU memory to processes of this host through the lending "
                             "ledger (PATH, default $AQUA_OFFLOAD_LEDGER or the per-user one) "
                             "instead of over NIXL")
    parser.add_argument("--withdraw-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="with --ledger: at stop, how long to wait for consumers to give "
                             "the memory back (default 30)")


def listen_address(address: str | None, port: int | None) -> tuple[str, int]:
    """``--address`` and ``--port`` as (host, port). ``--address`` may carry the port, as a
    borrower names the lender: ``host:port``, ``[v6]:port``; a bare IPv6 address (``::1``) or
    ``[v6]`` is a host alone. Raises ValueError on a malformed port or two different ones."""
    if address is None:
        return "127.0.0.1", 0 if port is None else port
    host, given = address, None
    if address.startswith("["):
        inner, sep, rest = address[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"--address {address!r}: expected [v6] or [v6]:port")
        host, given = inner, rest[1:] if rest else None
    elif address.count(":") == 1:
        host, given = address.split(":")
    if not host:
        raise ValueError(f"--address {address!r} names no host")
    if given is not None:
        if not (given.isascii() and given.isdigit() and int(given) <= 65535):
            raise ValueError(f"--address {address!r}: the port must be 0..65535")
        if port is not None and port != int(given):
            raise ValueError(f"--address {address!r} and --port {port} name two ports")
        port = int(given)
    return host, 0 if port is None else port


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; see the module docstring for the exit status."""
    if args.ledger is not None:
        return run_ledger(args)  # NIXL is never imported on this path
    from .elastic import ReserveWatcher, cuda_free_memory, host_free_memory
    from .lender import Lender
    from .protocol import load_token

    def usage(message: str) -> int:
        print(f"aqua-offload lend: {message}", file=sys.stderr)
        return 2

    if args.device is None and args.nbytes is not None:
        return usage("--bytes goes with --device (host memory: --host-bytes)")
    if args.device is not None and args.nbytes is None and args.keep is None:
        return usage("--device needs --bytes (or --keep)")
    if args.device is None and args.host_bytes is None and args.keep is None:
        return usage("say what to lend: --host-bytes SIZE, --device cuda:N --bytes SIZE, "
                     "or --keep SIZE")
    if args.interval <= 0:
        return usage("--interval must be positive")
    cap = args.nbytes if args.device is not None else args.host_bytes
    try:
        host, port = listen_address(args.address, args.port)
    except ValueError as exc:
        return usage(str(exc))
    args.address, args.port = host, port
    try:
        token = load_token(token_file=args.token_file, token_env=args.token_env)
        if cap is not None and 0 < cap < args.segment:  # (--keep too: it would never lend)
            return usage(f"{'--bytes' if args.device is not None else '--host-bytes'} {cap} "
                         f"is less than one segment (--segment {args.segment}): nothing to "
                         f"lend")
        start = 0 if args.keep is not None else cap
        if args.device is not None:
            lender = Lender(token, device=args.device, nbytes=start, address=args.address,
                            port=args.port, segment_bytes=args.segment)
        else:
            lender = Lender(token, host_bytes=start, address=args.address, port=args.port,
                            segment_bytes=args.segment)
    except OffloadError as exc:
        return usage(str(exc))
    watcher = None
    stop = threading.Event()
    try:
        if args.keep is not None:
            free = (cuda_free_memory(lender.device) if args.device is not None
                    else host_free_memory)
            watcher = ReserveWatcher(lender, args.keep, free, max_bytes=cap,
                                     interval_s=args.interval)
            watcher.step()  # lend what is spare from the start
        lender.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if watcher is not None:
            watcher.start()
        what = (f"{args.device} memory" if args.device is not None else "host memory")
        print(f"aqua-offload lend: serving {format_size(lender.arena.nbytes)} of {what} on "
              f"{lender.address}" + (f" (elastic, keeping {format_size(args.keep)} free)"
                                     if args.keep is not None else ""), flush=True)
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"address": lender.address, "host": lender.host,
                                       "port": lender.port, "pid": os.getpid()}))
            tmp.replace(args.ready_file)
        while not stop.wait(0.5):
            pass
    except (OffloadError, OSError) as exc:
        return usage(str(exc))
    finally:
        if watcher is not None:
            watcher.stop()
        stats = lender.stats()
        lender.close()
    print(f"aqua-offload lend: stopped; {int(stats['connections'])} connections, "
          f"{int(stats['reclaims_done'])} reclaims, {int(stats['auth_failures'])} refused "
          f"tokens, {int(stats['protocol_errors'])} protocol errors", flush=True)
    return 0


def run_ledger(args: argparse.Namespace) -> int:
    """``lend --ledger``: offer GPU memory in the lending ledger until SIGINT/SIGTERM, then
    withdraw it (bounded by ``--withdraw-timeout``); see the module docstring."""
    from .elastic import ReserveWatcher, cuda_free_memory, host_free_memory
    from .ledger_lending import LedgerLender

    def usage(message: str) -> int:
        print(f"aqua-offload lend: {message}", file=sys.stderr)
        return 2

    if args.host_bytes is not None or args.device is None:
        return usage("--ledger lends GPU memory only (--device cuda:N --bytes SIZE, or --keep); "
                     "host memory cannot be lent through the ledger (lend it over NIXL with "
                     "--host-bytes, without --ledger)")
    nixl = [name for name, value in (("--address", args.address), ("--port", args.port),
                                     ("--token-file", args.token_file),
                                     ("--token-env", args.token_env)) if value is not None]
    if nixl:
        return usage(f"{', '.join(nixl)}: options of lending over NIXL; --ledger lends to "
                     "processes of this host only (run a second lender for NIXL, with its own "
                     "sizes)")
    if args.nbytes is None and args.keep is None:
        return usage("--device needs --bytes (or --keep)")
    if args.interval <= 0:
        return usage("--interval must be positive")
    if not args.withdraw_timeout >= 0:  # (NaN too)
        return usage("--withdraw-timeout must be >= 0 seconds")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before offering: a stop then still withdraws
        signal.signal(sig, lambda *_: stop.set())
    elastic = args.keep is not None
    try:
        lender = LedgerLender(args.device, nbytes=0 if elastic else args.nbytes,
                              segment_bytes=args.segment, ledger=args.ledger or None)
    except OffloadError as exc:
        return usage(str(exc))
    watcher = None
    status = 0
    try:
        if elastic:
            # An emulated device is host memory of the consumers: MemAvailable stands for it.
            device_free = (host_free_memory if lender.emulated
                           else cuda_free_memory(int(lender.device.split(":")[1])))
            watcher = ReserveWatcher(lender, args.keep, lender.free_memory(device_free),
                                     max_bytes=args.nbytes, interval_s=args.interval)
            watcher.step()  # offer what is spare from the start
        st = lender.stats()
        what = lender.device + (" (emulated: no GPU)" if lender.emulated else "")
        print(f"aqua-offload lend: offering {format_size(st['lendable_bytes'])} of {what} "
              f"through the ledger {lender.ledger} (offers {lender.offer_ids()})"
              + (f" (elastic, keeping {format_size(args.keep)} free)" if elastic else ""),
              flush=True)
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"ledger": lender.ledger, "device": lender.device,
                                       "offers": lender.offer_ids(), "pid": os.getpid()}))
            tmp.replace(args.ready_file)
        if watcher is not None:
            watcher.start()
        while not stop.wait(0.5):
            pass
    except (OffloadError, OSError) as exc:
        status = usage(str(exc))
    finally:
        if watcher is not None:
            watcher.stop()
        done = lender.close(args.withdraw_timeout)
        try:
            st = lender.stats()
        except OffloadError as exc:  # an offer left in a ledger that broke meanwhile
            print(f"aqua-offload lend: {exc}", file=sys.stderr)
            st = lender.counters()
    if done["left"]:
        print(f"aqua-offload lend: consumers still hold {format_size(done['left'])} after "
              f"{args.withdraw_timeout:g} s; the offer stays asked back in full and is handed "
              "to the ledger's recovery at exit", file=sys.stderr, flush=True)
        status = status or 1
    print(f"aqua-offload lend: stopped; withdrew {format_size(done['withdrawn'])} in "
          f"{done['seconds']:.3f} s; {st['grows']} grows, {st['reclaims_done']} reclaims "
          f"({format_size(st['reclaimed_bytes'])}), reclaim latency last "
          f"{st['reclaim_last_s']:.3f} s, max {st['reclaim_max_s']:.3f} s, "
          f"{st['consumer_errors']} consumer errors", flush=True)
    return status


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m aqua_offload.remote",
                                     description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
