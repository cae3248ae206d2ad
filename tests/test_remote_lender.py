"""The lender never crashes on what a peer sends: random bytes, truncated frames, huge length
prefixes, another version, a wrong token, messages out of turn, silence, too many connections.
After each, the lender still serves a borrower and the borrower's bytes are intact."""

from __future__ import annotations

import random
import socket
import time

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl, raw_connect, recv_all

from aqua_offload.errors import InvalidArgumentError
from aqua_offload.remote import Lender
from aqua_offload.remote import protocol as P
from conftest import random_tensor

pytestmark = needs_nixl
MiB = 1 << 20


def _errors(data: bytes) -> list[P.Message]:
    """The ERROR frames a lender sent before closing."""
    try:
        return [m for m in P.FrameReader().feed(data) if m.kind == P.Kind.ERROR]
    except Exception:  # noqa: BLE001 - must not happen; the assertion below says so
        return [P.Message(P.Kind.ERROR, 0, {"code": "<undecodable>", "message": ""})]


def _still_serves(lender: Lender, clients) -> None:
    c = clients(lender.address)
    t = random_tensor((MiB,), torch.uint8, generator=torch.Generator().manual_seed(11))
    back = torch.zeros_like(t)
    (blk,) = c.allocate([MiB])
    c.write([(c.register(t), blk, 0, MiB)])
    c.read([(c.register(back), blk, 0, MiB)])
    assert torch.equal(back, t)


def _handshake(sock: socket.socket, token: str = TOKEN) -> P.Message:
    """Authenticate by hand; returns the WELCOME (or ERROR)."""
    nonce = P.make_nonce()
    sock.sendall(P.encode(P.Kind.HELLO, 1, {"nonce": nonce.hex(), "name": "raw"}))
    reader = P.FrameReader()
    (ch,) = list(reader.feed(sock.recv(4096)))
    sock.sendall(P.encode(P.Kind.AUTH, 2, {"proof": P.proof(
        token.encode(), "borrower", nonce, ch.body["nonce"]).hex()}))
    data = b""
    while True:
        data += sock.recv(65536)
        msgs = list(P.FrameReader().feed(data))
        if msgs:
            return msgs[0]


@pytest.mark.parametrize("case", ["random", "http", "huge_length", "truncated_then_close",
                                  "bad_json", "version", "out_of_turn", "blob_on_hello"])
def test_garbage_before_auth_is_refused(remote_lender, remote_clients, case) -> None:
    rng = random.Random(case)
    payload = {
        "random": bytes(rng.randrange(256) for _ in range(4096)),
        "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "huge_length": P.HEADER.pack(P.MAGIC, P.VERSION, 1, 1, 2**32 - 1, 2**32 - 1),
        "truncated_then_close": P.encode(P.Kind.HELLO, 1, {"nonce": "ab" * 32,
                                                           "name": "x"})[:30],
        "bad_json": P.HEADER.pack(P.MAGIC, P.VERSION, 1, 1, 5, 0) + b"{{{{{",
        "version": P.encode(P.Kind.HELLO, 1, {"nonce": "ab" * 32, "name": "x"}, version=9),
        "out_of_turn": P.encode(P.Kind.ALLOC, 1, {"sizes": [MiB]}),
        "blob_on_hello": P.HEADER.pack(P.MAGIC, P.VERSION, 1, 1, 2, 3) + b"{}abc",
    }[case]
    s = raw_connect(remote_lender.address)
    s.sendall(payload)
    if case == "truncated_then_close":
        s.shutdown(socket.SHUT_WR)
    got = recv_all(s, timeout=15)
    s.close()
    errors = _errors(got)
    if case != "truncated_then_close":
        assert [e.body["code"] for e in errors] == ["version" if case == "version"
                                                   else "protocol"]
    st = remote_lender.stats()
    assert st["sessions"] == 0 and st["used_bytes"] == 0
    _still_serves(remote_lender, remote_clients)


def test_wrong_token_gets_auth_error_and_nothing_else(remote_lender, remote_clients) -> None:
    s = raw_connect(remote_lender.address)
    reply = _handshake(s, token="wrong-token-" + "9" * 20)
    assert reply.kind == P.Kind.ERROR and reply.body["code"] == "auth"
    assert recv_all(s, timeout=10) == b""  # and the connection is closed
    s.close()
    assert remote_lender.stats()["auth_failures"] == 1
    _still_serves(remote_lender, remote_clients)


