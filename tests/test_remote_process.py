"""``aqua-offload lend`` in a child process, borrowed from this one: default transports and
UCX_TLS=tcp (the network path), SIGTERM, SIGKILL and SIGSTOP of the lender. Every child has a
hard timeout; a dead or silent lender is a typed error within the deadline, never a hang."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from remote_helpers import (TOKEN, LenderProcess, child_env, raw_connect,
                            recv_all, requires_nixl)

from aqua_offload.errors import RemoteAuthError, RemoteLostError
from aqua_offload.remote import RemoteClient
from conftest import random_tensor, run_with_timeout

MiB = 1 << 20
DEADLINE_S = 3.0


def _round_trip(c: RemoteClient, seed: int) -> None:
    t = random_tensor((6 * MiB,), torch.uint8, generator=torch.Generator().manual_seed(seed))
    back = torch.zeros_like(t)
    rt, rb = c.register(t), c.register(back)
    blocks = c.allocate([4 * MiB, 2 * MiB])
    c.write([(rt, blocks[0], 0, 4 * MiB), ((rt, 4 * MiB), blocks[1], 0, 2 * MiB)])
    c.read([(rb, blocks[0], 0, 4 * MiB), ((rb, 4 * MiB), blocks[1], 0, 2 * MiB)])
    assert torch.equal(back, t)


@pytest.mark.parametrize("tls", [None, "tcp"])
@requires_nixl
def test_round_trip_then_sigkill(tmp_path, monkeypatch, remote_clients, tls) -> None:
    env = child_env(**({"UCX_TLS": tls} if tls else {}))
    lender = LenderProcess(tmp_path, "--host-bytes", "16MiB", "--segment", "4MiB", env=env)
    try:
        if tls:
            monkeypatch.setenv("UCX_TLS", tls)  # this side's agent starts on TCP only, too
        c = remote_clients(lender.address, deadline_s=DEADLINE_S)
        monkeypatch.delenv("UCX_TLS", raising=False)
        _round_trip(c, seed=1 if tls else 2)
        t = torch.ones(MiB, dtype=torch.uint8)
        (blk,) = c.allocate([MiB])
        r = c.register(t)
        lender.kill()  # SIGKILL: no goodbye
        t0 = time.monotonic()
        with pytest.raises(RemoteLostError):
            run_with_timeout(lambda: (c.write([(r, blk, 0, MiB)]), c.ping()), 60)
        assert time.monotonic() - t0 < DEADLINE_S + 10, "lost within the deadline, no hang"
        with pytest.raises(RemoteLostError):
            c.read([(r, blk, 0, MiB)])
        assert c.stats()["lost"]
    finally:
        lender.kill()


@requires_nixl
def test_a_stopped_lender_is_lost_at_the_deadline_over_tcp(tmp_path, monkeypatch,
                                                           remote_clients) -> None:
    # Over TCP the lender's own progress moves the bytes: stopped (SIGSTOP), it leaves a
    # transfer in progress forever. NIXL has no timeout; the client's deadline ends it.
    lender = LenderProcess(tmp_path, "--host-bytes", "8MiB", "--segment", "4MiB",
                           env=child_env(UCX_TLS="tcp"))
    try:
        monkeypatch.setenv("UCX_TLS", "tcp")
        c = remote_clients(lender.address, deadline_s=DEADLINE_S)
        monkeypatch.delenv("UCX_TLS")
        t = random_tensor((4 * MiB,), torch.uint8, generator=torch.Generator().manual_seed(3))
        r = c.register(t)
        (blk,) = c.allocate([4 * MiB])
        c.write([(r, blk, 0, 4 * MiB)])
        os.kill(lender.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RemoteLostError) as info:
            run_with_timeout(lambda: c.read([(r, blk, 0, 4 * MiB)]), 60)
        assert time.monotonic() - t0 < DEADLINE_S + 10
        assert "progress" in info.value.reason or "answer" in info.value.reason
    finally:
        os.kill(lender.proc.pid, signal.SIGCONT)
        lender.kill()


@requires_nixl
def test_cli_lender_survives_garbage_refuses_tokens_and_stops_cleanly(
        tmp_path, remote_clients) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = child_env()
    env.pop("AQUA_OFFLOAD_REMOTE_TOKEN")
    lender = LenderProcess(tmp_path, "--host-bytes", "8MiB", "--segment", "4MiB",
                           "--token-file", str(token_file), env=env)
    try:
        s = raw_connect(lender.address)
        s.sendall(os.urandom(5000))
        recv_all(s, timeout=15)
        s.close()
        with pytest.raises(RemoteAuthError):
            RemoteClient(lender.address, "not-the-token-" + "x" * 20, deadline_s=DEADLINE_S)
        _round_trip(remote_clients(lender.address, deadline_s=DEADLINE_S), seed=4)
        assert lender.stop() == 0
        out = lender.output()
        # The client refused the lender first (its proof did not match): the lender saw a
        # handshake abandoned, not a wrong proof.
        assert "3 connections" in out and "1 protocol errors" in out, out
    finally:
        lender.kill()


@pytest.mark.parametrize("args", [[], ["--bytes", "1MiB"], ["--device", "cuda:0"],
                                  ["--host-bytes", "1MiB", "--interval", "0"]])
def test_cli_usage_errors(args, capsys) -> None:
    from aqua_offload.remote.__main__ import main

    assert main(args) == 2  # refused before anything starts: no NIXL needed
    assert "aqua-offload lend:" in capsys.readouterr().err


@pytest.mark.parametrize("address,port,want", [
    (None, None, ("127.0.0.1", 0)), ("10.0.0.5", None, ("10.0.0.5", 0)),
    ("10.0.0.5:7000", None, ("10.0.0.5", 7000)), ("10.0.0.5:7000", 7000, ("10.0.0.5", 7000)),
    ("node-3", 7001, ("node-3", 7001)), ("::1", None, ("::1", 0)), ("[::1]", 9, ("::1", 9)),
    ("[fe80::1]:7000", None, ("fe80::1", 7000))])
def test_cli_address_may_carry_the_port(address, port, want) -> None:
    from aqua_offload.remote.__main__ import listen_address

    assert listen_address(address, port) == want  # as a borrower names the lender


@pytest.mark.parametrize("address", ["10.0.0.5:7000", "10.0.0.5:x", "10.0.0.5:70000", ":7000",
                                     "[::1", "[::1]7000", "[]:7000"])
def test_cli_refuses_a_malformed_address_before_starting(address, capsys) -> None:
    from aqua_offload.remote.__main__ import main

    assert main(["--host-bytes", "1MiB", "--address", address, "--port", "7001"]) == 2
    assert "--address" in capsys.readouterr().err


def test_cli_refuses_a_gpu_where_torch_sees_none(monkeypatch, capsys) -> None:
    from aqua_offload.remote.__main__ import main

    # It was torch's AssertionError ("Torch not compiled with CUDA enabled") from the first
    # segment's allocation, a traceback instead of the exit status of a failed start.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("AQUA_OFFLOAD_REMOTE_TOKEN", TOKEN)
    assert main(["--device", "cuda:0", "--bytes", "64MiB"]) == 2  # one whole segment
    err = capsys.readouterr().err
    assert "aqua-offload lend:" in err and "no CUDA device" in err and "--host-bytes" in err


@pytest.mark.parametrize("args", [["--host-bytes", "1MiB"],
                                  ["--host-bytes", "3MiB", "--segment", "4MiB"],
                                  ["--keep", "1GiB", "--host-bytes", "1MiB"]])
def test_cli_refuses_an_arena_of_less_than_one_segment(args, monkeypatch, capsys) -> None:
    from aqua_offload.remote.__main__ import main

    # Rounded down to whole segments, it would serve 0 bytes (or, with --keep, never lend).
    monkeypatch.setenv("AQUA_OFFLOAD_REMOTE_TOKEN", TOKEN)
    assert main(args) == 2
    assert "less than one segment" in capsys.readouterr().err


def test_cli_refuses_a_short_token(monkeypatch, capsys) -> None:
    from aqua_offload.remote.__main__ import main

    monkeypatch.setenv("AQUA_OFFLOAD_REMOTE_TOKEN", "short")
    assert main(["--host-bytes", "1MiB"]) == 2
    assert "at least 16" in capsys.readouterr().err
