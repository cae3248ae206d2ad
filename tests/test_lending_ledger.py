"""The lending ledger on its own: file format, corrupt/foreign/newer files, recovery of
dead processes' entries, and the CLI view. In-process (no spawned children): fast. Liveness
itself is in test_lending_liveness.py."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib

import pytest

import aqua_offload as aq
from aqua_offload import lending
from aqua_offload.errors import LedgerError, LedgerVersionError, OffloadError
from aqua_offload.lending import __main__ as cli
from aqua_offload.lending import ledger as ledger_mod
from aqua_offload.lending.liveness import identity
from aqua_offload.manager import live_managers

MiB = 1 << 20


@pytest.fixture
def ledger_path(tmp_path, monkeypatch):
    """A private ledger with the default lease chunk (conftest's leases in 1 MiB chunks; the
    CLI test's figures follow the default)."""
    path = tmp_path / "ledger"
    monkeypatch.setenv("AQUA_OFFLOAD_LEDGER", str(path))
    return path


def _header(version: int, body: bytes, crc: int | None = None) -> bytes:
    return struct.pack("<8sIIQI4x", b"AQUALEDG", version, 0, len(body),
                       zlib.crc32(body) if crc is None else crc) + body


def _valid_bytes(ledger_path) -> bytes:
    with lending.offer("emu:1", "1MiB") as o:
        o.reclaim("512KiB")
        raw = ledger_path.read_bytes()
    return raw


# -- format ---------------------------------------------------------------------------------
def test_ledger_file_has_header_checksum_and_private_permissions(ledger_path):
    o = lending.offer("emu:1", "3MiB")
    raw = ledger_path.read_bytes()
    magic, version, flags, length, crc = struct.unpack_from("<8sIIQI4x", raw)
    assert (magic, version, flags) == (b"AQUALEDG", 1, 0)
    body = raw[32:]
    assert length == len(body) and crc == zlib.crc32(body)
    data = json.loads(body)
    assert [(x["id"], x["bytes"], x["key"], x["pid"]) for x in data["offers"]] == \
        [(o.id, 3 * MiB, "emu:1", os.getpid())]
    assert oct(ledger_path.stat().st_mode & 0o777) == oct(0o600)
    o.withdraw()
    assert json.loads(ledger_path.read_bytes()[32:])["offers"] == []
    assert not [p for p in os.listdir(ledger_path.parent) if p.endswith(".tmp")]


def test_default_path_is_private_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("AQUA_OFFLOAD_LEDGER", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert ledger_mod.default_path() == str(tmp_path / "aqua_offload" / "ledger")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert ledger_mod.default_path().endswith(f"aqua_offload-{os.getuid()}/ledger")
    # A default directory that others can write is refused, not used.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    shared = tmp_path / "aqua_offload"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(LedgerError, match="not private"):
        lending.offer("emu:1", "1MiB")


def _corruptions(valid: bytes) -> dict[str, tuple[bytes, type, str]]:
    body = valid[32:]
    data = json.loads(body)
    data["leases"] = [{"id": 999, "consumer": 5, "offer": 6, "key": "emu:1", "bytes": 1,
                       "return": 0, "since": 0.0}]
    data["next_id"] = 1000
    dangling = json.dumps(data).encode()
    flipped = bytearray(valid)
    flipped[40] ^= 0x01
    return {
        "foreign": (b"#!/bin/sh\necho not a ledger, longer than a header....\n", LedgerError,
                    "not an aqua_offload lending ledger"),
        "empty": (b"", LedgerError, "corrupt"),
        "truncated": (valid[:-7], LedgerError, "truncated"),
        "checksum": (bytes(flipped), LedgerError, "checksum mismatch"),
        "not-json": (_header(1, b"{nope"), LedgerError, "not JSON"),
        "schema": (_header(1, b'{"seq": 1}'), LedgerError, "next_id"),
        "dangling": (_header(1, dangling), LedgerError, "missing offer or consumer"),
        "newer": (_header(7, body), LedgerVersionError, "version 7, written by a newer"),
    }


@pytest.mark.parametrize("kind", ["foreign", "empty", "truncated", "checksum", "not-json",
                                  "schema", "dangling", "newer"])
def test_bad_ledger_is_a_clear_error_and_is_never_rewritten(ledger_path, kind, capsys):
    raw, cls, message = _corruptions(_valid_bytes(ledger_path))[kind]
    ledger_path.write_bytes(raw)
    with pytest.raises(cls, match=message) as info:
        lending.offer("emu:1", "1MiB")
    assert str(ledger_path) in str(info.value) and info.value.path == str(ledger_path)
    assert isinstance(info.value, OffloadError)
    before = len(live_managers())
    with pytest.raises(cls):
        aq.OffloadManager("cpu", peers="lent", host_bytes="4MiB")
    assert len(live_managers()) == before  # the half-made manager was closed
    assert cli.main([]) == 2
    assert message.split(",")[0] in capsys.readouterr().err
    assert ledger_path.read_bytes() == raw  # never reset, never "repaired"
    if kind == "newer":
        assert (info.value.version, info.value.supported) == (7, 1)


def test_newer_format_with_a_shorter_header_reads_as_newer(ledger_path):
    ledger_path.write_bytes(b"AQUALEDG" + struct.pack("<I", 2) + b"{}")  # 14 bytes
    with pytest.raises(LedgerVersionError, match="version 2, written by a newer") as info:
        lending.view()
    assert info.value.version == 2 and cli.main([]) == 2


def _odd(valid: bytes) -> dict[str, bytes]:
    """Files with a valid checksum whose values have the wrong types."""
    me = identity()
    base = json.loads(valid[32:])
    base["next_id"] = 10
    base["consumers"] = [{"id": 1, **me._asdict(), "sock": "@c", "backend": "emulation",
                          "device": "cpu", "keys": ["emu:1"], "since": 0.0}]
    base["offers"] = [{"id": 2, **me._asdict(), "sock": "@o", "backend": "emulation",
                       "key": "emu:1", "label": "emu:1", "bytes": 2 * MiB, "state": "live",
                       "since": 0.0, "reclaim": {"bytes": MiB, "t0": 0.0, "wall": 0.0}}]
    base["leases"] = [{"id": 3, "consumer": 1, "offer": 2, "key": "emu:1", "bytes": MiB,
                       "return": 0, "asked": None, "error": None, "error_t": None,
                       "since": 0.0}]
    base["recovered"] = [{"wall": 0.0, "what": "x"}]
    cases = {
        "asked": ("leases", "asked", "soon"), "error_t": ("leases", "error_t", "x"),
        "error": ("leases", "error", 5), "asked-bool": ("leases", "asked", True),
        "reclaim-wall": ("offers", "reclaim", {"bytes": MiB, "t0": 0.0, "wall": "x"}),
        "reclaim-bytes": ("offers", "reclaim", {"bytes": -1, "t0": 0.0, "wall": 0.0}),
        "keys": ("consumers", "keys", [1]), "nan": ("leases", "since", float("nan")),
        "recovered": ("recovered", None, 5), "recovered-wall": ("recovered", "wall", "x"),
        "recovered-what": ("recovered", "what", None),
    }
    out = {"valid": _header(1, json.dumps(base).encode())}
    for name, (table, field, value) in cases.items():
        data = json.loads(json.dumps(base))
        if field is None:
            data[table][0] = value
        else:
            data[table][0][field] = value
        out[name] = _header(1, json.dumps(data).encode())
    return out


def test_odd_values_with_a_valid_checksum_are_corrupt(ledger_path, capsys):
    files = _odd(_valid_bytes(ledger_path))
    ledger_path.write_bytes(files.pop("valid"))
    assert cli.main([]) == 0  # (the base file is fine: each case below breaks one value)
    capsys.readouterr()
    for name, raw in files.items():
        ledger_path.write_bytes(raw)
        with pytest.raises(LedgerError, match="corrupt") as info:
            lending.view()
        assert info.value.reason == "corrupt", name
        assert cli.main([]) == 2 and "corrupt" in capsys.readouterr().err, name
        assert cli.main(["--json"]) == 2, name


@pytest.mark.parametrize("fault", ["short", "zero", "oserror", "interrupt", "encode"])
def test_ledger_write_is_whole_or_nothing(ledger_path, fault):
    o = lending.offer("emu:1", "1MiB")
    before = ledger_path.read_bytes()
    real = os.write

    def write(fd, data):
        if fd <= 2:
            return real(fd, data)
        if fault == "short":  # a legal short write: the rest must follow
            return real(fd, bytes(data[:7]))
        if fault == "zero":
            return 0
        if fault == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt

    def encode(data):
        raise RuntimeError("cannot encode")

    expect = {"short": None, "zero": LedgerError, "oserror": LedgerError,
              "interrupt": KeyboardInterrupt, "encode": RuntimeError}[fault]
    with pytest.MonkeyPatch.context() as mp:
        if fault == "encode":
            mp.setattr(ledger_mod, "encode", encode)
        else:
            mp.setattr(os, "write", write)
        if expect is None:
            p = lending.offer("emu:1", "2MiB")
        else:
            with pytest.raises(expect):
                lending.offer("emu:1", "2MiB")
    assert not [f for f in os.listdir(ledger_path.parent) if f.endswith(".tmp")]
    if expect is None:
        assert {x["id"] for x in lending.view()["devices"][0]["offers"]} == {o.id, p.id}
        p.withdraw()
    else:
        assert ledger_path.read_bytes() == before  # the good ledger was never replaced
    o.withdraw()


def test_ledger_errors_pickle():
    e = LedgerVersionError("newer", path="/x", reason="version", version=3, supported=1)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is LedgerVersionError and (back.path, back.version) == ("/x", 3)
    t = pickle.loads(pickle.dumps(lending.ReclaimTimeoutError("slow", pending=5)))
    assert t.pending == 5 and isinstance(t, TimeoutError)


def test_ledger_path_that_is_a_directory(ledger_path):
    ledger_path.mkdir()
    with pytest.raises(LedgerError, match="is a directory"):
        lending.offer("emu:1", "1MiB")


# -- recovery -------------------------------------------------------------------------------
def _inject(path: str, **rows) -> None:
    with lending.Ledger(path).transaction() as st:
        for table, entries in rows.items():
            for row in entries:
                row.setdefault("id", st.new_id())
                getattr(st, table).append(row)


def test_dead_consumer_lease_is_returned_and_pid_reuse_detected(ledger_path):
    o = lending.offer("emu:1", "4MiB")
    me = identity()
    ghost = {"pid": me.pid, "start": me.start - 1, "ns": me.ns}  # our pid, an older process
    with lending.Ledger().transaction() as st:
        cid = st.new_id()
        st.consumers.append({"id": cid, **ghost, "sock": "@nobody", "backend": "emulation",
                             "device": "cpu", "keys": ["emu:1"], "since": 0.0})
        st.leases.append({"id": st.new_id(), "consumer": cid, "offer": o.id, "key": "emu:1",
                          "bytes": 3 * MiB, "return": 0, "asked": None, "error": None,
                          "error_t": None, "since": 0.0})
        assert st.available(st.find("offers", o.id)) == MiB
    # The next transaction (any process, here a status query) recovers it.
    assert o.status() == {"offered": 4 * MiB, "leased": 0, "available": 4 * MiB, "pending": 0}
    view = lending.view()
    assert view["consumers"] == [] and "consumer pid %d died: 1 lease(s) (3.00 MiB)" % me.pid \
        in view["recovered"][-1]["what"]
    assert o.reclaim() == 4 * MiB and o.stats()["reclaim_last_asked"] == 0
    o.withdraw()


def test_dead_producer_offer_becomes_an_orphan_until_its_leases_are_back(ledger_path):
    me = identity()
    with lending.Ledger().transaction() as st:
        oid, cid = st.new_id(), st.new_id()
        st.offers.append({"id": oid, "pid": me.pid, "start": me.start + 7, "ns": me.ns,
                          "sock": "@gone", "backend": "emulation", "key": "emu:1",
                          "label": "emu:1", "bytes": 2 * MiB, "state": "live", "since": 0.0,
                          "reclaim": {"bytes": MiB, "t0": 0.0, "wall": 0.0}})
        # A live consumer (this process's identity) holding a lease on it.
        st.consumers.append({"id": cid, **me._asdict(), "sock": "@c", "backend": "emulation",
                             "device": "cpu", "keys": ["emu:1"], "since": 0.0})
        st.leases.append({"id": st.new_id(), "consumer": cid, "offer": oid, "key": "emu:1",
                          "bytes": 3 * MiB, "return": 0, "asked": None, "error": None,
                          "error_t": None, "since": 0.0})
    view = lending.view()
    (dev,) = view["devices"]
    (offer,) = dev["offers"]
    assert offer["state"] == "orphan" and offer["bytes"] == 0 and offer["reclaim"] is None
    assert dev["leases"][0]["return"] == 3 * MiB  # asked back in full
    assert dev["available"] == 0  # nothing can be leased from a dead producer
    assert "producer pid %d died" % me.pid in view["recovered"][-1]["what"]
    with lending.Ledger().transaction() as st:  # the consumer returns it: the orphan goes
        st.shrink_lease(st.leases[0], 3 * MiB)
        st.consumers.clear()
    assert lending.view()["devices"] == []


# -- CLI ------------------------------------------------------------------------------------
def test_cli_without_ledger_does_not_create_one(ledger_path, capsys):
    assert cli.main([]) == 0
    assert "none yet" in capsys.readouterr().out
    assert not ledger_path.exists()
    assert cli.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exists"] is False


def test_cli_shows_offers_leases_and_pending_reclaims(ledger_path, capsys):
    a = lending.offer("emu:1", "6MiB")
    b = lending.offer("emu:0", "2MiB")
    m = aq.OffloadManager("cpu", peers="lent", peer_bytes="4MiB", host_bytes="4MiB")
    try:
        with m._lending._sync_lock:  # the consumer cannot serve: the reclaim stays pending
            with pytest.raises(lending.ReclaimTimeoutError) as info:
                a.reclaim("5MiB", timeout=0.2)
            assert info.value.pending == 3 * MiB
            assert cli.main(["--ledger", str(ledger_path)]) == 0
            text = capsys.readouterr().out
            assert f"offer #{a.id}" in text and f"offer #{b.id}" in text
            assert f"consumer pid {os.getpid()}" in text
            assert "reclaim pending: 5.00 MiB" in text and "returning 3.00 MiB" in text
            assert cli.main(["--json"]) == 0
            view = json.loads(capsys.readouterr().out)
            devs = {d["label"]: d for d in view["devices"]}
            assert devs["emu:1"]["offered"] == MiB and devs["emu:1"]["pending"] == 3 * MiB
            assert devs["emu:1"]["offers"][0]["reclaim"]["bytes"] == 5 * MiB
            assert devs["emu:0"]["leased"] == 2 * MiB  # capped at 4 MiB on emu:1, then emu:0
            assert view["consumers"][0]["leased"] == 6 * MiB
        a.wait(timeout=20)
        assert a.status()["pending"] == 0
        assert cli.main([]) == 0
        assert "reclaim pending" not in capsys.readouterr().out
    finally:
        m.close()
        a.withdraw()
        b.withdraw()


def test_cli_runs_as_a_module(ledger_path):
    o = lending.offer("emu:1", "1MiB")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "aqua_offload.lending", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["devices"][0]["offers"][0]["id"] == o.id
    o.withdraw()