def test_garbage_after_auth_closes_the_session_and_frees_its_blocks(remote_lender,
                                                                    remote_clients) -> None:
    s = raw_connect(remote_lender.address)
    welcome = _handshake(s)
    assert welcome.kind == P.Kind.WELCOME and welcome.blob  # the NIXL metadata, after auth only
    s.sendall(P.encode(P.Kind.ALLOC, 3, {"sizes": [MiB, MiB]}))
    time.sleep(0.2)
    assert remote_lender.stats()["used_bytes"] == 2 * MiB
    for bad in (P.encode(P.Kind.FREE, 4, {"ids": [10**9]}),      # not held: an answer, not a close
                P.encode(P.Kind.WELCOME, 5, {"agent": "a", "kind": "DRAM", "device": 0,
                                             "segment_bytes": 1, "arena_bytes": 0,
                                             "md_version": 0, "session": 1})):  # lender-only
        s.sendall(bad)
    data = recv_all(s, timeout=15)
    codes = [e.body["code"] for e in _errors(data)]
    assert codes == ["invalid", "protocol"]
    s.close()
    deadline = time.monotonic() + 10
    while remote_lender.stats()["used_bytes"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert remote_lender.stats()["used_bytes"] == 0 and remote_lender.stats()["sessions"] == 0
    _still_serves(remote_lender, remote_clients)


def test_a_session_cannot_free_another_sessions_blocks(remote_lender, remote_clients) -> None:
    c = remote_clients(remote_lender.address)
    (blk,) = c.allocate([MiB])
    s = raw_connect(remote_lender.address)
    _handshake(s)
    s.sendall(P.encode(P.Kind.FREE, 7, {"ids": [blk.id]}))
    (reply,) = [m for m in P.FrameReader().feed(s.recv(4096))]
    assert reply.kind == P.Kind.ERROR and reply.body["code"] == "invalid"
    s.close()
    assert remote_lender.stats()["used_bytes"] == MiB  # still c's


def test_random_frames_with_a_valid_header_never_crash_it(remote_lender, remote_clients) -> None:
    rng = random.Random(99)
    for _ in range(40):
        s = raw_connect(remote_lender.address)
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        s.sendall(P.HEADER.pack(P.MAGIC, P.VERSION, rng.randrange(0, 25), rng.randrange(2**32),
                                len(body), 0) + body)
        recv_all(s, timeout=10)
        s.close()
    assert remote_lender._thread.is_alive()
    _still_serves(remote_lender, remote_clients)


def test_silent_and_excess_connections_are_dropped(remote_clients) -> None:
    with Lender(TOKEN, host_bytes="4MiB", segment_bytes="4MiB", handshake_timeout_s=0.5,
                max_connections=3) as lender:
        silent = [raw_connect(lender.address) for _ in range(3)]
        extra = raw_connect(lender.address)
        assert recv_all(extra, timeout=10) == b""  # refused: three are open
        for s in silent:  # closed after the handshake timeout
            assert recv_all(s, timeout=15) == b""
            s.close()
        extra.close()
        st = lender.stats()
        assert st["refused_connections"] >= 1 and st["protocol_errors"] >= 3
        _still_serves(lender, remote_clients)


def test_it_binds_only_the_given_address() -> None:
    with Lender(TOKEN, host_bytes="4MiB", segment_bytes="4MiB") as lender:
        assert lender.host == "127.0.0.1"
        # 127.0.0.2 reaches this host too (all of 127/8 is loopback on Linux): a lender bound
        # to every interface would answer there.
        others = ["127.0.0.2"] + [a for a in _own_addresses() if not a.startswith("127.")]
        for addr in others[:3]:
            with pytest.raises(OSError):
                socket.create_connection((addr, lender.port), timeout=2).close()


def _has_ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_it_serves_on_an_ipv6_address(remote_clients) -> None:
    with Lender(TOKEN, host_bytes="4MiB", segment_bytes="4MiB", address="::1") as lender:
        lender.start()
        assert lender.host == "::1" and lender.address == f"[::1]:{lender.port}"
        with pytest.raises(OSError):  # the v4 loopback is another address: not bound
            socket.create_connection(("127.0.0.1", lender.port), timeout=2).close()
        _still_serves(lender, remote_clients)


def _own_addresses() -> list[str]:
    try:
        return sorted({i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None,
                                                           socket.AF_INET)})
    except OSError:
        return []


@pytest.mark.parametrize("kw, says", [
    (dict(host_bytes="4MiB", segment_bytes="4MiB", port=70000), "port"),
    (dict(host_bytes="4MiB", segment_bytes="4MiB", address="203.0.113.7"),  # not this host's
     "cannot listen"),
    (dict(host_bytes="4MiB", segment_bytes="4MiB", address="bad host name!"), "cannot listen"),
    (dict(host_bytes="4MiB", device="cuda:0", nbytes="4MiB"), "either host_bytes"),
    (dict(device="gpu0", nbytes="4MiB"), "gpu0"),
    (dict(nbytes="4MiB"), "nbytes is for a GPU arena"),
    (dict(host_bytes="lots"), "host_bytes"),
    (dict(host_bytes="4MiB", segment_bytes=1000), "segment"),
    (dict(host_bytes="4MiB"), "less than one segment"),  # the default segment is 64 MiB
    (dict(host_bytes="12MiB", segment_bytes="16MiB"), "less than one segment"),
])
def test_bad_arguments_are_typed(kw, says) -> None:
    with pytest.raises(InvalidArgumentError, match=says):
        Lender(TOKEN, **kw).close()


def test_a_short_token_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="at least 16"):
        Lender("short", host_bytes="4MiB")


def test_before_auth_a_frame_over_a_handshake_is_refused_from_its_header(remote_lender,
                                                                         remote_clients) -> None:
    s = raw_connect(remote_lender.address)
    # 1 MiB announced: within the limits of an authenticated session, not of a handshake
    s.sendall(P.HEADER.pack(P.MAGIC, P.VERSION, int(P.Kind.HELLO), 1, MiB, 0))
    errors = _errors(recv_all(s, timeout=15))
    s.close()
    assert [e.body["code"] for e in errors] == ["protocol"]
    assert "over the limits" in errors[0].body["message"]
    _still_serves(remote_lender, remote_clients)
