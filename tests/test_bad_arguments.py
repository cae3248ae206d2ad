"""Bad arguments are typed and change nothing: sizes beyond what the core can take, odd peer and
device values, bad reclaim timeouts, ledger paths that are no regular file (FIFOs, directories,
sockets, devices, dangling links, no permission) and ledger bodies nested or sized absurdly.
Each raises a documented :class:`aqua_offload.OffloadError` subclass, promptly (never a hang:
anything that could block runs under a hard timeout), before anything changed."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zlib
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

import aqua_offload as aq
from aqua_offload import cli as aq_cli
from aqua_offload import lending
from aqua_offload.errors import InvalidArgumentError, LedgerError, OffloadError
from aqua_offload.lending import __main__ as lending_cli
from aqua_offload.lending.liveness import identity
from aqua_offload.manager import live_managers
from aqua_offload import sizes
from aqua_offload.sizes import parse_size
from conftest import run_with_timeout

MiB = 1 << 20
MAX_SIZE = 2**63 - 1  # the largest size: Python's and torch's byte counts are signed 64-bit
HANG_S = 20.0  # a prompt error takes milliseconds; the old code blocked forever
# The aqua_offload under test (the installed one in CI, src/ in a dev tree), for child processes.
SRC = os.path.dirname(os.path.dirname(os.path.abspath(aq.__file__)))


def _typed(info: pytest.ExceptionInfo, cls: type) -> BaseException:
    """The exact class (not merely a subclass or a bare builtin) and the common base."""
    e = info.value
    assert type(e) is cls, f"{type(e).__name__}: {e}"
    assert isinstance(e, OffloadError)
    return e


# -- sizes ----------------------------------------------------------------------------------
TOO_LARGE = [2**64, 2**64 - 1, 2**64 - 4096, 2**63, 2**70, 10**40, "20000000TiB", "16777216TiB",
             "9223372036854775808", "1" + "0" * 63, "1" * 65, "99999999999999999999TiB"]
MALFORMED = [1e30, float("inf"), float("nan"), -1, -(2**64), 1.0, 0.0, True, False, None, b"5",
             [5], {"n": 5}, Decimal(5), Fraction(5), np.int64(5), np.float64(5.0), "1.5.3GiB",
             "1e3", "0x10", "-5", "+5", "5 GiB B", "", "  ", "GiB", "5 EiB", "5GiBs",
             "\u0661\u0662",  # Arabic-Indic digits: "\d" took them for 12
             "\u00a05", "0.1B", "0.5000000000000000000000000000001KiB",
             "1.00000000000000000000000000001"]


@pytest.mark.parametrize("value", TOO_LARGE + MALFORMED, ids=lambda v: repr(v)[:40])
def test_parse_size_refuses_with_a_typed_error_naming_the_argument(value):
    with pytest.raises(InvalidArgumentError) as info:
        parse_size(value, name="host_bytes")
    e = _typed(info, InvalidArgumentError)
    assert "host_bytes" in str(e) and len(str(e)) < 400  # named; a huge value is cut short


def test_parse_size_bounds_and_good_values():
    assert sizes.MAX_SIZE == MAX_SIZE and parse_size(MAX_SIZE) == MAX_SIZE
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    assert parse_size("8388607TiB") == 8388607 << 40
    assert parse_size(" 5 GiB ") == 5 << 30 and parse_size("5gib\n") == 5 << 30
    assert parse_size("0.5KiB") == 512 and parse_size("1.50000000000000000000000000000KiB") == 1536
    assert parse_size(0) == 0 and parse_size("0") == 0


def _manager_count() -> int:
    return len(live_managers())


@pytest.mark.parametrize("value", [2**64, 2**64 - 4096, 2**63, "20000000TiB", 1.0, float("inf")],
                         ids=repr)
@pytest.mark.parametrize("arg", ["peer_bytes", "host_bytes", "chunk_bytes"])
def test_manager_sizes_are_checked_before_the_core_sees_them(arg, value):
    """The core takes std::size_t: 2**64 was a bare pybind TypeError, 2**64 - 4096 wrapped
    around when rounded up to a page (a segfault; see the subprocess test below)."""
    kw = {"peers": [1], "peer_bytes": "1MiB", "host_bytes": "1MiB", arg: value}
    before = _manager_count()
    with pytest.raises(InvalidArgumentError) as info:
        aq.OffloadManager("cpu", **kw)
    assert arg in str(_typed(info, InvalidArgumentError))
    assert _manager_count() == before


@pytest.mark.parametrize("peers", ["auto", "lent"])
def test_peer_budgets_per_device_and_auto_are_checked(ledger_path, peers):
    before = _manager_count()
    for value in (2**64, {"cuda:1": 2**64}, {1: "20000000TiB"}):
        with pytest.raises(InvalidArgumentError) as info:
            aq.OffloadManager("cpu", peers=peers, peer_bytes=value, host_bytes="1MiB")
        assert "peer_bytes" in str(_typed(info, InvalidArgumentError))
    assert _manager_count() == before
    assert not ledger_path.exists()  # the lent manager failed before touching the ledger


def test_lent_peer_budgets_that_name_a_device_twice(ledger_path):
    before = _manager_count()
    with pytest.raises(InvalidArgumentError) as info:
        aq.OffloadManager("cpu", peers="lent", host_bytes="1MiB",
                          peer_bytes={1: "1MiB", "cuda:1": "2MiB"})
    assert "twice" in str(_typed(info, InvalidArgumentError))
    assert _manager_count() == before and not ledger_path.exists()


def test_a_size_near_2_64_never_reaches_the_core():
    """host_bytes=2**64-1 crashed the interpreter (the emulation arena rounds the size up to
    a page, which wraps to 0, then pre-faults 2**64 bytes): run it in a child process."""
    code = ("import aqua_offload as aq\n"
            "for v in (2**64 - 1, 2**64 - 4096, 2**64 - 1):\n"
            "    try:\n"
            "        aq.OffloadManager('cpu', peers=None, host_bytes=v)\n"
            "    except aq.InvalidArgumentError as e:\n"
            "        assert 'host_bytes' in str(e)\n"
            "    else:\n"
            "        raise SystemExit('accepted')\n"
            "print('typed')\n")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "typed", (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("value", [2**64, 2**63, "20000000TiB", 1.5, True], ids=repr)
def test_lend_and_reclaim_sizes_are_checked(value):
    m = aq.OffloadManager("cpu", peers=[1], peer_bytes="1MiB", host_bytes="1MiB")
    try:
        before = m.stats()
        for call in (m.lend, m.reclaim):
            with pytest.raises(InvalidArgumentError) as info:
                call(1, value)
            assert "nbytes" in str(_typed(info, InvalidArgumentError))
        assert m.stats() == before
    finally:
        m.close()


def test_timeslicer_memory_budget_is_checked():
    m = aq.OffloadManager("cpu", peers=None, host_bytes="1MiB")
    try:
        for value in (2**64, "20000000TiB", 1e30):
            with pytest.raises(InvalidArgumentError) as info:
                aq.TimeSlicer(manager=m, memory_budget=value)
            assert "memory_budget" in str(_typed(info, InvalidArgumentError))
    finally:
        m.close()


@pytest.mark.parametrize("value", [2**64, 2**63, "20000000TiB", 1e30, float("nan")], ids=repr)
def test_offer_sizes_are_checked_before_the_ledger_is_touched(ledger_path, value):
    with pytest.raises(InvalidArgumentError) as info:
        lending.offer("emu:1", value)
    assert "nbytes" in str(_typed(info, InvalidArgumentError))
    assert not ledger_path.exists()
    o = lending.offer("emu:1", "2MiB")
    try:
        status = o.status()
        raw = ledger_path.read_bytes()
        with pytest.raises(InvalidArgumentError):
            o.reclaim(value)
        assert o.status() == status and ledger_path.read_bytes() == raw
    finally:
        o.withdraw()


@pytest.mark.parametrize("chunk", [str(2**64), "20000000TiB", "1.5.3GiB", "-1"])
def test_lease_chunk_from_the_environment_is_checked(ledger_path, monkeypatch, chunk):
    monkeypatch.setenv("AQUA_OFFLOAD_LEASE_CHUNK", chunk)
    o = lending.offer("emu:1", "2MiB")
    try:
        before = _manager_count()
        status = o.status()
        with pytest.raises(InvalidArgumentError) as info:
            aq.OffloadManager("cpu", peers="lent", host_bytes="1MiB")
        assert "AQUA_OFFLOAD_LEASE_CHUNK" in str(_typed(info, InvalidArgumentError))
        assert _manager_count() == before and o.status() == status
        assert lending.view()["consumers"] == []
    finally:
        o.withdraw()


# -- devices --------------------------------------------------------------------------------
BAD_PEERS = [1.0, float("nan"), True, False, [1.0], [True], "cuda:x", [[1]], [[1], [0]],
             {1: 2}, {"cuda:1": "1MiB"}, {"cuda:1"}, frozenset([1]), b"cuda:1", bytearray(b"1"),
             object(), 1 + 0j, np.float64(1.0), torch.tensor(1), [torch.tensor(1)], [None],
             "cuda", "cuda:", "CUDA:1", "cuda:+1", "cuda:-1", "cuda:1,cuda:0", "cuda:\u0661",
             "cpu", ["cpu"], torch.device("cpu"), torch.device("cuda"), "meta", -1, 99, 2**70,
             [1, 1], [1, "cuda:1"], range(10**12), [1] * 5000, "", " "]


@pytest.mark.parametrize("peers", BAD_PEERS, ids=lambda v: f"{type(v).__name__}-{v!r}"[:50])
def test_odd_peers_are_a_typed_error(peers):
    before = _manager_count()
    with pytest.raises(InvalidArgumentError) as info:
        run_with_timeout(lambda: aq.OffloadManager("cpu", peers=peers, host_bytes="1MiB"),
                         timeout=HANG_S)
    e = _typed(info, InvalidArgumentError)
    assert "peer" in str(e) and len(str(e)) < 400
    assert _manager_count() == before


@pytest.mark.parametrize("peers, tiers", [
    ((1,), ["emu:1"]), ([np.int64(1)], ["emu:1"]), (np.int64(1), ["emu:1"]),
    ("cuda:1 ", ["emu:1"]), (" emu:1", ["emu:1"]), (torch.device("cuda", 1), ["emu:1"]),
    (iter([1]), ["emu:1"]), (range(1, 2), ["emu:1"]), ([], []), (None, []), (" None ", []),
    (" Auto ", ["emu:1"])], ids=repr)
def test_good_peers_still_work(peers, tiers):
    m = aq.OffloadManager("cpu", peers=peers, peer_bytes="1MiB", host_bytes="1MiB")
    try:
        got = [m._store.tier_location(t) for t in range(m._store.tier_count)]
        assert got == tiers + ["cpu"]
    finally:
        m.close()


@pytest.mark.parametrize("device", [1.0, float("nan"), True, b"cpu", [0], 2**70, -1, "cpu ",
                                    "emu:0", "", object(), torch.device("meta"), "mps"],
                         ids=repr)
def test_odd_devices_are_a_typed_error(device):
    before = _manager_count()
    with pytest.raises(InvalidArgumentError) as info:
        aq.OffloadManager(device, peers=None, host_bytes="1MiB")
    e = _typed(info, InvalidArgumentError)
    assert "device" in str(e) and "\n" not in str(e)  # one line, not torch's overload list
    assert _manager_count() == before


# ids without the word alone: a "cuda" keyword would skip the test with the GPU tests
@pytest.mark.parametrize("device", ["cuda", "cuda:0"], ids=["type-only", "with-index"])
def test_a_cuda_device_where_torch_sees_none_names_the_emulation_way(monkeypatch, device):
    # README's example says device="cuda:0"; on a machine without a GPU the error must say
    # what to pass instead, not only that there is no GPU.
    from aqua_offload import _core
    from aqua_offload.errors import BackendError

    monkeypatch.setattr(_core, "cuda_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = _manager_count()
    with pytest.raises(BackendError) as info:
        aq.OffloadManager(device, host_bytes="1MiB")
    e = _typed(info, BackendError)
    assert e.error_name == "cudaErrorNoDevice"
    assert "device='cpu'" in str(e) and "emulation" in str(e)
    assert _manager_count() == before


@pytest.mark.parametrize("device", [1.0, True, [1], b"emu:1", "emu:x", None])
def test_odd_offer_devices_are_a_typed_error(ledger_path, device):
    with pytest.raises(InvalidArgumentError) as info:
        lending.offer(device, "1MiB")
    _typed(info, InvalidArgumentError)
    assert not ledger_path.exists()


# -- timeouts -------------------------------------------------------------------------------
BAD_TIMEOUTS = ["1", b"1", float("nan"), -5, -0.001, -math.inf, -(10**400), True, False, [1],
                1j, object()]


@pytest.fixture
def leased_offer(ledger_path):
    """An offer of 2 MiB, all leased by a lent manager in this process: a reclaim has to ask
    the consumer, so a bad timeout used to be noticed only after the offer was lowered."""
    o = lending.offer("emu:1", "2MiB")
    m = aq.OffloadManager("cpu", peers="lent", host_bytes="4MiB")
    try:
        assert o.status()["leased"] == 2 * MiB
        yield o
    finally:
        m.close()
        if not o.closed:
            o.withdraw(timeout=30)


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=lambda v: repr(v)[:20])
def test_bad_reclaim_timeouts_change_nothing(ledger_path, leased_offer, timeout):
    o = leased_offer
    status, raw = o.status(), ledger_path.read_bytes()
    for call in (lambda: o.reclaim("1MiB", timeout=timeout), lambda: o.reclaim(timeout=timeout),
                 lambda: o.withdraw(timeout=timeout), lambda: o.wait(timeout=timeout)):
        with pytest.raises(InvalidArgumentError) as info:
            run_with_timeout(call, timeout=HANG_S)
        assert "timeout" in str(_typed(info, InvalidArgumentError))
        assert o.status() == status  # not lowered, nothing asked of the consumer
        assert not o.closed and ledger_path.read_bytes() == raw
    assert o.stats()["reclaims"] == 0


def test_lend_and_reclaim_by_hand_on_a_lent_manager_are_refused(ledger_path):
    """The lenders own a lent manager's peer memory: a lend by hand would grant the same memory
    twice, a reclaim by hand would shrink a lease behind its lender's back."""
    o = lending.offer("emu:1", "2MiB")
    m = aq.OffloadManager("cpu", peers="lent", host_bytes="4MiB")
    try:
        before, tiers = m.stats()["lending"]["leased"], m.stats()["tiers"][0]
        for call in (lambda: m.lend("emu:1", "1MiB"), lambda: m.reclaim("emu:1", "1MiB"),
                     lambda: m.reclaim("emu:1")):
            with pytest.raises(InvalidArgumentError, match="peers='lent'"):
                run_with_timeout(call, timeout=HANG_S)
        assert m.stats()["lending"]["leased"] == before == {"emu:1": 2 * MiB}
        assert m.stats()["tiers"][0]["capacity"] == tiers["capacity"]
        assert o.status()["leased"] == 2 * MiB
    finally:
        run_with_timeout(m.close, timeout=HANG_S)
    assert o.status()["leased"] == 0
    o.withdraw(timeout=30)


