"""The borrower's side: :class:`RemoteClient`, one connection to one lender.

What the remote tier builds on: allocate and free blocks of the lender's arena, and move bytes
between local memory registered once (:meth:`RemoteClient.register`) and those blocks, a whole
batch as one NIXL transfer (:meth:`RemoteClient.write`, :meth:`RemoteClient.read`).

Note [Failure]
    Every control request and every transfer runs under the client's deadline. A lender that
    dies (its control connection closes, NIXL reports the disconnect) or stops answering (no
    reply, no transfer progress before the deadline) makes the client *lost*: the call raises
    :class:`~aqua_offload.errors.RemoteLostError`, and so does every later call, at once. The
    blocks it held are gone with the lender. A bad address, a wrong token or another protocol
    version fail the constructor with a typed error and leave nothing behind.

Note [Reclaim callback]
    When the lender reclaims memory it names the blocks it wants back. The client calls
    ``on_reclaim(blocks)`` in its own thread: the callback must move their data away (it may
    call :meth:`RemoteClient.read`) and return; the client then frees the blocks and answers.
    A callback that raises, or no callback, refuses: the blocks stay, and the lender's reclaim
    waits until they are freed. The callback's time is the borrower's reclaim latency.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import (BackendError, InvalidArgumentError, OffloadError, OutOfMemoryError,
                      RemoteAuthError, RemoteConnectError, RemoteLostError, RemoteProtocolError,
                      RemoteVersionError)
from . import protocol as P
from .items import Item, LocalRegion, RemoteBlock, Transfer, check_items, check_memory
from .transport import Agent, TransferTimeout, default_agent_name

__all__ = ["RemoteClient", "RemoteBlock", "LocalRegion", "Transfer", "parse_address"]

_WRITE_KEYS = ("writes", "items_written", "bytes_written")  # RemoteClient._stats per op
_READ_KEYS = ("reads", "items_read", "bytes_read")


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"`` for IPv6) as (host, port).

    Raises
    ------
    InvalidArgumentError
        Not of that form, or a port outside 1..65535.
    """
    if not isinstance(address, str) or ":" not in address or len(address) > 300:
        raise InvalidArgumentError(f"a lender address is 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"a lender address is 'host:port' with a port 1..65535, "
                                   f"got {address!r}")
    return host, int(port)


