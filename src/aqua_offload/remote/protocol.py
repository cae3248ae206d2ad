"""The remote protocol: versioned framing, strict validation of every message, token auth.

A lender and its borrowers talk over one TCP connection per borrower (the control channel);
data moves over NIXL, outside it. Every frame is a fixed header and a JSON body with an
optional binary attachment (the NIXL agent metadata)::

    magic b"AQRM" | version u16 | kind u16 | request id u32 | json length u32 | blob length u32

all big-endian, 20 bytes. The header layout never changes across versions, so either side can
read a peer's version before anything else and refuse it with a typed error.

Note [Validation]
    Every field of every message kind is declared in :data:`SCHEMAS`: a body with a missing, an
    unknown or an ill-typed field is a :class:`~aqua_offload.errors.RemoteProtocolError`, as
    are lengths over :data:`MAX_JSON` / :data:`MAX_BLOB` (refused from the header, before
    reading the body), NaN or duplicate JSON keys, booleans where integers belong, negative or
    over-large integers and over-long lists. Nothing a peer sends reaches the lender's state
    unchecked.

Note [Auth]
    Both sides hold the same secret token; it never crosses the wire. The borrower sends a
    nonce (HELLO), the lender answers with its own nonce and an HMAC-SHA256 proof over both
    (CHALLENGE), the borrower checks it and answers with its own proof (AUTH), and only then
    does the lender send its NIXL metadata (WELCOME). Proofs are compared with
    :func:`hmac.compare_digest`. Replaying a recorded exchange fails: the lender's nonce is fresh.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import secrets
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from ..errors import InvalidArgumentError, RemoteProtocolError, RemoteVersionError

__all__ = [
    "MAGIC", "VERSION", "HEADER", "MAX_JSON", "MAX_BLOB", "MAX_ITEMS", "MAX_INT",
    "Kind", "Header", "Message", "SCHEMAS", "encode", "decode_header", "decode_body",
    "FrameReader", "make_nonce", "proof", "check_proof", "load_token", "TOKEN_ENV",
    "MIN_TOKEN_BYTES",
]

MAGIC = b"AQRM"
VERSION = 1
HEADER = struct.Struct("!4sHHIII")
MAX_JSON = 4 << 20        # bodies are small; a batch of 65536 block ids is ~0.5 MiB
MAX_BLOB = 16 << 20       # NIXL metadata is ~0.5 KiB plus a few hundred bytes per segment
MAX_ITEMS = 65536         # longest list in any message
MAX_INT = (1 << 63) - 1
NONCE_BYTES = 32
TOKEN_ENV = "AQUA_OFFLOAD_REMOTE_TOKEN"
MIN_TOKEN_BYTES = 16


class Kind(enum.IntEnum):
    """Message kinds. Requests come from the borrower; the lender answers each with the same
    request id, or sends RECLAIM on its own (request id 0)."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    ERROR = 5
    ALLOC = 6
    ALLOCATED = 7
    FREE = 8
    FREED = 9
    GET_METADATA = 10
    METADATA = 11
    RECLAIM = 12
    RECLAIMED = 13
    PING = 14
    PONG = 15
    STATS = 16
    STATS_REPLY = 17
    BYE = 18


# ---- field validators: each returns the checked value or raises RemoteProtocolError ---------

def _int(lo: int = 0, hi: int = MAX_INT) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise RemoteProtocolError(f"expected an integer in [{lo}, {hi}], got {_short(v)}")
        return v
    return check


def _str(max_len: int = 256) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if type(v) is not str or len(v) > max_len or not v.isprintable():
            raise RemoteProtocolError(f"expected a printable string of at most {max_len} "
                                      f"characters, got {_short(v)}")
        return v
    return check


def _hex(nbytes: int) -> Callable[[Any], bytes]:
    def check(v: Any) -> bytes:
        if type(v) is not str or len(v) != 2 * nbytes:
            raise RemoteProtocolError(f"expected {2 * nbytes} hex digits, got {_short(v)}")
        try:
            return bytes.fromhex(v)
        except ValueError:
            raise RemoteProtocolError(f"expected hex digits, got {_short(v)}") from None
    return check


def _list(item: Callable[[Any], Any], max_len: int = MAX_ITEMS,
          min_len: int = 0) -> Callable[[Any], list]:
    def check(v: Any) -> list:
        if type(v) is not list or not min_len <= len(v) <= max_len:
            raise RemoteProtocolError(f"expected a list of {min_len}..{max_len} items, got "
                                      f"{_short(v)}")
        return [item(x) for x in v]
    return check


def _record(fields: Mapping[str, Callable[[Any], Any]]) -> Callable[[Any], dict]:
    def check(v: Any) -> dict:
        if type(v) is not dict:
            raise RemoteProtocolError(f"expected an object, got {_short(v)}")
        return _check_fields(v, fields)
    return check


