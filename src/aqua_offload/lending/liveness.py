"""Is the process that wrote a ledger entry still alive?

Note [Liveness]
A pid alone does not identify a process: pids are reused, and a recycled pid would keep a dead
consumer's lease (memory leaked) or a dead producer's offer (memory double-granted) alive
forever. An entry therefore records ``(pid, start, ns)``: the start time in clock ticks since
boot (``/proc/<pid>/stat`` field 22, fixed for the life of a process) and the pid namespace.
  - alive: /proc/<pid>/stat exists, has the recorded start time and is not a zombie.
  - dead: no such pid, another start time (the pid was reused), or a zombie (``Z``/``X``: the
    process exited; its memory, GPU memory included, is already freed, only its exit status
    waits for the parent).
  - unknown: the entry comes from another pid namespace (e.g. another container sharing the
    runtime directory), whose pids mean nothing here; or a namespace could not be read (an
    empty ``ns`` on either side, /proc being there: we cannot tell whether the pids compare);
    or /proc/<pid>/stat exists but cannot be read (EACCES: ``hidepid``, another user, an LSM).
    Unknown entries are never recovered: a lease is better leaked than double-granted.
    Only a missing pid (ENOENT, ESRCH) counts as gone: any other error reading /proc is not
    evidence of death.
Without /proc (not Linux) the start time and namespace are 0 and "" on every side and
liveness falls back to ``kill(pid, 0)``: pid reuse is not detected there.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

__all__ = ["Identity", "identity", "is_alive", "proc_start"]


class Identity(NamedTuple):
    """A process as recorded in the ledger."""

    pid: int
    start: int  # clock ticks since boot; 0 where /proc is missing
    ns: str  # pid namespace ("pid:[4026531836]"), "" where unknown


class _Unreadable(Exception):
    """/proc/<pid>/stat exists (or may) but cannot be read: liveness unknown."""


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after ``comm``, or None when there is no such pid; raises
    :class:`_Unreadable` on any other error (Note [Liveness])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):  # ESRCH: it exited while we read
            return None
        raise _Unreadable(str(exc)) from None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2:].split()


def proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if there is no such process
    (or it cannot be read)."""
    try:
        fields = _stat_fields(pid)
    except _Unreadable:
        return None
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])  # field 22 of the whole line; fields[0] is field 3 (state)


def _pid_ns(pid: int | str = "self") -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


_SELF: Identity | None = None


def identity() -> Identity:
    """This process's identity (recomputed after a fork)."""
    global _SELF
    pid = os.getpid()
    if _SELF is None or _SELF.pid != pid:
        _SELF = Identity(pid, proc_start(pid) or 0, _pid_ns())
    return _SELF


def is_alive(pid: int, start: int, ns: str) -> bool | None:
    """True, False, or None when it cannot be told (another or an unreadable pid namespace,
    an unreadable /proc entry: Note [Liveness])."""
    me = identity()
    if ns != me.ns:
        return None
    if not ns and os.path.isdir("/proc/self"):  # /proc is there, yet a namespace is unknown
        return None
    if pid <= 0:
        return False
    if pid == me.pid:
        return start == me.start
    try:
        fields = _stat_fields(pid)
    except _Unreadable:
        return None
    if fields is None:
        if os.path.isdir("/proc/self"):
            return False  # /proc works, the pid does not exist
        try:  # no /proc: the best we can do
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] in ("Z", "X"):
        return False
    return len(fields) >= 20 and int(fields[19]) == start