@pytest.mark.parametrize("timeout", [None, 0, 0.0, 5, 2.5, np.float64(5.0), Fraction(5, 2),
                                     math.inf, 10**400], ids=lambda v: repr(v)[:20])
def test_good_reclaim_timeouts(ledger_path, timeout):
    with lending.offer("emu:1", "4MiB") as o:  # nothing leased: returns at once
        assert run_with_timeout(lambda: o.reclaim("1MiB", timeout=timeout), HANG_S) == MiB
        run_with_timeout(lambda: o.wait(timeout=timeout), HANG_S)
        assert run_with_timeout(lambda: o.withdraw(timeout=timeout), HANG_S) == 3 * MiB


@pytest.mark.parametrize("ledger", [123, 1.5, b"/tmp/ledger", "", "bad\0path", ["x"]],
                         ids=repr)
def test_bad_ledger_arguments_are_typed(tmp_path, monkeypatch, ledger):
    monkeypatch.chdir(tmp_path)  # ("" was the working directory, a lock file beside it)
    with pytest.raises(InvalidArgumentError) as info:
        lending.offer("emu:1", "1MiB", ledger=ledger)
    assert "ledger" in str(_typed(info, InvalidArgumentError))
    with pytest.raises(InvalidArgumentError):
        lending.view(ledger)


