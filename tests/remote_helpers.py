"""Helpers of the remote suites (test_remote_*.py): the UCX environment for loopback tests,
whether NIXL loads, a test token, lender subprocesses and raw control connections.

Importing this module sets the UCX/NIXL environment before any agent exists (UCX reads it when
an agent's backend starts): loopback only, no InfiniBand modules (with the system RDMA
libraries installed, processes segfault at exit otherwise), NIXL warnings and errors only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_MODULES", "^ib*")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

import aqua_offload as aq  # noqa: E402
from aqua_offload.remote import nixl_unavailable  # noqa: E402

TOKEN = "test-token-" + "5f1e" * 8
NIXL_REASON = nixl_unavailable()
# Tests that need NIXL: marked `remote`, skipped with the reason where nixl_cu13 cannot import.
needs_nixl = [pytest.mark.remote,
              pytest.mark.skipif(NIXL_REASON is not None, reason=str(NIXL_REASON))]


def requires_nixl(fn):
    """Decorator form of ``needs_nixl`` for one test."""
    for mark in needs_nixl:
        fn = mark(fn)
    return fn


SPAWN_TIMEOUT_S = 60.0  # a lender starts in ~1 s; a loaded 2-core machine is slower
# The aqua_offload under test (the installed one in CI, src/ in a dev tree), for child processes.
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(aq.__file__)))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_ROOT] + sys.path),
               AQUA_OFFLOAD_REMOTE_TOKEN=TOKEN)
    env.update(extra)
    return env


class LenderProcess:
    """``aqua-offload lend`` in a child process; :attr:`address` once it serves."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        """``prefix``: a command that runs the lender (``ip netns exec NS``)."""
        self.ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
        self.log_path = tmp_path / f"lender-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "aqua_offload.remote", "--ready-file", str(self.ready),
             *args], env=env or child_env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the lender did not start (rc {self.proc.returncode}):\n"
                            f"{self.output()}")
            time.sleep(0.05)
        self.address = json.loads(self.ready.read_text())["address"]

    def output(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(SPAWN_TIMEOUT_S)
        self.log.close()

    def stop(self) -> int:
        """SIGTERM and wait (hard timeout); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(SPAWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("the lender ignored SIGTERM")
        finally:
            self.log.close()


def raw_connect(address: str, timeout: float = 10.0) -> socket.socket:
    """A plain TCP connection to a lender (for sending it anything at all)."""
    host, _, port = address.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=timeout)
    return s


def recv_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes the connection (or the timeout)."""
    sock.settimeout(timeout)
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return bytes(out)


def blocks_left(m, lender) -> int:
    """The blocks ``lender`` still holds for ``m`` besides ``m``'s open slab and cached blocks
    there (Note [Slabs], Note [Block cache]: kept while the manager lives), once every block
    ``m`` gave back reached the lender."""
    m.synchronize()
    i = [c.address for c in m._remote.clients].index(lender.address)
    return (lender.stats()["blocks"] - (i in m._remote._slabs)
            - len(m._remote._cache.get(i, [])))
