"""``aqua-offload lending`` / ``python -m aqua_offload.lending``: show the lending ledger.

Who offers what on which device, who leases it, pending reclaims, and the entries recovered
from dead processes. Viewing runs a transaction, so dead processes' entries are recovered (and
that is written back) as any lending process would; a missing ledger is not created.
Exit status: 0, or 2 when the ledger cannot be read (foreign, corrupt, newer format).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..errors import OffloadError
from ..sizes import format_size
from .ledger import FORMAT_VERSION, Ledger

__all__ = ["add_arguments", "run", "main", "snapshot"]


def snapshot(ledger: Ledger) -> dict[str, Any]:
    """The ledger's state, grouped per device, as plain data."""
    now = time.monotonic()
    exists = ledger.exists()
    with ledger.transaction(create=False) as st:
        consumers = {c["id"]: c for c in st.consumers}
        devices: dict[str, dict[str, Any]] = {}
        for o in st.offers:
            d = devices.setdefault(o["key"], {"key": o["key"], "label": o["label"],
                                              "backend": o["backend"], "offers": [], "leases": []})
            r = o.get("reclaim")
            d["offers"].append({
                "id": o["id"], "producer_pid": o["pid"], "state": o["state"], "bytes": o["bytes"],
                "leased": st.leased(o["id"]), "available": st.available(o),
                "pending": st.pending(o), "since": o["since"],
                "reclaim": None if r is None else {"bytes": r["bytes"],
                                                   "waiting_s": max(0.0, now - r["t0"])}})
        for le in st.leases:
            c = consumers[le["consumer"]]
            devices[le["key"]]["leases"].append({
                "id": le["id"], "consumer_pid": c["pid"], "consumer_device": c["device"],
                "offer": le["offer"], "bytes": le["bytes"], "return": le["return"],
                "asked_s": None if le.get("asked") is None else max(0.0, now - le["asked"]),
                "error": le.get("error")})
        for d in devices.values():
            for k in ("bytes", "leased", "available", "pending"):
                d["offered" if k == "bytes" else k] = sum(o[k] for o in d["offers"])
        return {
            "ledger": ledger.path, "exists": exists, "format": FORMAT_VERSION,
            "seq": st.body["seq"], "devices": list(devices.values()),
            "consumers": [{"id": c["id"], "pid": c["pid"], "backend": c["backend"],
                           "device": c["device"],
                           "leased": sum(le["bytes"] for le in st.leases
                                         if le["consumer"] == c["id"])}
                          for c in st.consumers],
            "recovered": list(st.body["recovered"]),
        }


def _text(view: dict[str, Any]) -> str:
    if not view["exists"]:
        return f"lending ledger {view['ledger']}: none yet (nothing was ever offered)"
    fs = format_size
    out = [f"lending ledger {view['ledger']} (format {view['format']}, seq {view['seq']})"]
    if not view["devices"]:
        out.append("no offers")
    for d in view["devices"]:
        out.append(f"{d['label']} ({d['backend']}): offered {fs(d['offered'])}, leased "
                   f"{fs(d['leased'])}, available {fs(d['available'])}, pending reclaim "
                   f"{fs(d['pending'])}")
        for o in d["offers"]:
            out.append(f"  offer #{o['id']:<4} producer pid {o['producer_pid']:<8} "
                       f"{fs(o['bytes']):>12}  leased {fs(o['leased'])}  {o['state']}")
            if o["reclaim"]:
                out.append(f"      reclaim pending: {fs(o['reclaim']['bytes'])} asked "
                           f"{o['reclaim']['waiting_s']:.3f} s ago, {fs(o['pending'])} to go")
        for le in d["leases"]:
            line = (f"  lease #{le['id']:<4} consumer pid {le['consumer_pid']:<8} "
                    f"{fs(le['bytes']):>12}  from offer #{le['offer']} ({le['consumer_device']})")
            if le["return"]:
                line += f"  returning {fs(le['return'])}, asked {le['asked_s'] or 0:.3f} s ago"
            if le["error"]:
                line += f"  ERROR: {le['error']}"
            out.append(line)
    if view["consumers"]:
        out.append("consumers:")
        for c in view["consumers"]:
            out.append(f"  #{c['id']:<4} pid {c['pid']:<8} {c['backend']} {c['device']}  "
                       f"leases {fs(c['leased'])}")
    if view["recovered"]:
        out.append("recovered from dead processes:")
        for r in view["recovered"]:
            try:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["wall"]))
            except (OverflowError, OSError, ValueError):  # a valid number, but no date
                stamp = f"{r['wall']:>19}"
            out.append(f"  {stamp}  {r['what']}")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``lending`` view (also used by the ``aqua-offload`` console script)."""
    parser.add_argument("--json", action="store_true", help="print the ledger as JSON")
    parser.add_argument("--ledger", metavar="PATH", default=None,
                        help="ledger file (default: $AQUA_OFFLOAD_LEDGER or the per-user "
                             "runtime directory)")


def run(args: argparse.Namespace) -> int:
    """Print the ledger view; 0 on success, 2 when the ledger cannot be read (or its path is
    no path)."""
    try:
        view = snapshot(Ledger(getattr(args, "ledger", None)))
    except OffloadError as exc:  # a LedgerError, or an InvalidArgumentError for --ledger ''
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(view, indent=2) if args.json else _text(view))
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m aqua_offload.lending",
                                     description="Show the cross-process lending ledger: "
                                                 "offers, leases, pending reclaims.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