def test_cli_with_an_empty_ledger_path(tmp_path, monkeypatch, capsys):
    """``--ledger ''`` was the working directory: a lock file was made beside it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run_with_timeout(lambda: lending_cli.main(["--ledger", ""]), HANG_S) == 2
    assert "ledger must be a path" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["work"] and os.listdir(work) == []


# -- ledger paths that are no regular file --------------------------------------------------
def _lending_everything_fails(path: str, capsys) -> list[LedgerError]:
    """Offer, view, the CLI and a lent manager on ``path``: each a prompt LedgerError (2 from
    the CLI), no manager left, no offer made."""
    errors = []
    before = _manager_count()
    offers = len(lending.stats()["offers"])
    for call in (lambda: lending.offer("emu:1", "1MiB", ledger=path),
                 lambda: lending.view(path),
                 lambda: aq.OffloadManager("cpu", peers="lent", host_bytes="1MiB")):
        with pytest.raises(LedgerError) as info:
            run_with_timeout(call, timeout=HANG_S)
        errors.append(_typed(info, LedgerError))
        assert errors[-1].path == path and errors[-1].reason == "foreign", errors[-1]
    assert run_with_timeout(lambda: lending_cli.main(["--ledger", path]), HANG_S) == 2
    assert "refusing" in capsys.readouterr().err
    assert run_with_timeout(lambda: aq_cli.main(["lending", "--json"]), HANG_S) == 2  # ($ENV)
    assert "refusing" in capsys.readouterr().err
    assert _manager_count() == before and len(lending.stats()["offers"]) == offers
    return errors


@pytest.fixture
def short_dir():
    """A directory with a short name: a Unix socket's path must fit in 108 bytes."""
    d = tempfile.mkdtemp(prefix="aqba-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _kinds(d: str):
    """name -> (make it at path, undo/unblock). Each is a ledger path no process can use."""
    def fifo(p):
        os.mkfifo(p)

    def unblock_fifo(p):  # (the old code's reader waits for a writer: give it EOF)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass

    socks = []

    def sock(p):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(p)
        socks.append(s)

    def close_socks(p):
        for s in socks:
            s.close()

    return {
        "fifo": (fifo, unblock_fifo),
        "directory": (os.mkdir, None),
        "socket": (sock, close_socks),
        "symlink-to-directory": (lambda p: os.symlink(d, p), None),
        "dangling-symlink": (lambda p: os.symlink(os.path.join(d, "gone", "dir"), p), None),
        "symlink-to-fifo": (lambda p: (os.mkfifo(p + ".target"), os.symlink(p + ".target", p)),
                            lambda p: unblock_fifo(p + ".target")),
        "dev-zero": (lambda p: os.symlink("/dev/zero", p), None),
        "dev-null": (lambda p: os.symlink("/dev/null", p), None),
    }


@pytest.mark.parametrize("kind", list(_kinds("/x")))
def test_ledger_path_that_is_no_regular_file(short_dir, monkeypatch, capsys, kind):
    path = os.path.join(short_dir, "ledger")
    make, undo = _kinds(short_dir)[kind]
    make(path)
    monkeypatch.setenv("AQUA_OFFLOAD_LEDGER", path)
    listing = sorted(os.listdir(short_dir))
    try:
        errors = _lending_everything_fails(path, capsys)
        assert "regular file" in str(errors[0]) or "does not exist" in str(errors[0])
        assert sorted(os.listdir(short_dir)) == listing  # no lock file, nothing written
    finally:
        if undo is not None:
            undo(path)


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "dev-zero"])
def test_lock_file_that_is_no_regular_file(short_dir, monkeypatch, capsys, kind):
    """The lock file ``<ledger>.lock`` is opened for writing: a FIFO opened O_RDWR does not
    block on Linux, but flock on it means nothing; a directory used to read as a transient
    lock error (a consumer would retry forever)."""
    path = os.path.join(short_dir, "ledger")
    make, undo = _kinds(short_dir)[kind]
    make(path + ".lock")
    monkeypatch.setenv("AQUA_OFFLOAD_LEDGER", path)
    try:
        errors = _lending_everything_fails(path, capsys)
        assert "lock file" in str(errors[0])
        assert not os.path.exists(path)
    finally:
        if undo is not None:
            undo(path + ".lock")


