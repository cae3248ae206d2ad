"""``aqua-offload lend`` / ``python -m aqua_offload.remote``: lend memory over NIXL.

Serves an arena of host memory (``--host-bytes``) or GPU memory (``--device cuda:N --bytes``)
to borrowers that hold the shared token (``--token-file``, or the environment variable named by
``--token-env``, default AQUA_OFFLOAD_REMOTE_TOKEN), on one address (``--address``, default
127.0.0.1: this host only). With ``--keep``, lends whatever the device has free above that
reserve, and reclaims when free memory falls below it. Runs until SIGINT or SIGTERM.
Exit status: 0, or 2 for a usage error (bad size, address, token) or a start that failed.
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

__all__ = ["add_arguments", "run", "main"]


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
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; only it is bound)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
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
                        help="write {address, port, pid} as JSON here once serving")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; see the module docstring for the exit status."""
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
        token = load_token(token_file=args.token_file, token_env=args.token_env)
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m aqua_offload.remote",
                                     description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
