"""The borrower's client against an in-process lender (two NIXL agents in one process): bitwise
round trips of single and batched transfers, typed errors that change nothing, connection
failures (bad address, nothing listening, wrong token, another version, not a lender, silence,
a closed lender)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

from aqua_offload.errors import (InvalidArgumentError, OutOfMemoryError, RemoteAuthError,
                                 RemoteConnectError, RemoteLostError, RemoteProtocolError,
                                 RemoteVersionError)
from aqua_offload.remote import Lender, RemoteClient, Transfer
from aqua_offload.remote import protocol as P
from conftest import random_tensor, run_with_timeout

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


def _rand(n: int, seed: int = 0) -> torch.Tensor:
    return random_tensor((n,), torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_write_read_round_trip_bitwise(remote_lender, remote_clients) -> None:
    c = remote_clients(remote_lender.address)
    src, dst = _rand(3 * MiB, 1), torch.zeros(3 * MiB, dtype=torch.uint8)
    rs, rd = c.register(src), c.register(dst)
    a, b = c.allocate([2 * MiB, MiB])
    c.write([(rs, a, 0, 2 * MiB), ((rs, 2 * MiB), b, 0, MiB)])
    c.read([(rd, b, 0, MiB), ((rd, MiB), a, 0, 2 * MiB)])  # swapped on the way back
    assert torch.equal(dst[:MiB], src[2 * MiB:]) and torch.equal(dst[MiB:], src[:2 * MiB])
    st = c.stats()
    assert (st["writes"], st["reads"], st["items_written"], st["bytes_read"]) == (1, 1, 2, 3 * MiB)
    assert st["blocks"] == 2 and st["bytes_held"] == 3 * MiB and st["lost"] is None


def test_scattered_batch_of_small_items_is_one_call(remote_lender, remote_clients) -> None:
    c = remote_clients(remote_lender.address)
    n, size, stride = 900, 4 * KiB, 4 * KiB + 512
    src = _rand(n * size, 2)
    back = torch.zeros_like(src)
    rs, rb = c.register(src), c.register(back)
    (blk,) = c.allocate([n * stride])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    # item i goes to slot perm[i], with gaps between slots
    c.write([Transfer(rs, blk, size, i * size, perm[i] * stride + 256) for i in range(n)])
    c.read([Transfer(rb, blk, size, i * size, perm[i] * stride + 256) for i in range(n)])
    assert torch.equal(back, src)
    assert c.stats()["writes"] == 1 and c.stats()["items_read"] == n


def test_unregistered_host_memory_moves_registered_for_the_call(remote_lender,
                                                                remote_clients) -> None:
    c = remote_clients(remote_lender.address)
    a, b = _rand(MiB + 5, 21), _rand(2 * MiB - 3, 22)
    back = torch.zeros(3 * MiB + 2, dtype=torch.uint8)
    (blk,) = c.allocate([3 * MiB + 2])
    regs = len(c._agent._regs)
    assert c.write_memory([(a.data_ptr(), a.numel(), blk, 2 * MiB - 3),
                           (b.data_ptr(), b.numel(), blk, 0)])
    assert c.read_memory([(back.data_ptr(), back.numel(), blk, 0)])
    assert torch.equal(back[:2 * MiB - 3], b) and torch.equal(back[2 * MiB - 3:], a)
    assert len(c._agent._regs) == regs, "the memory's registration ended with each call"
    st = c.stats()
    assert (st["writes"], st["items_written"], st["reads"], st["bytes_read"]) == (
        1, 2, 1, 3 * MiB + 2)
    bad = [(a.data_ptr(), a.numel(), blk, 2 * MiB),       # overruns the block
           (0, 16, blk, 0), (a.data_ptr(), 0, blk, 0),    # no address, no bytes
           (a.data_ptr(), True, blk, 0), (a.data_ptr(), 16, "block", 0),
           (a.data_ptr(), 16, blk, -1), (a.data_ptr(), 16, blk)]
    for piece in bad:
        with pytest.raises(InvalidArgumentError):
            c.read_memory([(back.data_ptr(), 1024, blk, 0), piece])  # nothing moves at all
    assert c.stats()["reads"] == 1 and len(c._agent._regs) == regs


def test_memory_nixl_refuses_moves_nothing(remote_lender, remote_clients, monkeypatch) -> None:
    from aqua_offload.errors import BackendError
    from aqua_offload.remote import transport

    c = remote_clients(remote_lender.address)
    (blk,) = c.allocate([MiB])
    src = _rand(MiB, 23)
    c.write([(c.register(src), blk, 0, MiB)])

    def refuse(self, *args, **kw):
        raise BackendError("injected: this memory cannot be registered", error_name="injected")

    monkeypatch.setattr(transport.Agent, "register_many", refuse)
    out = _rand(MiB, 24)
    keep = out.clone()
    assert c.read_memory([(out.data_ptr(), MiB, blk, 0)]) is False
    assert torch.equal(out, keep) and c.stats()["reads"] == 0 and c.lost is None


def test_two_clients_hold_separate_blocks(remote_lender, remote_clients) -> None:
    c1, c2 = remote_clients(remote_lender.address), remote_clients(remote_lender.address)
    t1, t2 = _rand(MiB, 4), _rand(MiB, 5)
    r1, r2 = c1.register(t1), c2.register(t2)
    (b1,), (b2,) = c1.allocate([MiB]), c2.allocate([MiB])
    c1.write([(r1, b1, 0, MiB)])
    c2.write([(r2, b2, 0, MiB)])
    with pytest.raises(InvalidArgumentError, match="not held"):
        c1.read([(r1, b2, 0, MiB)])  # c2's block
    out = torch.zeros(MiB, dtype=torch.uint8)
    c1.read([(c1.register(out), b1, 0, MiB)])
    assert torch.equal(out, t1)


def test_bad_items_are_refused_before_anything_moves(remote_lender, remote_clients) -> None:
    c = remote_clients(remote_lender.address)
    src = _rand(64 * KiB, 6)
    keep = src.clone()
    rs = c.register(src)
    (blk,) = c.allocate([64 * KiB])
    c.write([(rs, blk, 0, 64 * KiB)])
    other = torch.zeros(16, dtype=torch.uint8)
    bad = [
        [(rs, blk, 1, 64 * KiB)],                       # overruns the block
        [((rs, 1), blk, 0, 64 * KiB)],                  # overruns the region
        [(rs, blk, 0, 0)],                              # zero bytes
        [(rs, blk, -1, 10)],                            # negative offset
        [(rs, blk, 0, True)],                           # a bool is no size
        [(other, blk, 0, 16)],                          # not a registered region
        [(rs, "block", 0, 16)],                         # not a block
        [(rs, blk, 0)],                                 # malformed item
    ]
    for items in bad:
        with pytest.raises(InvalidArgumentError):
            c.read([(rs, blk, 0, 1024)] + items)  # a good item first: nothing moves at all
    assert torch.equal(src, keep)
    c.free([blk])
    with pytest.raises(InvalidArgumentError, match="not held"):
        c.read([(rs, blk, 0, 16)])
    with pytest.raises(InvalidArgumentError):
        c.free([blk])
    assert c.stats()["reads"] == 0


def test_allocation_over_capacity_is_oom_and_all_or_nothing(remote_lender,
                                                            remote_clients) -> None:
    c = remote_clients(remote_lender.address)
    used = remote_lender.stats()["used_bytes"]
    with pytest.raises(OutOfMemoryError) as info:
        c.allocate([4 * MiB] * 4 + [MiB])  # 17 MiB into 16
    assert info.value.requested == 17 * MiB
    assert c.blocks == [] and remote_lender.stats()["used_bytes"] == used
    with pytest.raises(OutOfMemoryError, match="larger than a segment"):
        c.allocate([4 * MiB + 1])
    for bad in ([], [0], [-1], [1.5], "x"):
        with pytest.raises(InvalidArgumentError):
            c.allocate(bad)
    assert len(c.allocate([4 * MiB] * 4)) == 4  # the whole arena is still there


def test_a_free_not_waited_for_comes_before_the_next_request(remote_lender,
                                                             remote_clients) -> None:
    """``free(wait=False)`` sends and returns; the lender frees before serving this client's
    next request (one connection, in order), so the whole arena can be allocated again."""
    c = remote_clients(remote_lender.address)
    cap = remote_lender.stats()["lendable_bytes"]
    seg = remote_lender.segment_bytes
    blocks = c.allocate([seg] * (cap // seg))
    with pytest.raises(OutOfMemoryError):
        c.allocate([KiB])
    errors = remote_lender.stats()["request_errors"]
    c.free(blocks, wait=False)
    assert c.blocks == [] and c.stats()["frees"] == len(blocks)
    again = c.allocate([seg] * (cap // seg))
    assert len(again) == cap // seg
    with pytest.raises(InvalidArgumentError):  # checked before anything is sent
        c.free(blocks, wait=False)
    c.free(again, wait=False)
    assert run_with_timeout(lambda: c.ping(), 30) >= 0
    assert remote_lender.stats()["blocks"] == 0
    assert remote_lender.stats()["request_errors"] == errors, "every free was accepted"


def test_new_segments_reach_the_client(remote_lender, remote_clients) -> None:
    c = remote_clients(remote_lender.address)
    c.allocate([4 * MiB] * 4)
    remote_lender.grow(4 * MiB)
    (blk,) = c.allocate([4 * MiB])  # in the new segment: its metadata is loaded first
    assert c.stats()["md_loads"] == 1
    t = _rand(4 * MiB, 7)
    back = torch.zeros_like(t)
    c.write([(c.register(t), blk, 0, 4 * MiB)])
    c.read([(c.register(back), blk, 0, 4 * MiB)])
    assert torch.equal(back, t)


def test_closing_a_client_frees_its_blocks_on_the_lender(remote_lender, remote_clients) -> None:
    c = remote_clients(remote_lender.address)
    c.allocate([MiB, MiB])
    assert remote_lender.stats()["used_bytes"] == 2 * MiB
    c.close()
    deadline = time.monotonic() + 10
    while remote_lender.stats()["used_bytes"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert remote_lender.stats()["used_bytes"] == 0
    with pytest.raises(InvalidArgumentError, match="closed"):
        c.allocate([1])


# ---- connecting ---------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["nohost", "host:", ":80", "h:0", "h:70000", "h:8x", 5])
def test_malformed_address(address) -> None:
    with pytest.raises(InvalidArgumentError):
        RemoteClient(address, TOKEN)


def test_nothing_listening_is_a_connect_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nobody listens on
    with pytest.raises(RemoteConnectError):
        RemoteClient(f"127.0.0.1:{port}", TOKEN, deadline_s=2.0)
    with pytest.raises(RemoteConnectError):
        RemoteClient("no-such-host.invalid:5000", TOKEN, deadline_s=2.0)


def test_wrong_token_is_refused_and_counted(remote_lender) -> None:
    with pytest.raises(RemoteAuthError):
        RemoteClient(remote_lender.address, "another-token-" + "0" * 20, deadline_s=5.0)
    with pytest.raises(InvalidArgumentError):
        RemoteClient(remote_lender.address, "short", deadline_s=5.0)
    assert remote_lender.stats()["sessions"] == 0


class FakeLender:
    """A TCP server that answers the first bytes with ``reply`` (or nothing), then waits."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply = reply
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        conn.recv(4096)
        if self.reply is not None:
            conn.sendall(self.reply)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("reply,error", [
    (P.encode(P.Kind.CHALLENGE, 1, {"nonce": "00" * 32, "proof": "00" * 32}, version=2),
     RemoteVersionError),
    (P.encode(P.Kind.ERROR, 0, {"code": "version", "message": "speaks 2"}), RemoteVersionError),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", RemoteProtocolError),
    (P.encode(P.Kind.PONG, 1, {}), RemoteProtocolError),
    (P.encode(P.Kind.CHALLENGE, 1, {"nonce": "00" * 32, "proof": "00" * 32}), RemoteAuthError),
    (None, RemoteConnectError),  # accepts, never answers
    (b"", RemoteConnectError),   # accepts, closes
])
def test_a_peer_that_is_not_a_lender_of_this_version(reply, error) -> None:
    fake = FakeLender(reply)
    if reply == b"":
        fake.reply = None
        threading.Timer(0.2, fake.close).start()
    try:
        with pytest.raises(error):
            run_with_timeout(lambda: RemoteClient(fake.address, TOKEN, deadline_s=1.5), 30)
    finally:
        fake.close()