def test_ledger_in_a_directory_without_permission(tmp_path):
    """EACCES is a typed error. Root ignores permissions: drop CAP_DAC_OVERRIDE with setpriv."""
    locked = tmp_path / "locked"
    locked.mkdir()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    os.chmod(locked, 0)
    os.chmod(readonly, 0o500)
    code = ("import sys\n"
            "from aqua_offload import lending\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        lending.offer('emu:1', '1MiB', ledger=p)\n"
            "    except lending.LedgerError as e:\n"
            "        assert type(e) is lending.LedgerError and e.path == p, e\n"
            "        print(e.reason)\n"
            "    else:\n"
            "        raise SystemExit('accepted')\n")
    cmd = [sys.executable, "-c", code, str(locked / "ledger"), str(readonly / "ledger")]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be tested")
        cmd = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search",
               "--"] + cmd
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        os.chmod(locked, 0o700)
        os.chmod(readonly, 0o700)
    if r.returncode != 0 and "setpriv" in r.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-2000:]
    reasons = r.stdout.split()
    assert len(reasons) == 2 and set(reasons) <= {"io", "lock"}, reasons  # transient: retried
    assert os.listdir(locked) == [] and os.listdir(readonly) == []


# -- ledger bodies --------------------------------------------------------------------------
def _file(body: bytes) -> bytes:
    return struct.pack("<8sIIQI4x", b"AQUALEDG", 1, 0, len(body), zlib.crc32(body)) + body


