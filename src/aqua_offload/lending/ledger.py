"""The lending ledger: one small file per user that the lending processes of a machine share.

Note [Why a file and no daemon]
Producers and consumers of GPU memory are independent processes (one model each) that start and
die on their own schedule. A bookkeeping server (the published prototype polls one over HTTP
every 4 s) is one more process to start, to keep alive and to trust; when it dies, every lease
dies with it. A file under the user's runtime directory needs nothing to start, outlives any
process, and the kernel's ``flock`` gives mutual exclusion that is released when the holder
dies, even by kill -9. The state is tiny (a few records per process), so every transaction
reads and rewrites all of it.

Note [File format]
    header (32 bytes, little endian): magic b"AQUALEDG", u32 format version, u32 flags (0),
                                      u64 body length, u32 crc32 of the body, 4 bytes zero
    body: UTF-8 JSON (schema in state.py, validated on every read)
A wrong magic is a *foreign* file, a short file, a wrong length, a checksum mismatch, bad JSON
or a body that fails validation is a *corrupt* one, a larger version is a *newer* one: each is a
:class:`LedgerError` naming the path and the problem, and the file is never rewritten or reset
(that would silently drop other processes' leases and double-grant their memory). The user
decides: remove the file once no lending process runs, or point ``AQUA_OFFLOAD_LEDGER``
elsewhere.

Note [Locking and atomic writes]
Every access is a transaction: take ``flock(LOCK_EX)`` on ``<ledger>.lock`` (a separate file
that is never replaced, so every process locks the same inode), read and validate, recover the
entries of dead processes (state.py, Note [Recovery]), let the caller change the state, and if
anything changed write the whole file to a temporary file in the same directory and
``os.replace`` it over the ledger, then unlock. ``rename`` is atomic, so readers see the old or
the new file, never a mix; a writer killed mid-write leaves a stray temporary file and the old
ledger intact. No fsync: the runtime directory is usually a tmpfs and a ledger that does not
survive a reboot is right (the processes it describes did not survive either). Notifications
are sent after the unlock (notify.py, Note [Notification ordering]). Nothing slow ever runs
under the lock: migrations happen between transactions. ``os.write`` may write less than asked
(a full disk, a signal): it is looped until the whole file is written, and any failure removes
the temporary file, so a short write can never replace a good ledger with a truncated one.

Note [Fork]
A ``flock`` belongs to the open file description, which ``fork`` shares with the child: a fork
while a transaction is open would leave the child holding the ledger's lock until it exits or
execs (the parent's unlock only closes its own descriptor), stalling every lending process.
So a fork never happens mid-transaction: ``os.register_at_fork`` takes the thread lock of every
live :class:`Ledger` before the fork (the fork waits for open transactions to end, a few
milliseconds; at most ``LOCK_TIMEOUT_S`` when another process holds the flock) and releases
them on both sides afterwards. No deadlock: a transaction never takes another ledger's thread
lock (two transactions in one process would conflict on the flock anyway), nor creates a
:class:`Ledger`; the registry lock, taken first, keeps new ledgers out during the fork. A thread
that forks from inside its own transaction (our code never does) is not waited for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import secrets
import stat
import struct
import tempfile
import threading
import time
import weakref
import zlib
from typing import Any, Iterator

from ..errors import LedgerError, LedgerVersionError
from . import notify
from .state import State, new_body, validate

__all__ = ["Ledger", "default_path", "ENV_VAR", "FORMAT_VERSION", "MAGIC"]

ENV_VAR = "AQUA_OFFLOAD_LEDGER"
MAGIC = b"AQUALEDG"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQI4x")
_VERSION_END = len(MAGIC) + 4  # magic, then the u32 version: stable across formats
_MAX_BODY = 64 << 20  # a sane ledger is a few KiB; refuse to parse absurd lengths
LOCK_TIMEOUT_S = 30.0


def default_path() -> str:
    """The ledger's path: ``$AQUA_OFFLOAD_LEDGER``, else ``$XDG_RUNTIME_DIR/aqua_offload/ledger``,
    else ``<tempdir>/aqua_offload-<uid>/ledger`` (a 0700 directory)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "aqua_offload", "ledger")
    return os.path.join(tempfile.gettempdir(), f"aqua_offload-{os.getuid()}", "ledger")