def test_a_closed_lender_makes_the_client_lost_at_once(remote_clients) -> None:
    lender = Lender(TOKEN, host_bytes="4MiB", segment_bytes="4MiB").start()
    c = remote_clients(lender.address, deadline_s=3.0)
    t = _rand(MiB, 8)
    r = c.register(t)
    (blk,) = c.allocate([MiB])
    c.write([(r, blk, 0, MiB)])
    lender.close()
    with pytest.raises(RemoteLostError) as info:
        run_with_timeout(lambda: c.ping(), 30)
    assert info.value.address == lender.address
    t0 = time.monotonic()
    for call in (lambda: c.read([(r, blk, 0, MiB)]), lambda: c.allocate([1]),
                 lambda: c.free([blk])):
        with pytest.raises(RemoteLostError):
            call()
    assert time.monotonic() - t0 < 3.0, "a lost lender is reported at once, not per deadline"
    assert c.stats()["lost"]


def test_waiting_releases_the_gil(remote_clients) -> None:
    # A lender that stops answering: the client waits its deadline without holding the GIL.
    lender = Lender(TOKEN, host_bytes="4MiB", segment_bytes="4MiB").start()
    c = remote_clients(lender.address, deadline_s=3.0)
    lender._stop.set()  # the serving thread ends; the socket stays open but nobody answers
    lender._thread.join(10)
    box: dict = {}
    waiter = threading.Thread(target=lambda: box.setdefault("e", _catch(c.ping)))
    waiter.start()
    time.sleep(0.2)
    spins = sum(1 for _ in range(200000))  # pure Python: runs only if the waiter let go
    alive = waiter.is_alive()
    waiter.join(30)
    lender.close()
    assert spins == 200000 and alive, "the main thread ran while the client waited"
    assert isinstance(box["e"], RemoteLostError)


def _catch(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None