def _valid_body(**extra) -> dict:
    me = identity()
    return {"seq": 1, "next_id": 3, "recovered": [],
            "consumers": [], "leases": [],
            "offers": [{"id": 2, **me._asdict(), "sock": "@o", "backend": "emulation",
                        "key": "emu:1", "label": "emu:1", "bytes": MiB, "state": "live",
                        "since": 0.0, "reclaim": None}], **extra}


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BODIES = {
    # A valid checksum and a body the JSON decoder cannot follow: it raised RecursionError.
    "nested-list-100000": _nested(100_000),
    "nested-object-100000": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "nested-in-a-field": json.dumps(_valid_body()).encode()[:-1] + b',"x":' + _nested(100_000)
                         + b"}",
    # Deeper than the schema can be, though the decoder copes: a later reader might not.
    "nested-in-a-field-17": json.dumps(_valid_body(x=json.loads(_nested(17)))).encode(),
    # Numbers no size, id or time can be.
    "bytes-2**64": json.dumps(_valid_body()).replace(f'"bytes": {MiB}', f'"bytes": {2**64}')
                   .encode(),
    "bytes-10**4000": json.dumps(_valid_body()).replace(f'"bytes": {MiB}', '"bytes": 1'
                                                         + "0" * 4000).encode(),
    "bytes-10**5000": json.dumps(_valid_body()).replace(f'"bytes": {MiB}', '"bytes": 1'
                                                         + "0" * 5000).encode(),
    "pid-negative": json.dumps(_valid_body()).replace(f'"pid": {os.getpid()}', '"pid": -7')
                    .encode(),
    "seq-2**64": json.dumps(_valid_body()).replace('"seq": 1', f'"seq": {2**64}').encode(),
    "since-10**400": json.dumps(_valid_body()).replace('"since": 0.0', '"since": 1'
                                                        + "0" * 400).encode(),
}