def _stats(v: Any) -> dict:
    """Lender stats: a flat object of numbers (no nesting, so no depth to exploit)."""
    if type(v) is not dict or len(v) > 256:
        raise RemoteProtocolError("stats must be an object of at most 256 numbers")
    out = {}
    for k, x in v.items():
        _str(64)(k)
        if type(x) not in (int, float) or (type(x) is int and abs(x) > MAX_INT):
            raise RemoteProtocolError(f"stats value {k!r} is not a number")
        out[k] = x
    return out


_BLOCK = _record({"id": _int(1), "addr": _int(), "nbytes": _int(1), "segment": _int(1)})

SCHEMAS: dict[Kind, dict[str, Callable[[Any], Any]]] = {
    Kind.HELLO: {"nonce": _hex(NONCE_BYTES), "name": _str(128)},
    Kind.CHALLENGE: {"nonce": _hex(NONCE_BYTES), "proof": _hex(32)},
    Kind.AUTH: {"proof": _hex(32)},
    Kind.WELCOME: {"agent": _str(256), "kind": _str(8), "device": _int(0, 1 << 16),
                   "segment_bytes": _int(1), "arena_bytes": _int(), "md_version": _int(),
                   "session": _int(1)},
    Kind.ERROR: {"code": _str(32), "message": _str(1024)},
    Kind.ALLOC: {"sizes": _list(_int(1), min_len=1)},
    Kind.ALLOCATED: {"blocks": _list(_BLOCK, min_len=1), "md_version": _int()},
    Kind.FREE: {"ids": _list(_int(1), min_len=1)},
    Kind.FREED: {"freed": _int()},
    Kind.GET_METADATA: {},
    Kind.METADATA: {"md_version": _int()},
    Kind.RECLAIM: {"reclaim": _int(1), "ids": _list(_int(1), min_len=1)},
    Kind.RECLAIMED: {"reclaim": _int(1), "ids": _list(_int(1)), "refused": _list(_int(1)),
                     "micros": _int()},
    Kind.PING: {},
    Kind.PONG: {},
    Kind.STATS: {},
    Kind.STATS_REPLY: {"stats": _stats},
    Kind.BYE: {},
}
# Kinds that carry a binary attachment (the NIXL metadata); every other kind must carry none.
_BLOB_KINDS = frozenset({Kind.WELCOME, Kind.METADATA})


@dataclass(frozen=True)
class Header:
    """A decoded frame header."""

    version: int
    kind: int
    request: int
    json_len: int
    blob_len: int


@dataclass(frozen=True)
class Message:
    """A validated message: its kind, request id, checked fields and attachment."""

    kind: Kind
    request: int
    body: dict[str, Any] = field(default_factory=dict)
    blob: bytes = b""


def encode(kind: Kind, request: int, body: Mapping[str, Any] | None = None,
           blob: bytes = b"", *, version: int = VERSION) -> bytes:
    """One frame. The body is validated like a received one, so this side never sends what the
    other side would refuse. ``version`` is only for tests speaking another version."""
    body = dict(body or {})
    _check_fields(body, SCHEMAS[kind])
    if blob and kind not in _BLOB_KINDS:
        raise RemoteProtocolError(f"{kind.name} carries no attachment")
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_JSON or len(blob) > MAX_BLOB:
        raise RemoteProtocolError(f"{kind.name} message too large")
    return HEADER.pack(MAGIC, version, int(kind), request, len(data), len(blob)) + data + blob


def decode_header(data: bytes, max_json: int = MAX_JSON, max_blob: int = MAX_BLOB) -> Header:
    """Check a 20-byte header: magic, version, lengths within the limits.

    Raises
    ------
    RemoteVersionError
        The peer speaks another protocol version (checked right after the magic).
    RemoteProtocolError
        Anything else wrong.
    """
    if len(data) != HEADER.size:
        raise RemoteProtocolError(f"truncated header ({len(data)} of {HEADER.size} bytes)")
    magic, version, kind, request, json_len, blob_len = HEADER.unpack(data)
    if magic != MAGIC:
        raise RemoteProtocolError("not an aqua_offload remote frame (bad magic)")
    if version != VERSION:
        raise RemoteVersionError(f"the peer speaks remote protocol version {version}, this "
                                 f"side speaks {VERSION}", version=version, supported=VERSION)
    if json_len > max_json or blob_len > max_blob:
        raise RemoteProtocolError(f"frame lengths {json_len}+{blob_len} over the limits "
                                  f"({max_json}+{max_blob})")
    return Header(version, kind, request, json_len, blob_len)


