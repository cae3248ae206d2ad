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

Note [Not a regular file]
The path comes from the user (``AQUA_OFFLOAD_LEDGER``, a ``ledger=`` argument) and may name
anything: opening a FIFO for reading blocks until a writer appears (forever, for every lending
process), a character device such as ``/dev/zero`` reads without end, a directory or a socket
cannot be read at all. So the ledger and its lock file are opened with ``O_NONBLOCK`` (which
does not block on a FIFO and is meaningless for a regular file) and ``O_NOCTTY``, and anything
but a regular file is a :class:`LedgerError` (reason ``foreign``: not transient), raised before
the lock file is made. A symbolic link is followed; one whose target does not exist is refused
as well, rather than replaced by the first write. The read is bounded (a ledger is a few KiB)
and the decoded body may nest only as deep as the schema does (``_MAX_DEPTH``): a crafted body
that would exhaust the recursion limit of the JSON decoder, or of a reader after it, is
*corrupt*.

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

from ..errors import InvalidArgumentError, LedgerError, LedgerVersionError
from . import notify
from .state import State, new_body, validate

__all__ = ["Ledger", "default_path", "ENV_VAR", "FORMAT_VERSION", "MAGIC"]

ENV_VAR = "AQUA_OFFLOAD_LEDGER"
MAGIC = b"AQUALEDG"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQI4x")
_VERSION_END = len(MAGIC) + 4  # magic, then the u32 version: stable across formats
_MAX_BODY = 64 << 20  # a sane ledger is a few KiB; refuse to parse absurd lengths
_MAX_DEPTH = 16  # the schema nests 4 deep (body, table, entry, reclaim); Note [Not a regular file]
_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# open(2) of a socket (ENXIO), a device without a driver, a directory for writing
_NOT_A_FILE = (errno.ENXIO, errno.ENODEV, errno.EISDIR, errno.EOPNOTSUPP)
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


def _corrupt(path: str, what: str) -> LedgerError:
    return LedgerError(f"lending ledger {path} is corrupt: {what}; refusing to use or reset "
                       f"it (other processes' leases would be lost). Remove it once no "
                       f"lending process runs, or set {ENV_VAR} to another path",
                       path=path, reason="corrupt")


def _not_regular(path: str, mode: int, what: str = "lending ledger",
                 ledger: str | None = None) -> LedgerError:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    kind = next((k for test, k in kinds if test(mode)), f"of mode {stat.filemode(mode)}")
    return LedgerError(f"{what} {path} is {kind}, not a regular file; refusing to touch it. Set "
                       f"{ENV_VAR} to the path of a file", path=ledger or path, reason="foreign")


def _too_deep(data: Any) -> bool:
    """Whether ``data`` nests dicts and lists deeper than ``_MAX_DEPTH`` (no recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        elif not isinstance(value, list):
            continue
        if depth > _MAX_DEPTH:
            return True
        stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


def decode(raw: bytes, path: str) -> dict[str, Any]:
    """Parse and validate a ledger file's bytes (raises :class:`LedgerError`)."""
    def bad(what: str) -> LedgerError:
        return _corrupt(path, what)

    _check_prefix(raw, path)
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
    except RecursionError:  # (not a ValueError) arrays or objects nested thousands deep
        raise bad(f"body nests deeper than the JSON decoder can follow (at most {_MAX_DEPTH} "
                  "levels are valid)") from None
    if _too_deep(data):  # else a later reader (validate, json.dumps) could recurse too deep
        raise bad(f"body nests more than {_MAX_DEPTH} levels deep")
    problem = validate(data)
    if problem:
        raise bad(problem)
    return data


def _check_prefix(raw: bytes, path: str) -> None:
    """The magic and the version: a foreign file, or one of a newer format."""
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


def encode(data: dict[str, Any]) -> bytes:
    body = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), zlib.crc32(body)) + body


def _read_upto(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of a regular file (a short read is not its end: read on)."""
    parts: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _check_path(path: Any) -> str:
    """A ledger path given as an argument: a non-empty str or path-like, no NUL byte."""
    try:
        text = os.fspath(path)
    except TypeError:
        text = None
    if not isinstance(text, str) or not text or "\0" in text:
        shown = repr(path)
        shown = shown if len(shown) <= 80 else shown[:60] + "..."
        raise InvalidArgumentError(f"ledger must be a path (a non-empty str or os.PathLike "
                                   f"without NUL bytes), got {type(path).__name__} {shown}")
    return text


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

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is not None:
            path = _check_path(path)
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

    def _check_kind(self) -> None:
        """Refuse a ledger path that names anything but a regular file (or nothing), before the
        lock file is made (Note [Not a regular file]); ``_read`` checks again what it opens."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if os.path.islink(self.path):
                raise LedgerError(
                    f"lending ledger {self.path} is a symbolic link to "
                    f"{_readlink(self.path)!r}, which does not exist; refusing to replace it. "
                    f"Set {ENV_VAR} to the path of a file", path=self.path,
                    reason="foreign") from None
            return
        except OSError as exc:  # a permission, a loop of links, a name too long...
            raise LedgerError(f"lending ledger {self.path}: cannot look at it: {exc}",
                              path=self.path, reason="io") from None
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(self.path, st.st_mode)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        _ensure_dir(self.directory, self._private, self.path)
        self._check_kind()
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
        except OSError as exc:
            if exc.errno in _NOT_A_FILE:  # a directory, a socket: not transient
                raise LedgerError(f"lock file of the lending ledger {self._lock_path} is not a "
                                  f"regular file ({exc}); refusing to touch it",
                                  path=self.path, reason="foreign") from None
            raise LedgerError(f"lending ledger {self.path}: cannot open its lock file: {exc}",
                              path=self.path, reason="lock") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):  # a FIFO, a device...: flock on it means nothing
                raise _not_regular(self._lock_path, mode, "lock file of the lending ledger",
                                   self.path)
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
        """The decoded ledger, None if there is none (Note [Not a regular file])."""
        limit = _HEADER.size + _MAX_BODY
        try:
            fd = os.open(self.path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _NOT_A_FILE:
                # a socket, or a device without a driver: no regular file either
                raise LedgerError(f"lending ledger {self.path} is not a regular file ({exc}); "
                                  f"refusing to touch it. Set {ENV_VAR} to the path of a file",
                                  path=self.path, reason="foreign") from None
            raise LedgerError(f"lending ledger {self.path}: cannot read it: {exc}",
                              path=self.path, reason="io") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(self.path, st.st_mode)
            os.set_blocking(fd, True)  # a regular file after all: plain reads
            if st.st_size > limit:  # only the header then: foreign, newer, or corrupt
                head = _read_upto(fd, _HEADER.size)
                _check_prefix(head, self.path)
                raise _corrupt(self.path, f"the file is {st.st_size} bytes, more than a ledger "
                                          f"can be ({limit})")
            raw = _read_upto(fd, limit + 1)
        except OSError as exc:
            raise LedgerError(f"lending ledger {self.path}: cannot read it: {exc}",
                              path=self.path, reason="io") from None
        finally:
            os.close(fd)
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