def test_the_valid_body_is_valid(ledger_path):
    ledger_path.write_bytes(_file(json.dumps(_valid_body()).encode()))
    assert lending.view()["devices"][0]["offered"] == MiB


@pytest.mark.parametrize("name", list(BODIES))
def test_absurd_ledger_bodies_are_corrupt_and_never_rewritten(ledger_path, capsys, name):
    raw = _file(BODIES[name])
    ledger_path.write_bytes(raw)
    before = _manager_count()
    for call in (lambda: lending.view(), lambda: lending.offer("emu:1", "1MiB"),
                 lambda: aq.OffloadManager("cpu", peers="lent", host_bytes="1MiB")):
        with pytest.raises(LedgerError) as info:
            run_with_timeout(call, timeout=HANG_S)
        e = _typed(info, LedgerError)
        assert e.reason == "corrupt" and e.path == str(ledger_path), e
    assert lending_cli.main([]) == 2 and "corrupt" in capsys.readouterr().err
    assert _manager_count() == before
    assert ledger_path.read_bytes() == raw  # never reset, never "repaired"


def test_a_huge_ledger_file_is_refused_without_reading_it(ledger_path):
    """A sparse file of 1 GiB with a valid header: corrupt, at once (the old code read 64 MiB
    of it first)."""
    header = struct.pack("<8sIIQI4x", b"AQUALEDG", 1, 0, 1 << 40, 0)
    with open(ledger_path, "wb") as f:
        f.write(header)
        f.truncate(1 << 30)
    with pytest.raises(LedgerError) as info:
        run_with_timeout(lending.view, timeout=HANG_S)
    e = _typed(info, LedgerError)
    assert e.reason == "corrupt" and "more than a ledger can be" in str(e)
    assert os.path.getsize(ledger_path) == 1 << 30


# -- batch arguments and flags -------------------------------------------------------------------
@pytest.mark.parametrize("call", ["offload_many", "fetch_many", "prefetch_many"])
@pytest.mark.parametrize("value", [None, 5, 1.5, "ab", torch.ones(3), np.ones(3)],
                         ids=lambda v: type(v).__name__)
def test_a_batch_that_is_no_list_is_typed(call, value):
    m = aq.OffloadManager("cpu", peers=None, host_bytes="1MiB")
    try:
        with pytest.raises(InvalidArgumentError, match="list of tensors or handles"):
            getattr(m, call)(value)
        assert m.stats()["live_handles"] == 0
    finally:
        m.close()


@pytest.mark.parametrize("release", ["no", 0, 1, None, 1.0])
def test_release_is_a_bool(release):
    m = aq.OffloadManager("cpu", peers=None, host_bytes="1MiB")
    t = torch.arange(1.0, 9.0)
    try:
        with pytest.raises(InvalidArgumentError, match="release must be True or False"):
            m.offload(t, release=release)
        assert not aq.is_offloaded(t) and m.stats()["live_handles"] == 0
        assert torch.equal(m.fetch(m.offload(t, release=np.bool_(False))), t)  # numpy's bool
    finally:
        m.close()
