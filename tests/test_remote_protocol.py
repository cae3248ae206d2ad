"""The remote protocol without NIXL: framing, validation of every field, token auth, tokens."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest

from aqua_offload.errors import InvalidArgumentError, RemoteProtocolError, RemoteVersionError
from aqua_offload.remote import protocol as P


def _frame(kind: int, body: bytes, blob: bytes = b"", version: int = P.VERSION,
           magic: bytes = P.MAGIC, request: int = 7) -> bytes:
    return P.HEADER.pack(magic, version, kind, request, len(body), len(blob)) + body + blob


def _decode_all(data: bytes) -> list[P.Message]:
    return list(P.FrameReader().feed(data))


def test_round_trip_every_kind_byte_by_byte() -> None:
    samples = {
        P.Kind.HELLO: {"nonce": "ab" * 32, "name": "node-1"},
        P.Kind.ALLOC: {"sizes": [1, 4096, 1 << 40]},
        P.Kind.ALLOCATED: {"blocks": [{"id": 3, "addr": 1 << 47, "nbytes": 4096,
                                       "segment": 2}], "md_version": 5},
        P.Kind.RECLAIMED: {"reclaim": 1, "ids": [4, 5], "refused": [], "micros": 1500},
        P.Kind.STATS_REPLY: {"stats": {"arena_bytes": 1 << 30, "reclaim_last_s": 0.25}},
        P.Kind.METADATA: {"md_version": 9},
    }
    data = b"".join(P.encode(k, i + 1, b, b"\x00md\xff" if k == P.Kind.METADATA else b"")
                    for i, (k, b) in enumerate(samples.items()))
    reader = P.FrameReader()
    got = []
    for i in range(len(data)):  # one byte at a time: a frame may arrive in any pieces
        got += reader.feed(data[i:i + 1])
    assert [m.kind for m in got] == list(samples)
    assert [m.request for m in got] == list(range(1, len(samples) + 1))
    assert got[0].body["nonce"] == bytes.fromhex("ab" * 32)
    assert got[1].body == samples[P.Kind.ALLOC]
    assert got[-1].blob == b"\x00md\xff"
    assert reader.pending == 0


def test_truncated_frame_waits_for_the_rest() -> None:
    whole = P.encode(P.Kind.ALLOC, 1, {"sizes": [10]})
    reader = P.FrameReader()
    assert list(reader.feed(whole[:-1])) == []
    assert [m.body for m in reader.feed(whole[-1:])] == [{"sizes": [10]}]


@pytest.mark.parametrize("blob_len,json_len", [(P.MAX_BLOB + 1, 2), (0, P.MAX_JSON + 1),
                                               (2**32 - 1, 2**32 - 1)])
def test_huge_length_prefix_refused_from_the_header(json_len: int, blob_len: int) -> None:
    header = P.HEADER.pack(P.MAGIC, P.VERSION, int(P.Kind.ALLOC), 1, json_len, blob_len)
    reader = P.FrameReader()
    with pytest.raises(RemoteProtocolError, match="over the limits"):
        list(reader.feed(header))  # refused before a single body byte arrives


def test_other_version_is_a_version_error() -> None:
    with pytest.raises(RemoteVersionError) as info:
        _decode_all(_frame(int(P.Kind.HELLO), b"{}", version=P.VERSION + 1))
    assert info.value.version == P.VERSION + 1 and info.value.supported == P.VERSION


@pytest.mark.parametrize("frame", [
    _frame(1, b"{}", magic=b"HTTP"),                                    # not our protocol
    _frame(999, b"{}"),                                                 # unknown kind
    _frame(int(P.Kind.ALLOC), b"\xff\xfe"),                              # not UTF-8
    _frame(int(P.Kind.ALLOC), b"[1, 2]"),                                # not an object
    _frame(int(P.Kind.ALLOC), b'{"sizes": [NaN]}'),                      # NaN
    _frame(int(P.Kind.ALLOC), b'{"sizes": [1], "sizes": [2]}'),          # duplicate key
    _frame(int(P.Kind.ALLOC), b'{"sizes": [1], "extra": 1}'),            # unknown field
    _frame(int(P.Kind.ALLOC), b'{}'),                                    # missing field
    _frame(int(P.Kind.ALLOC), b'{"sizes": [true]}'),                     # bool for an int
    _frame(int(P.Kind.ALLOC), b'{"sizes": [0]}'),                        # zero size
    _frame(int(P.Kind.ALLOC), b'{"sizes": [-5]}'),                       # negative
    _frame(int(P.Kind.ALLOC), b'{"sizes": [1.5]}'),                      # float
    _frame(int(P.Kind.ALLOC), b'{"sizes": [9223372036854775808]}'),      # over 2**63-1
    _frame(int(P.Kind.ALLOC), b'{"sizes": []}'),                         # empty batch
    _frame(int(P.Kind.ALLOC), json.dumps({"sizes": [1] * (P.MAX_ITEMS + 1)}).encode()),
    _frame(int(P.Kind.ALLOC), b'{"sizes": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    _frame(int(P.Kind.HELLO), b'{"nonce": "zz", "name": "x"}'),          # not hex
    _frame(int(P.Kind.HELLO), json.dumps({"nonce": "ab" * 32, "name": "a\nb"}).encode()),
    _frame(int(P.Kind.PING), b"{}", blob=b"x"),                          # attachment on PING
    _frame(int(P.Kind.STATS_REPLY), b'{"stats": {"a": {"b": 1}}}'),      # nested stats
], ids=lambda f: f"{struct.unpack('!H', f[6:8])[0]}-{len(f)}")
def test_malformed_messages_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        _decode_all(frame)


def test_random_garbage_never_escapes_as_another_exception() -> None:
    rng = random.Random(1234)
    valid = P.encode(P.Kind.ALLOC, 3, {"sizes": [4096, 8192]})
    for i in range(2000):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        else:  # a valid frame with a few bytes flipped: reaches the body checks
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
        try:
            for m in P.FrameReader().feed(data):
                assert m.kind in P.Kind
        except RemoteProtocolError:
            pass


def test_encode_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(RemoteProtocolError):
        P.encode(P.Kind.ALLOC, 1, {"sizes": [0]})
    with pytest.raises(RemoteProtocolError):
        P.encode(P.Kind.PING, 1, {}, b"blob")


def test_proofs_bind_token_role_and_both_nonces() -> None:
    t, bn, ln = b"k" * 32, P.make_nonce(), P.make_nonce()
    good = P.proof(t, "borrower", bn, ln)
    assert P.check_proof(t, "borrower", bn, ln, good)
    assert not P.check_proof(b"j" * 32, "borrower", bn, ln, good)      # another token
    assert not P.check_proof(t, "lender", bn, ln, good)                 # echoed role
    assert not P.check_proof(t, "borrower", bn, P.make_nonce(), good)   # replayed
    assert P.make_nonce() != P.make_nonce()


def test_load_token_sources_and_refusals(tmp_path, monkeypatch) -> None:
    f = tmp_path / "token"
    f.write_text("  " + "a" * 20 + "\n")
    assert P.load_token(token_file=f) == b"a" * 20
    monkeypatch.setenv("MY_TOKEN", "b" * 16)
    assert P.load_token(token_env="MY_TOKEN") == b"b" * 16
    monkeypatch.setenv(P.TOKEN_ENV, "c" * 16)
    assert P.load_token() == b"c" * 16
    assert P.load_token("d" * 16) == b"d" * 16
    with pytest.raises(InvalidArgumentError, match="at least 16"):
        P.load_token("short")
    monkeypatch.delenv(P.TOKEN_ENV)
    with pytest.raises(InvalidArgumentError, match="no token"):
        P.load_token()
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        P.load_token(token_file=tmp_path / "missing")
    big = tmp_path / "big"
    big.write_bytes(b"x" * (P.MAX_TOKEN_FILE + 10))
    with pytest.raises(InvalidArgumentError, match="not a token"):
        P.load_token(token_file=big)
    os.mkfifo(tmp_path / "fifo")  # would block a plain open() until a writer comes
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        P.load_token(token_file=tmp_path / "fifo")
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        P.load_token(token_file=tmp_path)
