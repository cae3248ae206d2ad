"""The NIXL agent, wrapped: registration, metadata, and transfers under a deadline.

NIXL (``pip install nixl-cu13``, the ``remote`` extra) is imported on first use, so the package
imports without it; :func:`nixl_unavailable` says why it cannot be used.

Note [Progress]
    NIXL's Python wrapper starts the agent's progress thread with no delay between polls, which
    spins a whole core. This module drives the bindings directly: a borrower's agent has no
    progress thread at all (its transfers progress when it polls their status), and a lender's
    agent, which must progress for transports where the target takes part (TCP), runs the
    thread with ``progress_delay_us`` > 0: it then sleeps in poll() on the UCX workers' event
    descriptors and wakes on traffic, or at the latest after the delay.

Note [Deadlines]
    NIXL has no transfer timeout: a lender that stops progressing leaves a transfer "in
    progress" forever. :meth:`Agent.transfer` posts, then polls the status with short sleeps
    (the GIL is released while it sleeps, and the bindings release it inside NIXL calls) until
    the transfer completes, fails, or the deadline passes. At the deadline the request is
    released, which cancels it where UCX can; a request NIXL refuses to release is kept (the
    memory it touches must then stay registered: :attr:`Agent.wedged` counts them) and the
    caller sees :class:`TransferTimeout`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendError, RemoteLostError

__all__ = ["nixl_unavailable", "Agent", "Registration", "TransferTimeout", "bindings",
           "NIXL_VERSION"]

NIXL_VERSION = "1.5.1"
_bindings: Any = None
_import_error: str | None = None


def bindings() -> Any:
    """The NIXL bindings module (``nixl_cu13._bindings``).

    Raises
    ------
    BackendError
        NIXL is not installed or does not load (``error_name="nixl_unavailable"``).
    """
    global _bindings, _import_error
    if _bindings is None and _import_error is None:
        try:
            import nixl_cu13._bindings as b  # noqa: PLC0415 - optional, imported on first use
            _bindings = b
        except Exception as exc:  # noqa: BLE001 - ImportError, or an OSError from a .so
            _import_error = f"{type(exc).__name__}: {exc}"
    if _bindings is None:
        raise BackendError(f"NIXL cannot be used ({_import_error}); install the 'remote' extra: "
                           f"pip install 'aqua_offload[remote]' (nixl-cu13=={NIXL_VERSION})",
                           error_name="nixl_unavailable")
    return _bindings


def nixl_unavailable() -> str | None:
    """None when NIXL loads, else why not."""
    try:
        bindings()
    except BackendError as exc:
        return str(exc)
    return None


class TransferTimeout(Exception):
    """A transfer did not complete within its deadline (internal; callers map it)."""


@dataclass(eq=False)  # identity: an agent finds its registrations without comparing fields
class Registration:
    """Memory registered with an agent in one call: its (address, bytes) ranges, of one kind
    and device."""

    ranges: tuple[tuple[int, int], ...]
    kind: str  # "DRAM" or "VRAM"
    device: int
    _dlist: Any = None


def _status_name(exc: BaseException) -> str:
    return type(exc).__name__


class Agent:
    """One NIXL agent with the UCX backend.

    Parameters
    ----------
    name : str
        Agent name, unique among the agents that talk to each other.
    progress_thread : bool
        Run NIXL's progress thread (lenders: yes; borrowers: no, see Note [Progress]).
    progress_delay_us : int
        Longest sleep of the progress thread between polls when idle (rounded up to whole
        milliseconds by NIXL); > 0 so that the thread does not spin.
    """

    def __init__(self, name: str, *, progress_thread: bool = False,
                 progress_delay_us: int = 5000) -> None:
        b = bindings()
        cfg = b.nixlAgentConfig()
        cfg.useProgThread = bool(progress_thread)
        cfg.useListenThread = False  # Never NIXL's unauthenticated metadata listener.
        cfg.pthrDelay = max(1000, int(progress_delay_us))
        cfg.lthrDelay = 100000
        cfg.syncMode = b.NIXL_THREAD_SYNC_STRICT
        cfg.captureTelemetry = False
        self.name = name
        self._b = b
        try:
            self._agent = b.nixlAgent(name, cfg)
            if "UCX" not in self._agent.getAvailPlugins():
                raise BackendError("NIXL has no UCX plugin", error_name="nixl_no_ucx")
            self._backend = self._agent.createBackend("UCX", {})
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - NIXL's own exception classes
            raise BackendError(f"NIXL agent {name!r}: the UCX backend did not start ({exc}); "
                               f"is UCX_TLS valid?", error_name=_status_name(exc)) from None
        self._mem = {"DRAM": b.DRAM_SEG, "VRAM": b.VRAM_SEG}
        self._lock = threading.Lock()  # guards _remotes and _regs
        self._remotes: set[str] = set()
        self._regs: dict[int, Registration] = {}  # id() -> the registration
        self.wedged: list[int] = []  # request handles NIXL would not release
        self.closed = False

    # ---- memory --------------------------------------------------------------------------
    def register(self, addr: int, nbytes: int, kind: str = "DRAM", device: int = 0
                 ) -> Registration:
        """Register one region (``kind`` "DRAM" or "VRAM" of CUDA ``device``)."""
        return self.register_many([(addr, nbytes)], kind, device)

    def register_many(self, ranges: list[tuple[int, int]], kind: str = "DRAM", device: int = 0
                      ) -> Registration:
        """Register (address, bytes) ranges in one NIXL call; they are deregistered together.
        A range listed twice is registered once: NIXL crashes deregistering a list that holds
        one twice (the same tensor twice in a batch)."""
        ranges = tuple(dict.fromkeys((int(a), int(n)) for a, n in ranges))
        dl = self._b.nixlRegDList(self._mem[kind], [(a, n, int(device), "") for a, n in ranges])
        try:
            self._agent.registerMem(dl, [self._backend])
        except Exception as exc:  # noqa: BLE001
            what = ", ".join(f"{n} bytes at 0x{a:x}" for a, n in ranges[:4])
            raise BackendError(f"NIXL could not register {kind} memory ({what})",
                               error_name=_status_name(exc)) from None
        reg = Registration(ranges, kind, int(device), dl)
        with self._lock:
            self._regs[id(reg)] = reg
        return reg

    def deregister(self, reg: Registration) -> None:
        """Deregister ``reg``; kept registered (and leaked) while a wedged transfer may still
        touch it, since deregistering under a live transfer is a use-after-free in UCX."""
        with self._lock:
            if self._regs.pop(id(reg), None) is not reg:
                return
        if self.wedged:
            return
        try:
            self._agent.deregisterMem(reg._dlist, [self._backend])
        except Exception:  # noqa: BLE001 - nothing more to do for it
            pass

    def metadata(self) -> bytes:
        """This agent's metadata (connection info and every registration), for a peer."""
        return bytes(self._agent.getLocalMD())

    def load_remote(self, metadata: bytes) -> str:
        """Load (or refresh) a peer's metadata; returns its agent name."""
        try:
            name = self._agent.loadRemoteMD(metadata)
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"NIXL refused the lender's metadata ({exc})",
                               error_name=_status_name(exc)) from None
        name = name.decode() if isinstance(name, bytes) else str(name)
        with self._lock:
            self._remotes.add(name)
        return name

    def forget_remote(self, name: str) -> None:
        with self._lock:
            if name not in self._remotes:
                return
            self._remotes.discard(name)
        try:
            self._agent.invalidateRemoteMD(name)
        except Exception:  # noqa: BLE001 - a dead peer: nothing to forget
            pass

    # ---- transfers -----------------------------------------------------------------------
    def transfer(self, op: str, local: np.ndarray, local_kind: str, remote: np.ndarray,
                 remote_kind: str, peer: str, deadline: float, address: str = "") -> None:
        """One NIXL transfer of every row of ``local``/``remote`` (N x 3 uint64 arrays of
        address, bytes, device), ``op`` "WRITE" (local -> remote) or "READ". Returns when it
        completed; see Note [Deadlines].

        Raises
        ------
        TransferTimeout
            Not complete at ``deadline`` (a ``time.monotonic()`` instant).
        RemoteLostError
            NIXL reports the peer disconnected.
        BackendError
            Any other NIXL failure.
        """
        b = self._b
        opcode = b.NIXL_WRITE if op == "WRITE" else b.NIXL_READ
        try:
            ld = b.nixlXferDList(self._mem[local_kind], local)
            rd = b.nixlXferDList(self._mem[remote_kind], remote)
            handle = self._agent.createXferReq(opcode, ld, rd, peer, "", [self._backend])
        except Exception as exc:  # noqa: BLE001
            raise self._map(exc, "prepare", address) from None
        done = False
        try:
            t0 = time.monotonic()
            status = self._agent.postXferReq(handle)
            while status == b.NIXL_IN_PROG:
                now = time.monotonic()
                if now >= deadline:
                    raise TransferTimeout()
                # The first 30 us poll at once (small transfers finish there; a sleep would
                # cost more than they take). Then sleep a sixteenth of the time waited so far
                # (at most 1 ms): a transfer is seen done within ~6% of its duration, and the
                # GIL is free while sleeping.
                if now - t0 > 30e-6:
                    time.sleep(min(1e-3, (now - t0) / 16))
                status = self._agent.getXferStatus(handle)
            if status != b.NIXL_SUCCESS:
                raise BackendError(f"NIXL transfer failed: {status}", error_name=str(status))
            done = True
        except (TransferTimeout, BackendError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._map(exc, op, address) from None
        finally:
            self._release(handle, done)

    def _release(self, handle: int, done: bool) -> None:
        try:
            self._agent.releaseXferReq(handle)
        except Exception:  # noqa: BLE001
            if not done:
                self.wedged.append(handle)

    def _map(self, exc: BaseException, what: str, address: str) -> Exception:
        if isinstance(exc, self._b.nixlRemoteDisconnectError):
            return RemoteLostError(f"the lender at {address or '?'} disconnected ({what})",
                                   address=address, reason="disconnected")
        return BackendError(f"NIXL {what} failed: {exc}", error_name=_status_name(exc))

    def close(self) -> None:
        """Forget peers and deregister what is left (see :meth:`deregister`)."""
        if self.closed:
            return
        self.closed = True
        for name in list(self._remotes):
            self.forget_remote(name)
        for reg in list(self._regs.values()):
            self.deregister(reg)


def default_agent_name(prefix: str) -> str:
    """A name unique across hosts and processes: prefix, host, pid, a random suffix."""
    import secrets
    import socket

    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
