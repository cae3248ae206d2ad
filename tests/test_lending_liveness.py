"""Liveness of ledger entries (Note [Liveness]): start times, zombies, and what counts as
unknown (never recovered): another or an unreadable pid namespace, an unreadable /proc entry."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

from aqua_offload import lending
from aqua_offload.lending import liveness
from aqua_offload.lending.liveness import identity, is_alive, proc_start

MiB = 1 << 20


def test_liveness_uses_start_time_and_sees_zombies():
    me = identity()
    assert me.pid == os.getpid() and me.start == proc_start(os.getpid()) and me.start > 0
    assert is_alive(*me) is True
    assert is_alive(me.pid, me.start + 1, me.ns) is False  # same pid, another process: reused
    assert is_alive(me.pid, me.start, "pid:[1]") is None  # another namespace: unknown
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # not reaped yet: a zombie once it exits
        start = proc_start(child.pid) if start is None else start
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert start is not None
    assert is_alive(child.pid, start, me.ns) is False
    child.wait()
    assert is_alive(child.pid, start, me.ns) is False  # reaped: no such pid


def _unreadable(monkeypatch, pid, exc):
    real = open

    def fake(path, *args, **kwargs):
        if path == f"/proc/{pid}/stat":
            raise exc
        return real(path, *args, **kwargs)

    monkeypatch.setattr(liveness, "open", fake, raising=False)


def test_unreadable_proc_entry_is_unknown_not_dead(monkeypatch):
    me = identity()
    pid = 4_000_000  # above any pid_max: surely not running
    _unreadable(monkeypatch, pid, PermissionError(errno.EACCES, "Permission denied"))
    assert is_alive(pid, 1, me.ns) is None  # hidepid, another user: cannot tell
    _unreadable(monkeypatch, pid, OSError(errno.EIO, "I/O error"))
    assert is_alive(pid, 1, me.ns) is None
    _unreadable(monkeypatch, pid, ProcessLookupError(errno.ESRCH, "No such process"))
    assert is_alive(pid, 1, me.ns) is False  # exited while read: gone
    monkeypatch.undo()
    assert is_alive(pid, 1, me.ns) is False  # no such pid: gone


def test_unknown_namespace_is_never_compared(monkeypatch):
    me = identity()
    pid = 4_000_000
    assert is_alive(pid, 1, me.ns) is False
    assert is_alive(pid, 1, "") is None  # the entry's namespace could not be read
    monkeypatch.setattr(liveness, "_SELF", me._replace(ns=""))
    assert is_alive(pid, 1, "") is None  # nor ours, with /proc there
    assert is_alive(pid, 1, me.ns) is None


def test_unknown_liveness_is_never_recovered(ledger_path, monkeypatch):
    o = lending.offer("emu:1", "4MiB")
    me = identity()
    rows = {"hidden": (4_000_000, me.ns), "no-ns": (4_000_001, "")}
    _unreadable(monkeypatch, 4_000_000, PermissionError(errno.EACCES, "Permission denied"))
    with lending.Ledger().transaction() as st:
        for pid, ns in rows.values():
            cid = st.new_id()
            st.consumers.append({"id": cid, "pid": pid, "start": 1, "ns": ns, "sock": "@x",
                                 "backend": "emulation", "device": "cpu", "keys": ["emu:1"],
                                 "since": 0.0})
            st.leases.append({"id": st.new_id(), "consumer": cid, "offer": o.id,
                              "key": "emu:1", "bytes": MiB, "return": 0, "asked": None,
                              "error": None, "error_t": None, "since": 0.0})
    view = lending.view()  # a leak rather than a double grant
    assert sorted(c["pid"] for c in view["consumers"]) == [4_000_000, 4_000_001]
    assert view["devices"][0]["leased"] == 2 * MiB and view["recovered"] == []
    with lending.Ledger().transaction() as st:
        st.leases.clear()
        st.consumers.clear()
    o.withdraw()