def _ensure_dir(directory: str, private: bool, path: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
    except OSError as exc:
        raise LedgerError(f"lending ledger {path}: cannot create its directory: {exc}",
                          path=path, reason="directory") from None
    if private and (st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        # A shared temp dir: someone else could have made it to feed us a ledger.
        raise LedgerError(f"lending ledger {path}: directory {directory} is not private to this "
                          f"user (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); set "
                          f"{ENV_VAR} to a path of your own", path=path, reason="directory")


def decode(raw: bytes, path: str) -> dict[str, Any]:
    """Parse and validate a ledger file's bytes (raises :class:`LedgerError`)."""
    def bad(what: str) -> LedgerError:
        return LedgerError(f"lending ledger {path} is corrupt: {what}; refusing to use or reset "
                           f"it (other processes' leases would be lost). Remove it once no "
                           f"lending process runs, or set {ENV_VAR} to another path",
                           path=path, reason="corrupt")

    if raw[:len(MAGIC)] != MAGIC[:len(raw)]:  # a short prefix of the magic is a torn file
        raise LedgerError(f"{path} is not an aqua_offload lending ledger (magic {raw[:8]!r}, "
                          f"expected {MAGIC!r}); refusing to touch it. Set {ENV_VAR} to another "
                          f"path", path=path, reason="foreign")
    # The version first (it follows the magic in every format): a newer format may have another
    # header, which must read as "newer", not as "corrupt".
    version = struct.unpack_from("<I", raw, len(MAGIC))[0] if len(raw) >= _VERSION_END else 0
    if version > FORMAT_VERSION:
        raise LedgerVersionError(
            f"lending ledger {path} has format version {version}, written by a newer aqua_offload "
            f"(this one reads up to version {FORMAT_VERSION}); upgrade aqua_offload in every "
            f"process that lends, or set {ENV_VAR} to another path", path=path, reason="version",
            version=version, supported=FORMAT_VERSION)
    if len(raw) < _HEADER.size:
        raise bad(f"{len(raw)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, version, _flags, length, crc = _HEADER.unpack_from(raw)
    if version < 1:
        raise bad(f"format version {version}")
    body = raw[_HEADER.size:]
    if length > _MAX_BODY or len(body) != length:
        raise bad(f"body is {len(body)} bytes, header says {length} (truncated or extended)")
    got = zlib.crc32(body)
    if got != crc:
        raise bad(f"checksum mismatch (crc32 stored {crc:#010x}, computed {got:#010x})")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"body is not JSON ({exc})") from None
    problem = validate(data)
    if problem:
        raise bad(problem)
    return data


def encode(data: dict[str, Any]) -> bytes:
    body = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), zlib.crc32(body)) + body


# Note [Fork]: every live Ledger, so that a fork can wait for their transactions.
_registry: "weakref.WeakSet[Ledger]" = weakref.WeakSet()
_registry_lock = threading.Lock()
_serials = itertools.count()
_held_for_fork: list[threading.Lock] = []


def _before_fork() -> None:
    _registry_lock.acquire()  # released after the fork: no new Ledger meanwhile
    me = threading.get_ident()
    for led in sorted(_registry, key=lambda x: x._serial):  # one fixed order
        if led._owner != me:  # (a fork from inside our own transaction: cannot wait for it)
            led._thread_lock.acquire()
            _held_for_fork.append(led._thread_lock)


def _after_fork() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()
    _registry_lock.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                        after_in_child=_after_fork)


class Ledger:
    """Transactions on one ledger file.

    Parameters
    ----------
    path : str, optional
        The file; :func:`default_path` when None.
    """

    def __init__(self, path: str | None = None) -> None:
        self._private = path is None and not os.environ.get(ENV_VAR)
        self.path = os.path.abspath(path) if path is not None else default_path()
        self.directory = os.path.dirname(self.path)
        self._lock_path = self.path + ".lock"
        self._thread_lock = threading.Lock()  # one transaction per Ledger object at a time
        self._owner: int | None = None  # the thread in a transaction (Note [Fork])
        with _registry_lock:
            self._serial = next(_serials)
            _registry.add(self)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        _ensure_dir(self.directory, self._private, self.path)
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LedgerError(f"lending ledger {self.path}: cannot open its lock file: {exc}",
                              path=self.path, reason="lock") from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            pause = 0.0005
            while True:  # non-blocking tries: a stopped (SIGSTOP) holder must not hang us forever
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                        raise LedgerError(f"lending ledger {self.path}: flock failed: {exc}",
                                          path=self.path, reason="lock") from None
                if time.monotonic() > deadline:
                    raise LedgerError(f"lending ledger {self.path}: its lock was held for over "
                                      f"{LOCK_TIMEOUT_S:.0f} s (a stopped process?)",
                                      path=self.path, reason="lock")
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(_MAX_BODY + _HEADER.size + 1)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise LedgerError(f"lending ledger {self.path} is a directory", path=self.path,
                              reason="foreign") from None
        except OSError as exc:
            raise LedgerError(f"lending ledger {self.path}: cannot read it: {exc}",
                              path=self.path, reason="io") from None
        return decode(raw, self.path)

    def _write(self, data: dict[str, Any]) -> None:
        raw = memoryview(encode(data))  # before the temporary file exists: nothing to clean up
        tmp = os.path.join(self.directory, f".{os.path.basename(self.path)}."
                                            f"{os.getpid()}.{secrets.token_hex(4)}.tmp")
        made = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            made = True
            try:
                while raw:  # a short write is not an error: write the rest
                    n = os.write(fd, raw)
                    if n <= 0:
                        raise OSError(errno.EIO, f"write returned {n} with {len(raw)} bytes left")
                    raw = raw[n:]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException as exc:
            if made:  # never leave a (possibly truncated) temporary file behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(exc, OSError):
                raise LedgerError(f"lending ledger {self.path}: cannot write it: {exc}",
                                  path=self.path, reason="io") from None
            raise

    @contextlib.contextmanager
    def transaction(self, create: bool = True) -> Iterator[State]:
        """Lock, read, recover dead processes' entries, yield the state; on a normal exit write
        it back if it changed, unlock, then send the notifications it queued.

        Parameters
        ----------
        create : bool
            Make the ledger if there is none; else a missing ledger reads as empty and is not
            written (the CLI only looks).
        """
        with self._thread_lock:
            self._owner = threading.get_ident()
            try:
                with self._locked():
                    data = self._read()
                    existed = data is not None
                    state = State(data if existed else new_body(), self.path)
                    before = json.dumps(state.body, sort_keys=True)
                    state.recover()
                    yield state
                    after = json.dumps(state.body, sort_keys=True)
                    if after != before and (existed or create):
                        state.body["seq"] += 1
                        self._write(state.body)
            finally:
                self._owner = None
        for address, message in state.take_notifications():
            notify.send(address, message)