def decode_body(header: Header, data: bytes, blob: bytes) -> Message:
    """Validate a frame's body against its kind's schema (see Note [Validation])."""
    try:
        kind = Kind(header.kind)
    except ValueError:
        raise RemoteProtocolError(f"unknown message kind {header.kind}") from None
    if blob and kind not in _BLOB_KINDS:
        raise RemoteProtocolError(f"{kind.name} carries no attachment")
    try:
        body = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"{kind.name}: body is not valid JSON ({exc})") from None
    if type(body) is not dict:
        raise RemoteProtocolError(f"{kind.name}: body is not an object")
    return Message(kind, header.request, _check_fields(body, SCHEMAS[kind], kind.name), blob)


class FrameReader:
    """Incremental decoder for a non-blocking socket: :meth:`feed` bytes as they arrive, get
    whole validated messages back. A bad header is refused as soon as its 20 bytes are in, so
    a huge length prefix never makes this side wait for (or buffer) the announced bytes.
    ``max_json``/``max_blob`` may be lowered (a lender does until the peer authenticated, so an
    unauthenticated peer cannot make it buffer more than a handshake)."""

    def __init__(self, max_json: int = MAX_JSON, max_blob: int = MAX_BLOB) -> None:
        self._buf = bytearray()
        self._header: Header | None = None
        self.max_json = max_json
        self.max_blob = max_blob

    @property
    def pending(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[Message]:
        self._buf += data
        while True:
            if self._header is None:
                if len(self._buf) < HEADER.size:
                    return
                self._header = decode_header(bytes(self._buf[:HEADER.size]), self.max_json,
                                             self.max_blob)
                del self._buf[:HEADER.size]
            h = self._header
            if len(self._buf) < h.json_len + h.blob_len:
                return
            body = bytes(self._buf[:h.json_len])
            blob = bytes(self._buf[h.json_len:h.json_len + h.blob_len])
            del self._buf[:h.json_len + h.blob_len]
            self._header = None
            yield decode_body(h, body, blob)


# ---- auth (Note [Auth]) ----------------------------------------------------------------------

def make_nonce() -> bytes:
    """A fresh random nonce."""
    return secrets.token_bytes(NONCE_BYTES)


def proof(token: bytes, role: str, borrower_nonce: bytes, lender_nonce: bytes) -> bytes:
    """HMAC-SHA256 of both nonces under the token; ``role`` ("lender" or "borrower") keeps one
    side's proof from being echoed back as the other's."""
    return hmac.new(token, role.encode() + b"\0" + borrower_nonce + lender_nonce,
                    hashlib.sha256).digest()


def check_proof(token: bytes, role: str, borrower_nonce: bytes, lender_nonce: bytes,
                got: bytes) -> bool:
    """Whether ``got`` is the right proof, compared in constant time."""
    return hmac.compare_digest(proof(token, role, borrower_nonce, lender_nonce), got)


def load_token(token: str | bytes | None = None, *, token_file: str | os.PathLike[str] | None
               = None, token_env: str | None = None) -> bytes:
    """The shared secret: given directly, read from a file (surrounding whitespace stripped),
    or from an environment variable (default :data:`TOKEN_ENV`), in that order.

    Raises
    ------
    InvalidArgumentError
        No token anywhere, an unreadable file, or a token shorter than
        :data:`MIN_TOKEN_BYTES` bytes (make one with ``python -c "import secrets;
        print(secrets.token_hex(32))"``).
    """
    where = "the token argument"
    if token is not None:
        raw = token.encode() if isinstance(token, str) else bytes(token)
    elif token_file is not None:
        where = f"token file {os.fspath(token_file)!r}"
        try:
            # O_NONBLOCK: a FIFO in the token's place must not hang the lender at start.
            fd = os.open(token_file, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read {where}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgumentError(f"{where} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_TOKEN_FILE + 1)
        if len(raw) > MAX_TOKEN_FILE:
            raise InvalidArgumentError(f"{where} is over {MAX_TOKEN_FILE} bytes: not a token")
    else:
        name = token_env or TOKEN_ENV
        where = f"environment variable {name}"
        value = os.environ.get(name)
        if value is None:
            raise InvalidArgumentError(f"no token: set {name}, or pass a token file")
        raw = value.encode()
    raw = raw.strip()
    if len(raw) < MIN_TOKEN_BYTES:
        raise InvalidArgumentError(
            f"the token from {where} has {len(raw)} bytes; at least {MIN_TOKEN_BYTES} are "
            f"needed (e.g. python -c \"import secrets; print(secrets.token_hex(32))\")")
    return raw


MAX_TOKEN_FILE = 4096


# ---- helpers -----------------------------------------------------------------------------------

def _check_fields(body: dict, fields: Mapping[str, Callable[[Any], Any]],
                  what: str = "message") -> dict:
    extra = set(body) - set(fields)
    missing = set(fields) - set(body)
    if extra or missing:
        raise RemoteProtocolError(f"{what}: unexpected fields {sorted(map(str, extra))[:5]}, "
                                  f"missing {sorted(missing)}")
    out = {}
    for name, check in fields.items():
        try:
            out[name] = check(body[name])
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"{what}.{name}: {exc}") from None
    return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
