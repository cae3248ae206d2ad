"""The ledger's contents, its invariants, and the recovery of dead processes' entries.

Note [Accounting]
The memory is not shared between processes: a producer promises not to use ``bytes`` of its
device (an *offer*); a consumer allocates memory on that device itself and records a *lease*
against an offer. Per offer, the sum of its leases never exceeds what it offers, except while a
reclaim is pending: ``reclaim`` lowers the offer first and asks the consumers for the excess
(``lease.return``); the reclaim is complete when the leases fit the offer again. A lease is only
ever created in a transaction that sees enough unleased bytes on a live offer, so memory is
never granted twice. Bytes of one device are interchangeable: a consumer asked to return bytes
of offer A may free any of its segments on that device (the core frees whole segments, newest
first) and charges the bytes to A's leases first, then to its other leases on that device. So
for each consumer and device, the sum of its leases equals its peer-tier capacity there.

Note [Recovery]
Every transaction starts by checking the liveness (liveness.py) of every process in the ledger:
  - a dead consumer: its leases are dropped. The kernel freed its memory when it died, so the
    bytes are free to lease again; a reclaim waiting on them completes.
  - a dead producer: its offer becomes an *orphan*: it offers 0 bytes (no new lease can come
    from it) and every lease on it is asked back in full. The memory stays leased until the
    consumers have migrated their data off, so a new producer on that device never sees it as
    free while a consumer still uses it; the orphan disappears when its last lease is returned.
    A reclaim of the dead producer that was pending is subsumed by this.
  - an entry whose liveness is unknown (another pid namespace) is left alone.
Each recovery is logged in ``recovered`` (the last 32), which the CLI shows.

Schema (JSON; ids are unique across the three lists; times: ``wall`` = time.time(),
``t``/``asked`` = time.monotonic(), which is one clock for the whole machine on Linux):
  seq, next_id: int
  consumers: [{id, pid, start, ns, sock, backend, device, keys: [str], since}]
  offers:    [{id, pid, start, ns, sock, backend, key, label, bytes, state: "live"|"orphan",
               since, reclaim: null | {bytes, t0, wall}}]
  leases:    [{id, consumer, offer, key, bytes, return, asked: null|t, error: null|str,
               error_t: null|t, since}]
  recovered: [{wall, what}]
Every field that any reader uses is type-checked on read (``validate``), optional ones included
(``reclaim``, ``asked``, ``error``, ``error_t``: a missing one reads as null): a file with a
valid checksum but odd values is *corrupt*, never a TypeError in some later reader.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ..sizes import format_size
from . import notify
from .liveness import is_alive

__all__ = ["State", "new_body", "validate"]

_LOG_KEEP = 32
_INT, _STR, _NUM = (int,), (str,), (int, float)
_PROC = {"id": _INT, "pid": _INT, "start": _INT, "ns": _STR, "sock": _STR, "backend": _STR,
         "since": _NUM}
_SCHEMA = {
    "consumers": {**_PROC, "device": _STR, "keys": (list,)},
    "offers": {**_PROC, "key": _STR, "label": _STR, "bytes": _INT, "state": _STR},
    "leases": {"id": _INT, "consumer": _INT, "offer": _INT, "key": _STR, "bytes": _INT,
               "return": _INT, "since": _NUM},
}
# Optional fields: absent or null, else of these types.
_OPTIONAL = {
    "consumers": {},
    "offers": {"reclaim": (dict,)},
    "leases": {"asked": _NUM, "error": _STR, "error_t": _NUM},
}
_RECLAIM = {"bytes": _INT, "t0": _NUM, "wall": _NUM}
_LOGGED = {"wall": _NUM, "what": _STR}


_INT_MAX = (1 << 63) - 1  # ids, pids, sizes (parse_size's MAX_SIZE), times: all fit in 63 bits


def _typed(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int to isinstance: never a valid count, id or time here; json reads NaN and
    # Infinity, which no time or size is either. JSON integers have any number of digits: an
    # id, a pid or a size is never negative nor beyond 63 bits, a time never beyond a float.
    if isinstance(value, float):
        return float in types and math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, types):
        return False
    if isinstance(value, int):
        return (-_INT_MAX if float in types else 0) <= value <= _INT_MAX
    return True


def _bad_field(row: dict[str, Any], fields: dict[str, tuple[type, ...]],
               optional: dict[str, tuple[type, ...]] | None = None) -> str | None:
    for name, types in fields.items():
        if not _typed(row.get(name), types):
            return name
    for name, types in (optional or {}).items():
        if row.get(name) is not None and not _typed(row[name], types):
            return name
    return None


def new_body() -> dict[str, Any]:
    return {"seq": 0, "next_id": 1, "consumers": [], "offers": [], "leases": [], "recovered": []}


def validate(data: Any) -> str | None:
    """What is wrong with a decoded body, or None. Checks types, ranges and references, so that
    a hand-edited or damaged ledger is refused rather than misread."""
    if not isinstance(data, dict):
        return "body is not a JSON object"
    for key in ("seq", "next_id"):
        if type(data.get(key)) is not int or not 0 <= data[key] <= _INT_MAX:
            return f"field {key!r} missing or not an integer in [0, 2**63)"
    if not isinstance(data.get("recovered"), list):
        return "field 'recovered' missing or not a list"
    for r in data["recovered"]:
        if not isinstance(r, dict) or _bad_field(r, _LOGGED):
            return "recovered: an entry is not {wall: number, what: string}"
    ids: set[int] = set()
    for table, fields in _SCHEMA.items():
        rows = data.get(table)
        if not isinstance(rows, list):
            return f"table {table!r} missing or not a list"
        for row in rows:
            if not isinstance(row, dict):
                return f"{table}: an entry is not an object"
            name = _bad_field(row, fields, _OPTIONAL[table])
            if name is not None:
                return f"{table}: entry {row.get('id')!r} has a bad {name!r}"
            if row["id"] in ids or row["id"] >= data["next_id"]:
                return f"{table}: id {row['id']} is duplicated or not below next_id"
            ids.add(row["id"])
    offers = {o["id"]: o for o in data["offers"]}
    consumers = {c["id"] for c in data["consumers"]}
    for c in data["consumers"]:
        if not all(isinstance(k, str) for k in c["keys"]):
            return f"consumers: entry {c['id']} has a bad 'keys'"
    for o in data["offers"]:
        if o["bytes"] < 0 or o["state"] not in ("live", "orphan"):
            return f"offers: entry {o['id']} has a bad size or state"
        r = o.get("reclaim")
        if r is not None and (_bad_field(r, _RECLAIM) or r["bytes"] < 0):
            return f"offers: entry {o['id']} has a bad pending reclaim"
    for le in data["leases"]:
        if le["offer"] not in offers or le["consumer"] not in consumers:
            return f"leases: entry {le['id']} refers to a missing offer or consumer"
        if le["bytes"] <= 0 or not 0 <= le["return"] <= le["bytes"]:
            return f"leases: entry {le['id']} has bad sizes"
        if le["key"] != offers[le["offer"]]["key"]:
            return f"leases: entry {le['id']} is on another device than its offer"
    return None


class State:
    """A ledger body being read or changed inside one transaction."""

    def __init__(self, body: dict[str, Any], path: str) -> None:
        self.body = body
        self.path = path
        self._notes: dict[str, set[bytes]] = {}

    # -- lookups -------------------------------------------------------------------------
    @property
    def offers(self) -> list[dict[str, Any]]:
        return self.body["offers"]

    @property
    def leases(self) -> list[dict[str, Any]]:
        return self.body["leases"]

    @property
    def consumers(self) -> list[dict[str, Any]]:
        return self.body["consumers"]

    def find(self, table: str, id_: int) -> dict[str, Any] | None:
        return next((r for r in self.body[table] if r["id"] == id_), None)

    def new_id(self) -> int:
        self.body["next_id"] += 1
        return self.body["next_id"] - 1

    def leased(self, offer_id: int) -> int:
        return sum(le["bytes"] for le in self.leases if le["offer"] == offer_id)

    def available(self, offer: dict[str, Any]) -> int:
        """Unleased bytes a consumer may take now (none from orphans)."""
        if offer["state"] != "live":
            return 0
        return max(0, offer["bytes"] - self.leased(offer["id"]))

    def pending(self, offer: dict[str, Any]) -> int:
        """Bytes consumers still hold beyond what the offer offers (a pending reclaim)."""
        return max(0, self.leased(offer["id"]) - offer["bytes"])

    # -- notifications (sent by the ledger after the unlock) ------------------------------
    def notify(self, address: str, message: bytes) -> None:
        self._notes.setdefault(address, set()).add(message)

    def notify_consumers(self, key: str | None, message: bytes) -> None:
        for c in self.consumers:
            if key is None or key in c["keys"]:
                self.notify(c["sock"], message)

    def take_notifications(self) -> list[tuple[str, bytes]]:
        notes = [(a, m) for a, ms in self._notes.items() for m in sorted(ms)]
        self._notes.clear()
        return notes

    def log(self, what: str) -> None:
        log = self.body["recovered"]
        log.append({"wall": time.time(), "what": what})
        del log[:-_LOG_KEEP]

    # -- changes -------------------------------------------------------------------------
    def ask_return(self, offer: dict[str, Any], nbytes: int, t: float) -> int:
        """Ask the consumers of ``offer`` for ``nbytes`` (newest leases first); returns what
        could be asked (less only if they hold less)."""
        left = nbytes
        for le in sorted((x for x in self.leases if x["offer"] == offer["id"]),
                         key=lambda x: -x["id"]):
            if left <= 0:
                break
            more = min(left, le["bytes"] - le["return"])
            if more > 0:
                le["return"] += more
                le["asked"] = t if le.get("asked") is None else le["asked"]
                left -= more
                consumer = self.find("consumers", le["consumer"])
                if consumer is not None:
                    self.notify(consumer["sock"], notify.WAKE_RECLAIM)
        return nbytes - left

    def shrink_lease(self, lease: dict[str, Any], nbytes: int) -> None:
        """``nbytes`` of ``lease`` were given back (or died with their consumer)."""
        lease["bytes"] -= nbytes
        lease["return"] = max(0, min(lease["return"] - nbytes, lease["bytes"]))
        if lease["return"] == 0:
            lease["asked"] = None
            lease["error"] = lease["error_t"] = None
        offer = self.find("offers", lease["offer"])
        if lease["bytes"] <= 0:
            self.leases.remove(lease)
        if offer is None:
            return
        if offer.get("reclaim") is not None:
            self.notify(offer["sock"], notify.WAKE_ACK)
        if offer["state"] == "orphan" and self.leased(offer["id"]) == 0:
            self.offers.remove(offer)
        elif self.available(offer) > 0:
            self.notify_consumers(offer["key"], notify.WAKE_OFFER)

    def charge(self, consumer: int, key: str, nbytes: int) -> None:
        """``consumer`` freed ``nbytes`` of device ``key``: charge them to its leases there,
        those asked back first (newest first), the surplus of whole segments to the others
        (Note [Accounting])."""
        mine = sorted((le for le in self.leases if le["consumer"] == consumer
                       and le["key"] == key), key=lambda le: -le["id"])
        left = nbytes
        for le in mine:
            take = min(left, le["return"])
            if take > 0:
                self.shrink_lease(le, take)
                left -= take
        for le in mine:
            if le in self.leases and left > 0:
                take = min(left, le["bytes"])
                self.shrink_lease(le, take)
                left -= take

    def drop_leases(self, consumer: int, keys: Any = None) -> tuple[int, int]:
        """Drop every lease of ``consumer`` (on the devices in ``keys`` only, if given): its
        memory is freed. Returns how many leases and bytes."""
        mine = [le for le in self.leases
                if le["consumer"] == consumer and (keys is None or le["key"] in keys)]
        held = sum(le["bytes"] for le in mine)
        for le in mine:
            self.shrink_lease(le, le["bytes"])
        return len(mine), held

    def orphan(self, offer: dict[str, Any], why: str) -> None:
        """The producer is gone: offer nothing more, ask every lease back (Note [Recovery])."""
        now = time.monotonic()
        offer["state"] = "orphan"
        offer["bytes"] = 0
        offer["reclaim"] = None
        held = self.leased(offer["id"])
        self.ask_return(offer, held, now)
        self.log(f"producer pid {offer['pid']} {why}: offer #{offer['id']} on {offer['label']} "
                 f"withdrawn" + (f", {format_size(held)} asked back from consumers" if held else ""))
        if held == 0:
            self.offers.remove(offer)

    def recover(self) -> None:
        """Note [Recovery]."""
        for c in list(self.consumers):
            if is_alive(c["pid"], c["start"], c["ns"]) is False:
                count, held = self.drop_leases(c["id"])
                self.consumers.remove(c)
                self.log(f"consumer pid {c['pid']} died: {count} lease(s) "
                         f"({format_size(held)}) returned to their offers")
        for o in list(self.offers):
            if o["state"] == "live" and is_alive(o["pid"], o["start"], o["ns"]) is False:
                self.orphan(o, "died")
