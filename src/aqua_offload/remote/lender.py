"""The lender: serves an arena of host or GPU memory to authenticated borrowers over NIXL.

A :class:`Lender` listens on one address (loopback by default), runs one thread that serves
every connection with ``selectors`` (a slow or hostile peer cannot block the others), and
registers its arena with a NIXL agent whose metadata it hands only to borrowers that passed the
token handshake (:mod:`.protocol`). Blocks belong to the connection that allocated them: when
it closes, they are freed.

Note [Robustness]
    Every byte a peer sends goes through :class:`.protocol.FrameReader`; a message that breaks
    the protocol (garbage, a truncated or huge frame, another version, a message out of turn,
    a wrong token) earns one ERROR frame and the connection is closed. Request errors (a block
    that does not fit, ids this session does not hold) are answered with an ERROR and the
    session goes on. An unexpected exception while serving one connection closes that
    connection only; the serving loop itself never stops on a peer's account. Connections that
    do not finish the handshake within ``handshake_timeout_s`` are closed, and at most
    ``max_connections`` are open at once.

Note [Reclaim]
    :meth:`Lender.reclaim` marks whole segments draining (no new blocks there), asks each
    borrower holding blocks in them to give them back (RECLAIM), and releases a segment (NIXL
    deregistration, then the memory) once its last block is freed: by the borrower's RECLAIMED
    answer, a FREE, or its connection closing. Nothing is taken from under a borrower. The
    time from the ask to the release is the lender's reclaim latency; the borrower reports its
    own (ask received to answer sent) in RECLAIMED.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import (BackendError, InvalidArgumentError, OffloadError, OutOfMemoryError,
                      RemoteProtocolError, RemoteVersionError)
from ..sizes import parse_size
from . import protocol as P
from .arena import Arena, Segment
from .transport import Agent, default_agent_name

__all__ = ["Lender", "ReclaimTicket"]

log = logging.getLogger("aqua_offload.remote.lender")
MAX_OUT = 64 << 20  # bytes queued to one slow reader before it is dropped
HANDSHAKE_JSON = 4096  # the largest frame before a peer authenticated (HELLO/AUTH are ~150 B)


@dataclass
class ReclaimTicket:
    """A reclaim in progress: :meth:`wait` returns when all its segments are released."""

    id: int
    nbytes: int
    t0: float
    segments: set[int]
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float | None = None

    def wait(self, timeout: float | None = None) -> bool:
        """True when the reclaim completed within ``timeout`` seconds."""
        return self.done.wait(timeout)


class _Conn:
    def __init__(self, sock: socket.socket, peer: str, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.reader = P.FrameReader(max_json=HANDSHAKE_JSON, max_blob=0)
        self.out = bytearray()
        self.stage = "hello"
        self.session = 0
        self.name = ""
        self.borrower_nonce = b""
        self.lender_nonce = b""
        self.deadline = deadline
        self.closing = False


class Lender:
    """Lend host memory (``host_bytes``) or GPU memory (``device="cuda:N"``, ``nbytes``) to
    borrowers on other processes or nodes.

    Parameters
    ----------
    token : bytes or str
        The shared secret (see :func:`.protocol.load_token`; at least 16 bytes).
    host_bytes : int or str, optional
        Size of a host-memory arena (pinned when CUDA is usable and ``pinned`` allows).
    device : str, optional
        ``"cuda:N"``: lend memory of that GPU instead (``nbytes`` of it).
    nbytes : int or str, optional
        Size of the GPU arena.
    address : str
        Address to bind (default ``127.0.0.1``: this host only). Only this address is bound.
    port : int
        TCP port (0: any free one; read :attr:`port`).
    segment_bytes : int or str
        Granule of growth and reclaim, and the largest block (default 64 MiB). Arena sizes are
        rounded down to whole segments; a positive size of less than one is refused.
    pinned : bool, optional
        Pin host memory (default: when CUDA is usable).
    """

    def __init__(self, token: bytes | str, *, host_bytes: int | str | None = None,
                 device: str | None = None, nbytes: int | str | None = None,
                 address: str = "127.0.0.1", port: int = 0, segment_bytes: int | str = "64MiB",
                 pinned: bool | None = None, name: str | None = None,
                 progress_delay_us: int = 5000, handshake_timeout_s: float = 5.0,
                 max_connections: int = 64) -> None:
        self._token = P.load_token(token)
        self.segment_bytes = parse_size(segment_bytes, name="segment_bytes")
        if device is None:
            if nbytes is not None:
                raise InvalidArgumentError("nbytes is for a GPU arena (device='cuda:N'); "
                                           "use host_bytes for host memory")
            size = parse_size(host_bytes if host_bytes is not None else 0, name="host_bytes")
            self.kind, self.device = "DRAM", 0
            self._torch_device = "cpu"
        else:
            if host_bytes is not None:
                raise InvalidArgumentError("give either host_bytes or device and nbytes")
            self.kind, self.device = "VRAM", _cuda_index(device)
            self._torch_device = f"cuda:{self.device}"
            size = parse_size(nbytes if nbytes is not None else 0, name="nbytes")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise InvalidArgumentError(f"port must be 0..65535, got {port!r}")
        if 0 < size < self.segment_bytes:  # (0 is an empty lender that grows later: elastic)
            raise InvalidArgumentError(
                f"an arena of {size} bytes is less than one segment ({self.segment_bytes} "
                f"bytes) and would lend nothing: lend at least segment_bytes, or give a "
                f"smaller segment_bytes")
        self._pinned = pinned
        self._handshake_timeout = float(handshake_timeout_s)
        self._max_connections = int(max_connections)
        self._lock = threading.RLock()  # LOCK: arena, conns, sessions, reclaims, stats
        self._agent = Agent(name or default_agent_name("aqua-lender"), progress_thread=True,
                            progress_delay_us=progress_delay_us)
        self.arena = Arena(self.segment_bytes, self._allocate, self._release)
        self._md_version = 0
        self._conns: dict[int, _Conn] = {}          # fd -> connection
        self._sessions: dict[int, _Conn] = {}       # session id -> connection
        self._next_session = 1
        self._reclaims: dict[int, ReclaimTicket] = {}
        self._next_reclaim = 1
        self._stats: dict[str, float] = {
            "connections": 0, "auth_failures": 0, "protocol_errors": 0, "version_errors": 0,
            "requests": 0, "request_errors": 0, "blocks_allocated": 0, "blocks_freed": 0,
            "grows": 0, "reclaims": 0, "reclaims_done": 0, "reclaim_last_s": 0.0,
            "reclaim_max_s": 0.0, "reclaim_total_s": 0.0, "reclaimed_bytes": 0,
            "borrower_reclaim_last_s": 0.0, "borrower_reclaim_max_s": 0.0,
            "reclaim_refused_blocks": 0, "refused_connections": 0,
        }
        try:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]  # v4/v6
            self._listener = socket.create_server((address, port), family=family, backlog=64)
        except (OSError, UnicodeError) as exc:
            self._agent.close()
            raise InvalidArgumentError(f"cannot listen on {address}:{port}: {exc}") from None
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.grow(size)
        except BaseException:
            self.close()
            raise

    # ---- public API ----------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``"host:port"`` borrowers connect to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> "Lender":
        """Serve in a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="aqua-remote-lender",
                                            daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`close` (from another thread or a signal)."""
        self._serve()

    def __enter__(self) -> "Lender":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def grow(self, nbytes: int) -> int:
        """Lend ``nbytes`` more (rounded down to whole segments); returns the bytes added."""
        count = int(nbytes) // self.segment_bytes
        added = 0
        with self._lock:
            try:
                for _ in range(count):  # one at a time: what was added before a failure stays
                    self.arena.grow(1)
                    added += 1
            except OffloadError:
                raise
            except (RuntimeError, MemoryError) as exc:  # torch: out of memory
                raise OutOfMemoryError(f"the lender could not allocate another segment of "
                                       f"{self.segment_bytes} bytes: {exc}",
                                       requested=self.segment_bytes) from None
            finally:
                if added:  # borrowers learn of new segments by this version
                    self._md_version += 1
                    self._stats["grows"] += 1
            return added * self.segment_bytes

    def reclaim(self, nbytes: int) -> ReclaimTicket:
        """Take back at least ``nbytes`` (whole segments, emptiest first); see Note [Reclaim]."""
        with self._lock:
            count = -(-int(nbytes) // self.segment_bytes)
            segs = self.arena.drain(count)
            ticket = ReclaimTicket(self._next_reclaim, len(segs) * self.segment_bytes,
                                   time.monotonic(), {s.id for s in segs})
            self._next_reclaim += 1
            if not segs:  # nothing left to take (0 bytes, or every segment drains already):
                ticket.seconds = 0.0  # done now; only _collect would ever set it otherwise
                ticket.done.set()
                return ticket
            self._reclaims[ticket.id] = ticket
            self._stats["reclaims"] += 1
            asks: dict[int, list[int]] = {}
            for s in segs:
                for bid in s.blocks:
                    asks.setdefault(self.arena.blocks[bid].owner, []).append(bid)
            for session, ids in asks.items():
                conn = self._sessions.get(session)
                if conn is not None:
                    for i in range(0, len(ids), P.MAX_ITEMS):
                        self._send(conn, P.Kind.RECLAIM, 0,
                                   {"reclaim": ticket.id, "ids": sorted(ids[i:i + P.MAX_ITEMS])})
            self._collect()
        self._wake()
        return ticket

    def stats(self) -> dict[str, float]:
        """Counters and sizes (see docs/remote.md)."""
        with self._lock:
            out = dict(self._stats)
            pending = [t for t in self._reclaims.values() if not t.done.is_set()]
            out.update({
                "arena_bytes": self.arena.nbytes, "lendable_bytes": self.arena.lendable,
                "used_bytes": self.arena.used, "segments": len(self.arena.segments),
                "blocks": len(self.arena.blocks), "sessions": len(self._sessions),
                "open_connections": len(self._conns), "reclaims_pending": len(pending),
                "reclaim_pending_bytes": sum(t.nbytes for t in pending),
                "md_version": self._md_version,
            })
            return out

    def close(self) -> None:
        """Stop serving, close every connection, release the arena. Idempotent."""
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        with self._lock:
            for conn in list(self._conns.values()):
                self._drop(conn)
            try:
                self._sel.close()
            except (OSError, ValueError):
                pass
            for s in (self._listener, self._wake_r, self._wake_w):
                s.close()
            self.arena.close()
            for t in self._reclaims.values():
                t.done.set()
            self._agent.close()

    # ---- memory --------------------------------------------------------------------------
    def _allocate(self, nbytes: int) -> tuple[int, Any, Any]:
        import torch

        if self.kind == "VRAM":
            mem = torch.empty(nbytes, dtype=torch.uint8, device=self._torch_device)
        else:
            pin = self._pinned
            if pin is None:
                pin = torch.cuda.is_available()
            mem = torch.empty(nbytes, dtype=torch.uint8, pin_memory=bool(pin))
        mem.zero_()  # commit the pages, and lend no stale data
        if self.kind == "VRAM":
            torch.cuda.synchronize(mem.device)  # the zeroing is done before anyone writes
        reg = self._agent.register(mem.data_ptr(), nbytes, self.kind, self.device)
        return mem.data_ptr(), mem, reg

    def _release(self, seg: Segment) -> None:
        self._agent.deregister(seg.handle)
        seg.memory = None

    # ---- serving loop ----------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=0.5)
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                raise
            for key, mask in events:
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                else:
                    self._service(key.data, mask)
            self._flush_all()
            self._expire()

    def _accept(self) -> None:
        for _ in range(16):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("lender: cannot accept (%s)", exc)
                return
            with self._lock:
                self._stats["connections"] += 1
                if len(self._conns) >= self._max_connections:
                    self._stats["refused_connections"] += 1
                    sock.close()
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                conn = _Conn(sock, f"{peer[0]}:{peer[1]}",
                             time.monotonic() + self._handshake_timeout)
                self._conns[sock.fileno()] = conn
                self._sel.register(sock, selectors.EVENT_READ, conn)

    def _service(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ and not conn.closing:
            try:
                data = conn.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                with self._lock:
                    self._drop(conn)
                return
            if data:
                try:
                    with self._lock:
                        for msg in conn.reader.feed(data):
                            if conn.closing:
                                break
                            self._handle(conn, msg)
                except RemoteVersionError as exc:
                    self._refuse(conn, "version", str(exc), "version_errors")
                except RemoteProtocolError as exc:
                    self._refuse(conn, "protocol", str(exc), "protocol_errors")
                except Exception as exc:  # noqa: BLE001 - see Note [Robustness]
                    log.exception("lender: error serving %s", conn.peer)
                    self._refuse(conn, "internal", f"internal error: {type(exc).__name__}",
                                 "protocol_errors")
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)

    def _refuse(self, conn: _Conn, code: str, message: str, counter: str) -> None:
        with self._lock:
            self._stats[counter] += 1
            self._send(conn, P.Kind.ERROR, 0, {"code": code, "message": _printable(message)})
            conn.closing = True
            conn.deadline = time.monotonic() + 2.0
            self._flush(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            for conn in list(self._conns.values()):
                if conn.stage != "ready" and now > conn.deadline and not conn.closing:
                    self._stats["protocol_errors"] += 1
                    self._drop(conn)
                elif conn.closing and (not conn.out or now > conn.deadline):
                    self._drop(conn)

    # ---- messages --------------------------------------------------------------------------
    def _handle(self, conn: _Conn, msg: P.Message) -> None:
        K = P.Kind
        if conn.stage == "hello":
            if msg.kind != K.HELLO:
                raise RemoteProtocolError(f"expected HELLO, got {msg.kind.name}")
            conn.borrower_nonce = msg.body["nonce"]
            conn.lender_nonce = P.make_nonce()
            conn.name = msg.body["name"]
            self._send(conn, K.CHALLENGE, msg.request, {
                "nonce": conn.lender_nonce.hex(),
                "proof": P.proof(self._token, "lender", conn.borrower_nonce,
                                 conn.lender_nonce).hex()})
            conn.stage = "auth"
            return
        if conn.stage == "auth":
            if msg.kind != K.AUTH:
                raise RemoteProtocolError(f"expected AUTH, got {msg.kind.name}")
            if not P.check_proof(self._token, "borrower", conn.borrower_nonce, conn.lender_nonce,
                                 msg.body["proof"]):
                self._refuse(conn, "auth", "wrong token", "auth_failures")
                return
            conn.stage = "ready"
            conn.reader.max_json, conn.reader.max_blob = P.MAX_JSON, P.MAX_BLOB
            conn.session = self._next_session
            self._next_session += 1
            self._sessions[conn.session] = conn
            self._send(conn, K.WELCOME, msg.request, {
                "agent": self._agent.name, "kind": self.kind, "device": self.device,
                "segment_bytes": self.segment_bytes, "arena_bytes": self.arena.lendable,
                "md_version": self._md_version, "session": conn.session},
                self._agent.metadata())
            return
        self._stats["requests"] += 1
        if msg.kind == K.ALLOC:
            try:
                blocks = self.arena.alloc(msg.body["sizes"], conn.session)
            except OutOfMemoryError as exc:
                self._stats["request_errors"] += 1
                self._send(conn, K.ERROR, msg.request,
                           {"code": "oom", "message": _printable(str(exc))})
                return
            self._stats["blocks_allocated"] += len(blocks)
            self._send(conn, K.ALLOCATED, msg.request,
                       {"blocks": [b.wire() for b in blocks], "md_version": self._md_version})
        elif msg.kind == K.FREE:
            n = self._free(conn, msg.body["ids"])
            if n < 0:
                self._send(conn, K.ERROR, msg.request,
                           {"code": "invalid", "message": "ids this session does not hold"})
            else:
                self._send(conn, K.FREED, msg.request, {"freed": n})
        elif msg.kind == K.RECLAIMED:
            n = self._free(conn, msg.body["ids"])
            self._stats["reclaim_refused_blocks"] += len(msg.body["refused"])
            s = msg.body["micros"] / 1e6
            self._stats["borrower_reclaim_last_s"] = s
            self._stats["borrower_reclaim_max_s"] = max(self._stats["borrower_reclaim_max_s"], s)
            if n < 0:
                self._stats["request_errors"] += 1
        elif msg.kind == K.GET_METADATA:
            self._send(conn, K.METADATA, msg.request, {"md_version": self._md_version},
                       self._agent.metadata())
        elif msg.kind == K.PING:
            self._send(conn, K.PONG, msg.request, {})
        elif msg.kind == K.STATS:
            self._send(conn, K.STATS_REPLY, msg.request, {"stats": self.stats()})
        elif msg.kind == K.BYE:
            conn.closing = True
            conn.deadline = time.monotonic() + 2.0
        else:
            raise RemoteProtocolError(f"a borrower does not send {msg.kind.name}")

    def _free(self, conn: _Conn, ids: list[int]) -> int:
        """Free ``ids`` if this session holds every one of them (all or nothing); -1 if not."""
        if len(set(ids)) != len(ids) or any(
                (b := self.arena.blocks.get(i)) is None or b.owner != conn.session for i in ids):
            self._stats["request_errors"] += 1
            return -1
        n = self.arena.free(ids, conn.session)
        self._stats["blocks_freed"] += n
        self._collect()
        return n

    def _collect(self) -> None:
        released = self.arena.collect()
        if not released:
            return
        self._md_version += 1
        self._stats["reclaimed_bytes"] += sum(s.nbytes for s in released)
        ids = {s.id for s in released}
        now = time.monotonic()
        for t in self._reclaims.values():
            if t.done.is_set():
                continue
            t.segments -= ids
            if not t.segments:
                t.seconds = now - t.t0
                self._stats["reclaims_done"] += 1
                self._stats["reclaim_last_s"] = t.seconds
                self._stats["reclaim_max_s"] = max(self._stats["reclaim_max_s"], t.seconds)
                self._stats["reclaim_total_s"] += t.seconds
                t.done.set()
        self._reclaims = {k: t for k, t in self._reclaims.items() if not t.done.is_set()}

    # ---- sending ---------------------------------------------------------------------------
    def _send(self, conn: _Conn, kind: P.Kind, request: int, body: dict, blob: bytes = b"") -> None:
        if conn.sock.fileno() < 0:
            return
        conn.out += P.encode(kind, request, body, blob)
        if len(conn.out) > MAX_OUT:
            log.warning("lender: %s reads too slowly; dropped", conn.peer)
            self._drop(conn)

    def _flush_all(self) -> None:
        with self._lock:
            for conn in list(self._conns.values()):
                if conn.out:
                    self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            del conn.out[:n]
        if conn.sock.fileno() < 0:
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        try:
            self._sel.modify(conn.sock, want, conn)
        except (KeyError, ValueError, OSError):
            pass
        if conn.closing and not conn.out:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        """Close a connection; its session's blocks are freed (a borrower that is gone holds
        nothing)."""
        fd = conn.sock.fileno()
        if fd >= 0:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self._conns.pop(fd, None)
            conn.sock.close()
        if conn.session and self._sessions.pop(conn.session, None) is not None:
            ids = [b.id for b in self.arena.owned(conn.session)]
            self._stats["blocks_freed"] += self.arena.free(ids, conn.session)
            self._collect()


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:1024]


def _cuda_index(device: str) -> int:
    text = str(device)
    if not text.startswith("cuda:") or not text[5:].isdigit() or not text[5:].isascii():
        raise InvalidArgumentError(f"device must be 'cuda:N', got {device!r}")
    import torch  # checked here: torch's own refusal is an AssertionError from deep inside

    index = int(text[5:])
    if not torch.cuda.is_available():
        raise BackendError(f"{device!r}: torch sees no CUDA device (lend host memory with "
                           "host_bytes / --host-bytes)", error_name="cudaErrorNoDevice")
    if index >= torch.cuda.device_count():
        raise InvalidArgumentError(
            f"{device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return index

