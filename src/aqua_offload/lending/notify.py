"""Wake-ups between lending processes: one Unix datagram socket per endpoint.

Note [Notification ordering]
Datagrams are hints, never data: the ledger is the only truth. A sender first commits its change
to the ledger (under the lock), releases the lock, then sends; a receiver, once woken, re-reads
the ledger. A wake-up therefore cannot be lost: an endpoint binds its socket *before* it
records its address in the ledger, and the kernel queues datagrams that arrive while the
receiver is busy, so a change committed after the receiver's last read always leaves a datagram
waiting. A datagram to a dead or busy peer is dropped silently: the peer either is gone (and the
ledger's recovery handles it) or has a datagram queued already (one is enough to re-read).

On Linux the sockets live in the abstract namespace (no file to clean up after a crash, no
108-byte path limit); elsewhere they are files in the ledger's directory. An address in the
ledger is ``"@name"`` (abstract) or a path.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import sys
import time

__all__ = ["Endpoint", "send"]

WAKE_OFFER = b"offer"  # more memory on offer: consumers try to grow
WAKE_RECLAIM = b"reclaim"  # a producer wants memory back: consumers return leases
WAKE_ACK = b"ack"  # a consumer returned memory (or died): producers re-check their reclaim
WAKE_STOP = b"stop"  # an endpoint wakes its own waiter to shut down

_ABSTRACT = sys.platform.startswith("linux")


def _sockaddr(address: str) -> str | bytes:
    return b"\0" + address[1:].encode() if address.startswith("@") else address


class Endpoint:
    """A bound datagram socket that wakes one waiter.

    Parameters
    ----------
    directory : str
        Where socket files go where abstract sockets are unavailable.
    role : str
        Part of the name, for people reading the ledger.
    """

    def __init__(self, directory: str, role: str) -> None:
        name = f"aqua_offload-{os.getuid()}-{role}-{os.getpid()}-{secrets.token_hex(4)}"
        self.address = f"@{name}" if _ABSTRACT else os.path.join(directory, name + ".sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(_sockaddr(self.address))
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise

    def wait(self, timeout: float | None) -> list[bytes]:
        """Block until at least one datagram arrives or ``timeout`` seconds pass; return every
        queued datagram (empty on timeout or when closed)."""
        if self._sock.fileno() < 0:
            return []
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ready, _, _ = select.select([self._sock], [], [], left)
            except (OSError, ValueError):  # closed by another thread
                return []
            if ready:
                break
            if deadline is not None and time.monotonic() >= deadline:
                return []
        got = []
        while True:
            try:
                got.append(self._sock.recv(64))
            except (BlockingIOError, InterruptedError):
                return got
            except OSError:
                return got

    def forget(self) -> None:
        """Close this process's descriptor only (a forked child's copy): the socket stays bound
        for the parent, and its file (off Linux) stays in place."""
        self._sock.close()

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        self._sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except OSError:
                pass


def send(address: str, message: bytes) -> bool:
    """Send one datagram; False when nobody listens there (dead peer, full queue)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        try:
            s.sendto(message, _sockaddr(address))
            return True
        except OSError:
            return False