class RemoteClient:
    """A borrower's connection to one lender.

    Parameters
    ----------
    address : str
        The lender, ``"host:port"``.
    token : bytes or str
        The shared secret the lender was started with.
    deadline_s : float
        Longest wait for any request or transfer (default 5 s); see Note [Failure].
    on_reclaim : callable, optional
        ``on_reclaim(list[RemoteBlock])``; see Note [Reclaim callback].
    name : str, optional
        Name of this borrower's NIXL agent (default: unique per process).

    Raises
    ------
    InvalidArgumentError
        A malformed address, token or deadline.
    RemoteConnectError
        Nothing answers at the address within the deadline.
    RemoteAuthError
        The tokens differ.
    RemoteVersionError, RemoteProtocolError
        The peer speaks another protocol version, or is not a lender.
    """

    def __init__(self, address: str, token: bytes | str, deadline_s: float = 5.0, *,
                 on_reclaim: Callable[[list[RemoteBlock]], None] | None = None,
                 name: str | None = None) -> None:
        self.host, self.port = parse_address(address)
        self.address = address
        self._token = P.load_token(token)
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not (
                0 < deadline_s < 1e6):
            raise InvalidArgumentError(f"deadline_s must be a positive number of seconds, got "
                                       f"{deadline_s!r}")
        self.deadline_s = float(deadline_s)
        self.on_reclaim = on_reclaim
        self._lost: str | None = None
        self._closed = False
        self._blocks: dict[int, RemoteBlock] = {}
        self._regions: set[int] = set()  # id() of registered LocalRegions
        self._pending: dict[int, tuple[threading.Event, list]] = {}
        self._ids = itertools.count(1)
        self._state = threading.Lock()     # LOCK: _blocks, _pending, _lost, _stats
        self._send_lock = threading.Lock()  # one frame at a time on the socket
        self._xfer = threading.Lock()       # one NIXL transfer (or metadata load) at a time
        self._stats: dict[str, float] = {
            "writes": 0, "reads": 0, "items_written": 0, "items_read": 0, "bytes_written": 0,
            "bytes_read": 0, "allocs": 0, "frees": 0, "reclaims": 0, "reclaim_refusals": 0,
            "reclaim_last_s": 0.0, "reclaim_max_s": 0.0, "reclaim_total_s": 0.0,
            "reclaimed_blocks": 0, "md_loads": 0,
        }
        self._sock = self._connect()
        self._agent: Agent | None = None
        try:
            welcome = self._handshake()
            self.lender = dict(welcome.body)
            self._peer_kind = welcome.body["kind"]
            self._md_version = welcome.body["md_version"]
            self._agent = Agent(name or default_agent_name("aqua-borrower"))
            self._peer = self._agent.load_remote(welcome.blob)
            if self._peer != welcome.body["agent"]:
                raise RemoteProtocolError(f"the lender's metadata names agent {self._peer!r}, "
                                          f"not {welcome.body['agent']!r}", address=address)
        except BaseException:
            self._sock.close()
            if self._agent is not None:
                self._agent.close()
            raise
        self._sock.settimeout(0.25)  # the reader wakes up to notice close()
        self._reclaims: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read_loop, name="aqua-remote-reader",
                                        daemon=True)
        self._reader.start()
        self._reclaimer = threading.Thread(target=self._reclaim_loop,
                                           name="aqua-remote-reclaim", daemon=True)
        self._reclaimer.start()

    # ---- connection ------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.deadline_s)
        except (OSError, UnicodeError) as exc:
            raise RemoteConnectError(f"no lender answers at {self.address}: {exc}",
                                     address=self.address) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def _handshake(self) -> P.Message:
        deadline = time.monotonic() + self.deadline_s
        nonce = P.make_nonce()
        self._sock.sendall(P.encode(P.Kind.HELLO, 1, {"nonce": nonce.hex(),
                                                      "name": socket.gethostname()[:128]}))
        msg = self._recv_blocking(deadline)
        if msg.kind != P.Kind.CHALLENGE:
            raise RemoteProtocolError(f"the lender answered HELLO with {msg.kind.name}",
                                      address=self.address)
        lender_nonce = msg.body["nonce"]
        if not P.check_proof(self._token, "lender", nonce, lender_nonce, msg.body["proof"]):
            raise RemoteAuthError(f"the lender at {self.address} does not hold this token",
                                  address=self.address)
        self._sock.sendall(P.encode(P.Kind.AUTH, 2, {"proof": P.proof(
            self._token, "borrower", nonce, lender_nonce).hex()}))
        msg = self._recv_blocking(deadline)
        if msg.kind != P.Kind.WELCOME:
            raise RemoteProtocolError(f"the lender answered AUTH with {msg.kind.name}",
                                      address=self.address)
        if msg.body["kind"] not in ("DRAM", "VRAM"):
            raise RemoteProtocolError(f"unknown arena kind {msg.body['kind']!r}",
                                      address=self.address)
        return msg

    def _recv_blocking(self, deadline: float) -> P.Message:
        """One message during the handshake (an ERROR becomes its typed error)."""
        reader = P.FrameReader()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteConnectError(f"the lender at {self.address} did not finish the "
                                         f"handshake within {self.deadline_s} s",
                                         address=self.address)
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError as exc:
                raise RemoteConnectError(f"the lender at {self.address} closed the connection "
                                         f"({exc})", address=self.address) from None
            if not data:
                raise RemoteConnectError(f"the lender at {self.address} closed the connection "
                                         f"during the handshake", address=self.address)
            try:
                for msg in reader.feed(data):
                    if msg.kind == P.Kind.ERROR:
                        raise self._error(msg)
                    return msg
            except RemoteVersionError as exc:
                raise RemoteVersionError(str(exc), address=self.address, version=exc.version,
                                         supported=exc.supported) from None
            except RemoteProtocolError as exc:
                if exc.address:
                    raise
                raise RemoteProtocolError(f"{self.address}: {exc}", address=self.address) from None

    def _error(self, msg: P.Message, requested: int = 0) -> OffloadError:
        code, text = msg.body["code"], msg.body["message"]
        a = self.address
        if code == "auth":
            return RemoteAuthError(f"the lender at {a} refused the token", address=a)
        if code == "version":
            return RemoteVersionError(f"the lender at {a} refused this protocol version: {text}",
                                      address=a, supported=P.VERSION)
        if code == "oom":
            return OutOfMemoryError(text, requested=requested)
        if code == "invalid":
            return InvalidArgumentError(text)
        return RemoteProtocolError(f"the lender at {a} refused a message ({code}): {text}",
                                   address=a)

    # ---- reader thread ---------------------------------------------------------------------
    def _read_loop(self) -> None:
        reader = P.FrameReader()
        while not self._closed:
            try:
                data = self._sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as exc:
                self._lose(f"control connection failed ({exc})")
                return
            if not data:
                self._lose("the lender closed the control connection")
                return
            try:
                for msg in reader.feed(data):
                    self._dispatch(msg)
            except RemoteProtocolError as exc:
                self._lose(f"the lender sent a bad message: {exc}")
                return

    def _dispatch(self, msg: P.Message) -> None:
        if msg.kind == P.Kind.RECLAIM:
            self._reclaims.put((time.monotonic(), msg.body["reclaim"], msg.body["ids"]))
            return
        with self._state:
            slot = self._pending.pop(msg.request, None)
        if slot is not None:
            slot[1].append(msg)
            slot[0].set()
        elif msg.kind == P.Kind.ERROR and msg.request == 0:
            self._lose(f"the lender closed the session: {msg.body['message']}")

    def _lose(self, reason: str) -> None:
        with self._state:
            if self._lost is None and not self._closed:
                self._lost = reason
            pending, self._pending = self._pending, {}
        for event, _ in pending.values():
            event.set()

    def _check(self) -> None:
        if self._closed:
            raise InvalidArgumentError("the remote client is closed")
        if self._lost is not None:
            raise RemoteLostError(f"the lender at {self.address} is lost: {self._lost}",
                                  address=self.address, reason=self._lost)

    def _request(self, kind: P.Kind, body: dict, expect: P.Kind, requested: int = 0
                 ) -> P.Message:
        self._check()
        rid = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        event: threading.Event = threading.Event()
        box: list = []
        with self._state:
            self._pending[rid] = (event, box)
        deadline = time.monotonic() + self.deadline_s
        try:
            with self._send_lock:
                self._sock.settimeout(self.deadline_s)
                self._sock.sendall(P.encode(kind, rid, body))
        except OSError as exc:
            self._lose(f"cannot send to the lender ({exc})")
        if not event.wait(max(0.0, deadline - time.monotonic())):
            self._lose(f"no answer to {kind.name} within {self.deadline_s} s")
        with self._state:
            self._pending.pop(rid, None)
        if not box:
            self._check()
            raise RemoteLostError(f"the lender at {self.address} is lost",
                                  address=self.address, reason="no answer")
        msg = box[0]
        if msg.kind == P.Kind.ERROR:
            raise self._error(msg, requested)
        if msg.kind != expect:
            self._lose(f"the lender answered {kind.name} with {msg.kind.name}")
            self._check()
        return msg

    def _post(self, kind: P.Kind, body: dict, request: int = 0) -> None:
        """A message whose answer (if any) nobody waits for."""
        try:
            with self._send_lock:
                self._sock.settimeout(self.deadline_s)
                self._sock.sendall(P.encode(kind, request, body))
        except OSError as exc:
            self._lose(f"cannot send to the lender ({exc})")

    # ---- blocks ------------------------------------------------------------------------
    def allocate(self, sizes: Sequence[int]) -> list[RemoteBlock]:
        """Blocks of ``sizes`` bytes on the lender, all of them or none (one round trip).

        Raises
        ------
        OutOfMemoryError
            The lender cannot hold them all (nothing was allocated).
        """
        sizes = list(sizes)
        if not sizes or len(sizes) > P.MAX_ITEMS or any(
                type(n) is not int or not 0 < n <= P.MAX_INT for n in sizes):
            raise InvalidArgumentError(f"sizes must be 1..{P.MAX_ITEMS} positive ints")
        msg = self._request(P.Kind.ALLOC, {"sizes": sizes}, P.Kind.ALLOCATED,
                            requested=sum(sizes))
        blocks = [RemoteBlock(b["id"], n, b["addr"], b["segment"])
                  for b, n in zip(msg.body["blocks"], sizes)]
        if len(blocks) != len(sizes) or any(b["nbytes"] < n for b, n in
                                            zip(msg.body["blocks"], sizes)):
            self._lose("the lender answered ALLOC with the wrong blocks")
            self._check()
        with self._state:
            for b in blocks:
                self._blocks[b.id] = b
            self._stats["allocs"] += len(blocks)
        if msg.body["md_version"] > self._md_version:
            self._refresh_metadata()
        return blocks

    def free(self, blocks: Iterable[RemoteBlock], wait: bool = True) -> None:
        """Give ``blocks`` back: one round trip, or with ``wait=False`` one message that is not
        waited for (the lender handles it before any later request of this client, since one
        connection carries them in order; a refusal then only counts in the lender's
        ``request_errors``)."""
        blocks = list(blocks)
        if not blocks:
            return
        ids = [self._own(b).id for b in blocks]
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("a block is named twice")
        if wait:
            self._request(P.Kind.FREE, {"ids": ids}, P.Kind.FREED)
        else:
            self._check()
            # a request id nobody waits for: the reader drops the answer
            self._post(P.Kind.FREE, {"ids": ids}, next(self._ids) & 0xFFFFFFFF or 1)
        with self._state:
            for i in ids:
                self._blocks.pop(i, None)
            self._stats["frees"] += len(ids)

    @property
    def blocks(self) -> list[RemoteBlock]:
        """The blocks this client holds."""
        with self._state:
            return list(self._blocks.values())

    def _own(self, b: Any) -> RemoteBlock:
        if not isinstance(b, RemoteBlock):
            raise InvalidArgumentError(f"expected a RemoteBlock, got {type(b).__name__}")
        with self._state:
            if self._blocks.get(b.id) != b:
                raise InvalidArgumentError(f"block {b.id} is not held by this client (freed, "
                                           f"reclaimed, or another client's)")
        return b

    def _refresh_metadata(self) -> None:
        msg = self._request(P.Kind.GET_METADATA, {}, P.Kind.METADATA)
        with self._xfer:
            assert self._agent is not None
            self._agent.load_remote(msg.blob)
            self._md_version = max(self._md_version, msg.body["md_version"])
            self._stats["md_loads"] += 1

    # ---- local memory ----------------------------------------------------------------------
    def register(self, tensor: Any) -> LocalRegion:
        """Register a contiguous tensor's memory once for transfers (CPU or CUDA); keep the
        region while transfers use it."""
        import torch

        if not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous():
            raise InvalidArgumentError("register() takes a contiguous torch.Tensor")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            raise InvalidArgumentError("register() takes a tensor of at least one byte")
        if tensor.device.type == "cuda":
            kind, dev = "VRAM", tensor.device.index or 0
        elif tensor.device.type == "cpu":
            kind, dev = "DRAM", 0
        else:
            raise InvalidArgumentError(f"cannot register memory of device {tensor.device}")
        return self.register_memory(tensor.data_ptr(), nbytes, kind, dev, owner=tensor)

    def register_memory(self, addr: int, nbytes: int, kind: str = "DRAM", device: int = 0, *,
                        owner: Any = None) -> LocalRegion:
        """Register ``nbytes`` of memory at ``addr`` (``kind`` "DRAM", or "VRAM" of CUDA
        ``device``). The region keeps ``owner`` alive; without one, the caller keeps the
        memory alive until :meth:`unregister`."""
        if kind not in ("DRAM", "VRAM") or type(addr) is not int or type(nbytes) is not int \
                or addr <= 0 or nbytes <= 0:
            raise InvalidArgumentError(f"register_memory: a positive address and size of DRAM "
                                       f"or VRAM, got {addr!r}, {nbytes!r}, {kind!r}")
        self._check()
        assert self._agent is not None
        with self._xfer:
            reg = self._agent.register(addr, nbytes, kind, device)
        region = LocalRegion(addr, nbytes, kind, device, owner)
        object.__setattr__(region, "_reg", reg)
        with self._state:
            self._regions.add(id(region))
        return region

    def unregister(self, region: LocalRegion) -> None:
        """Deregister a region (no transfer may use it afterwards)."""
        with self._state:
            if id(region) not in self._regions:
                raise InvalidArgumentError("this region is not registered with this client")
            self._regions.discard(id(region))
        if self._agent is not None:
            with self._xfer:
                self._agent.deregister(region._reg)  # type: ignore[attr-defined]

    # ---- transfers -------------------------------------------------------------------------
    def write(self, items: Sequence[Item], deadline_s: float | None = None) -> None:
        """Copy local bytes to remote blocks: the whole batch as one NIXL transfer (one per
        kind of local memory when CPU and GPU regions are mixed).

        Items are :class:`Transfer` or tuples ``(local, block, offset, nbytes)`` where
        ``local`` is a :class:`LocalRegion` or ``(region, local_offset)`` and ``offset`` is
        the offset in the block. Every item is checked before anything moves.

        NIXL moves the bytes outside torch's CUDA streams: for CUDA regions, the caller orders
        the call after the kernels that write (or read) them, e.g. by synchronizing their
        stream first. The call returns when the bytes have arrived.
        """
        self._run("WRITE", items, deadline_s)

    def read(self, items: Sequence[Item], deadline_s: float | None = None) -> None:
        """Copy remote blocks to local memory; items as in :meth:`write`."""
        self._run("READ", items, deadline_s)

    def write_memory(self, pieces: Sequence[tuple[int, int, RemoteBlock, int]],
                     deadline_s: float | None = None) -> bool:
        """Copy host memory that is not registered to remote blocks, pieces ``(address,
        bytes, block, block offset)`` checked as in :meth:`write`, in one transfer: the
        memory is registered for this call only (one NIXL call for every piece) and the
        caller keeps it alive meanwhile. False, having moved nothing, if NIXL refuses it."""
        return self._memory("WRITE", pieces, deadline_s)

    def read_memory(self, pieces: Sequence[tuple[int, int, RemoteBlock, int]],
                    deadline_s: float | None = None) -> bool:
        """Copy remote blocks to host memory that is not registered; as :meth:`write_memory`."""
        return self._memory("READ", pieces, deadline_s)

    def _memory(self, op: str, pieces: Sequence[tuple[int, int, RemoteBlock, int]],
                deadline_s: float | None) -> bool:
        self._check()
        with self._state:
            batch = check_memory(pieces, self._blocks)
        dev = self.lender["device"]
        return self._move(op, {"DRAM": ([(a, n, 0) for a, n, _, _ in batch], [
            (b.addr + bo, n, dev) for _, n, b, bo in batch])}, len(batch),
            sum(p[1] for p in batch), deadline_s, [(a, n) for a, n, _, _ in batch])

    def _run(self, op: str, items: Sequence[Item], deadline_s: float | None) -> None:
        self._check()
        with self._state:
            batch = check_items(items, self._regions, self._blocks)
        dev = self.lender["device"]
        groups: dict[str, tuple[list, list]] = {}  # local kind -> (local rows, remote rows)
        for r, lo, b, bo, n in batch:
            g = groups.get(r.kind)
            if g is None:
                g = groups[r.kind] = ([], [])
            g[0].append((r.addr + lo, n, r.device))
            g[1].append((b.addr + bo, n, dev))
        self._move(op, groups, len(batch), sum(t[4] for t in batch), deadline_s)

    def _move(self, op: str, groups: dict[str, tuple[list, list]], items: int, nbytes: int,
              deadline_s: float | None, register: list[tuple[int, int]] | None = None) -> bool:
        """One NIXL transfer per kind of local memory of (address, bytes, device) rows, with
        the ``register`` ranges registered around them; False if NIXL refuses those."""
        if not items:
            return True
        limit = self.deadline_s if deadline_s is None else float(deadline_s)
        assert self._agent is not None
        with self._xfer:
            self._check()
            # from here: time spent waiting for another thread's transfer is not this one's
            deadline = time.monotonic() + limit
            try:
                reg = self._agent.register_many(register) if register else None
            except BackendError:
                return False
            try:
                for kind, (local, remote) in groups.items():
                    self._agent.transfer(op, np.array(local, dtype=np.uint64), kind,
                                         np.array(remote, dtype=np.uint64), self._peer_kind,
                                         self._peer, deadline, self.address)
            except TransferTimeout:
                self._lose(f"a {op} made no progress within {limit} s")
                self._check()
            except RemoteLostError as exc:
                self._lose(exc.reason or "disconnected")
                raise
            finally:  # (kept registered if a transfer wedged: Note [Deadlines] in transport)
                if reg is not None:
                    self._agent.deregister(reg)
        keys = _WRITE_KEYS if op == "WRITE" else _READ_KEYS
        with self._state:
            self._stats[keys[0]] += 1
            self._stats[keys[1]] += items
            self._stats[keys[2]] += nbytes
        return True

    # ---- reclaim ---------------------------------------------------------------------------
    def _reclaim_loop(self) -> None:
        while True:
            job = self._reclaims.get()
            if job is None:
                return
            t0, reclaim, ids = job
            with self._state:
                held = [self._blocks[i] for i in ids if i in self._blocks]
            ok = not held  # blocks already freed: nothing to move
            if self.on_reclaim is not None and held:
                try:
                    self.on_reclaim(held)
                    ok = True
                except Exception:  # noqa: BLE001 - a refusal; the lender keeps waiting
                    ok = False
            seconds = time.monotonic() - t0
            with self._state:
                # the callback may have freed some itself: answer for the rest
                held = [b for b in held if self._blocks.get(b.id) == b]
                if ok:
                    for b in held:
                        self._blocks.pop(b.id, None)
                    self._stats["reclaims"] += 1
                    self._stats["reclaimed_blocks"] += len(held)
                    self._stats["reclaim_last_s"] = seconds
                    self._stats["reclaim_max_s"] = max(self._stats["reclaim_max_s"], seconds)
                    self._stats["reclaim_total_s"] += seconds
                else:
                    self._stats["reclaim_refusals"] += 1
            freed = [b.id for b in held] if ok else []
            refused = [] if ok else [b.id for b in held]
            self._post(P.Kind.RECLAIMED, {"reclaim": reclaim, "ids": freed, "refused": refused,
                                          "micros": int(seconds * 1e6)})

    # ---- state -------------------------------------------------------------------------------
    @property
    def lost(self) -> str | None:
        """Why the lender is lost, or None while it serves."""
        return self._lost

    def stats(self) -> dict[str, Any]:
        """This borrower's counters, held blocks and bytes, and whether the lender is lost."""
        with self._state:
            out: dict[str, Any] = dict(self._stats)
            out["blocks"] = len(self._blocks)
            out["bytes_held"] = sum(b.nbytes for b in self._blocks.values())
            out["lost"] = self._lost
            out["deadline_s"] = self.deadline_s
            return out

    def lender_stats(self) -> dict[str, float]:
        """The lender's :meth:`~aqua_offload.remote.Lender.stats` (one round trip)."""
        return dict(self._request(P.Kind.STATS, {}, P.Kind.STATS_REPLY).body["stats"])

    def ping(self) -> float:
        """Round-trip time of the control channel in seconds."""
        t0 = time.perf_counter()
        self._request(P.Kind.PING, {}, P.Kind.PONG)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Say goodbye and drop the connection (the lender frees this client's blocks)."""
        if self._closed:
            return
        if self._lost is None:
            self._post(P.Kind.BYE, {})
        self._closed = True
        self._reclaims.put(None)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(5)
        if threading.current_thread() is not self._reclaimer:
            self._reclaimer.join(5)
        with self._xfer:
            if self._agent is not None:
                self._agent.close()
        with self._state:
            self._blocks.clear()
            self._regions.clear()

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
