"""Two hosts on one machine: a lender and a borrower, each in a network namespace of its own,
joined by one veth pair (a cable), so the borrower reaches the lender only at its address on
that link. The nearest thing to "beyond one server" a single machine has: the lender binds a
non-loopback address, both agents run UCX on the link's interfaces only, and pulling the cable
(the link set down) is a typed ``RemoteLostError`` within the deadline, never a hang, while the
other tiers keep working.

``UCX_TLS=tcp`` puts the bytes on the link itself (the network path). With UCX's default
transports the two namespaces still share one kernel and one ``/dev/shm``, so UCX may move the
bytes through shared memory; that run shows the default choice works across namespaces, the
TCP one is the network.

Needs root (CAP_NET_ADMIN: ``ip netns add``) and iproute2, skipped with the reason otherwise.
The borrower is this file run as a script inside its namespace (``__main__`` below): the
pytest process's own UCX is on loopback. Every child has a hard timeout; the namespaces and
whatever runs in them are removed at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

if __name__ != "__main__":
    from remote_helpers import LenderProcess, child_env, requires_nixl
else:  # the borrower, in its namespace: this file's directory is on sys.path
    def requires_nixl(fn):
        return fn

CHILD_TIMEOUT_S = 180.0  # a child's hard limit; the lender starts in ~1 s, the borrower in ~3 s
DEADLINE_S = 3.0  # the borrower's transfer deadline
BLIP_DEADLINE_S = 20.0  # a 1 s outage: TCP's retransmissions (200 ms, doubling) end well inside


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    name = f"aqprobe{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:  # a veth pair too (a container may allow namespaces but not the veth driver)
        veth = _ip("-n", name, "link", "add", "aqp0", "type", "veth", "peer", "name", "aqp1",
                   check=False)
        if veth.returncode != 0:
            return f"cannot make a veth pair: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


class TwoHosts:
    """Namespaces ``lender`` and ``borrower`` with one veth pair between them: 10.231.0.1 on
    the lender's end, 10.231.0.2 on the borrower's (each namespace has its own addresses, so
    concurrent runs do not collide), loopback up in both."""

    LENDER_IP, BORROWER_IP = "10.231.0.1", "10.231.0.2"

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{time.monotonic_ns() % 1000}"
        self.lender, self.borrower = f"aq{tag}l", f"aq{tag}b"
        self.lender_if, self.borrower_if = f"aq{tag}L", f"aq{tag}B"  # <= 15 characters
        try:
            for ns in (self.lender, self.borrower):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.lender_if, "netns", self.lender, "type", "veth", "peer",
                "name", self.borrower_if, "netns", self.borrower)
            for ns, dev, addr in ((self.lender, self.lender_if, self.LENDER_IP),
                                  (self.borrower, self.borrower_if, self.BORROWER_IP)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.remove()
            raise

    def pull_cable(self) -> None:
        """The link down: both ends lose carrier; nothing crosses it any more."""
        _ip("-n", self.lender, "link", "set", self.lender_if, "down")

    def plug_cable(self) -> None:
        _ip("-n", self.lender, "link", "set", self.lender_if, "up")

    def remove(self) -> None:
        for ns in (self.lender, self.borrower):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (OSError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)  # the veth pair goes with its namespaces


@pytest.fixture
def two_hosts():
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    hosts = TwoHosts()
    yield hosts
    hosts.remove()


def _env(device: str, tls: str | None) -> dict[str, str]:
    env = child_env(UCX_NET_DEVICES=device)
    env.pop("UCX_TLS", None)
    if tls:
        env["UCX_TLS"] = tls
    return env


def _borrower(hosts: TwoHosts, tmp_path: Path, scenario: str, address: str,
              tls: str | None) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / f"{scenario}.json"
    with open(tmp_path / f"{scenario}.log", "w") as log:  # (the child keeps its own copy)
        return subprocess.Popen(
            ["ip", "netns", "exec", hosts.borrower, sys.executable, os.path.abspath(__file__),
             scenario, address, str(tmp_path)], env=_env(hosts.borrower_if, tls), stdout=log,
            stderr=subprocess.STDOUT), out


def _result(proc: subprocess.Popen, out: Path, tmp_path: Path, scenario: str) -> dict:
    try:
        rc = proc.wait(CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the borrower hung:\n{(tmp_path / f'{scenario}.log').read_text()}")
    log = (tmp_path / f"{scenario}.log").read_text()
    assert rc == 0 and out.exists(), f"borrower rc {rc}:\n{log}"
    return json.loads(out.read_text())


def _lender(hosts: TwoHosts, tmp_path: Path, address: str, tls: str | None,
            *args: str) -> LenderProcess:
    """``aqua-offload lend`` in the lender's namespace, on ``address``."""
    return LenderProcess(tmp_path, *args, "--address", address,
                         env=_env(hosts.lender_if, tls),
                         prefix=["ip", "netns", "exec", hosts.lender])


def _wait_for(path: Path, proc: subprocess.Popen, tmp_path: Path, scenario: str) -> None:
    """Until the borrower writes ``path`` (it stops there for the test's next move)."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, (tmp_path / f"{scenario}.log").read_text()
        assert time.monotonic() < deadline, f"the borrower never wrote {path.name}"
        time.sleep(0.01)


@requires_nixl
@pytest.mark.parametrize("tls", ["tcp", None], ids=["tcp", "default"])
def test_offload_and_fetch_across_the_link(two_hosts, tmp_path, tls) -> None:
    lender = _lender(two_hosts, tmp_path, f"{two_hosts.LENDER_IP}:0", tls,
                     "--host-bytes", "96MiB", "--segment", "32MiB")
    try:
        assert lender.address.startswith(f"{two_hosts.LENDER_IP}:")
        proc, out = _borrower(two_hosts, tmp_path, "round_trips", lender.address, tls)
        got = _result(proc, out, tmp_path, "round_trips")
        assert got["location"] == lender.address
        assert got["remote_handles"] == got["handles"] > 0  # every tensor went over the link
        assert got["bitwise"] is True and got["lost_handles"] == 0
        assert lender.stop() == 0
    finally:
        lender.kill()


@requires_nixl
def test_a_pulled_cable_is_a_typed_loss_and_the_host_tier_still_works(two_hosts,
                                                                       tmp_path) -> None:
    lender = _lender(two_hosts, tmp_path, two_hosts.LENDER_IP, "tcp",
                     "--host-bytes", "32MiB", "--segment", "16MiB")
    try:
        proc, out = _borrower(two_hosts, tmp_path, "cable_pull", lender.address, "tcp")
        _wait_for(tmp_path / "ready", proc, tmp_path, "cable_pull")  # offloaded, waiting
        two_hosts.pull_cable()
        (tmp_path / "pulled").touch()
        got = _result(proc, out, tmp_path, "cable_pull")
        assert got["error"] == "RemoteLostError", got
        assert got["lost_after_s"] < DEADLINE_S + 15, got  # at the deadline, not a hang
        assert got["again"] == "RemoteLostError" and got["again_s"] < 5, got  # then at once
        assert got["host_bitwise"] is True  # the host tier's handle is untouched
        assert got["lost_handles"] == 1 and got["lender_lost"] is True, got
        assert got["close_s"] < DEADLINE_S + 15, got  # close does not wait on the dead link
    finally:
        lender.kill()


@requires_nixl
def test_a_blip_shorter_than_the_deadline_loses_nothing(two_hosts, tmp_path) -> None:
    # The link down for 1 s in the middle of a fetch, then up: TCP retransmits, the transfer
    # ends within the deadline, and nothing is marked lost.
    lender = _lender(two_hosts, tmp_path, two_hosts.LENDER_IP, "tcp",
                     "--host-bytes", "32MiB", "--segment", "16MiB")
    try:
        proc, out = _borrower(two_hosts, tmp_path, "blip", lender.address, "tcp")
        _wait_for(tmp_path / "ready", proc, tmp_path, "blip")
        two_hosts.pull_cable()
        (tmp_path / "pulled").touch()
        # written just before the fetch, into a dead link
        _wait_for(tmp_path / "fetching", proc, tmp_path, "blip")
        time.sleep(1.0)
        two_hosts.plug_cable()
        got = _result(proc, out, tmp_path, "blip")
        # The fetch cannot end before the link is up again (no other path: TCP on the veth
        # only), so it spanned the outage: this is what the test is about, not a speed.
        assert got.pop("fetch_s") >= 0.9, got
        assert got == {"bitwise": True, "lost_handles": 0, "lender_lost": False}, got
    finally:
        lender.kill()


# ---- the borrower: this file run as a script in the borrower's namespace -------------------
def _scenario_round_trips(address: str, tmp: Path) -> dict:
    import torch

    import aqua_offload as aq
    from conftest import random_tensor

    token = os.environ["AQUA_OFFLOAD_REMOTE_TOKEN"]
    g = torch.Generator().manual_seed(5)
    m = aq.OffloadManager("cpu", peers=None, host_bytes=256, remote=[address],
                          remote_token=token, remote_deadline_s=30.0)
    try:
        big = [random_tensor((n,), torch.uint8, generator=g) for n in (4096, 1 << 20, 9 << 20)]
        small = [random_tensor((257 + i,), dt, generator=g)
                 for i, dt in enumerate([torch.float32, torch.int64, torch.float16] * 40)]
        refs = [t.clone() for t in big + small]
        hs = [m.offload(t, release=True) for t in big] + m.offload_many(small, release=True)
        tiers = [h.tier for h in hs]
        m.prefetch(hs[1])
        for h in hs[:3]:
            m.fetch(h)
        m.fetch_many(hs[3:])
        snap = random_tensor((5 << 20,), torch.uint8, generator=g)
        back = torch.empty_like(snap)
        hsnap = m.offload(snap, release=False)
        tiers.append(hsnap.tier)
        m.fetch(hsnap, back)
        bitwise = (all(torch.equal(a, b) for a, b in zip(big + small, refs))
                   and torch.equal(back, snap))
        st = m.stats()
        (tier,) = [t for t in st["tiers"] if t["tier"] == "remote"]
        return {"handles": len(tiers), "remote_handles": tiers.count("remote"),
                "bitwise": bitwise, "location": tier["location"],
                "lost_handles": st["remote"]["lost_handles"]}
    finally:
        m.close()


def _scenario_cable_pull(address: str, tmp: Path) -> dict:
    import torch

    import aqua_offload as aq
    from aqua_offload.errors import RemoteLostError
    from conftest import random_tensor

    token = os.environ["AQUA_OFFLOAD_REMOTE_TOKEN"]
    g = torch.Generator().manual_seed(6)
    m = aq.OffloadManager("cpu", peers=None, host_bytes="2MiB", remote=[address],
                          remote_token=token, remote_deadline_s=DEADLINE_S)
    local = random_tensor((1 << 20,), torch.uint8, generator=g)
    far = random_tensor((6 << 20,), torch.uint8, generator=g)  # over the host tier's room
    local_ref = local.clone()
    h_local, h_far = m.offload(local, release=True), m.offload(far, release=True)
    assert (h_local.tier, h_far.tier) == ("host", "remote"), (h_local.tier, h_far.tier)
    (tmp / "ready").touch()
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not (tmp / "pulled").exists():
        assert time.monotonic() < deadline, "the cable was never pulled"
        time.sleep(0.05)
    out: dict = {}
    for key in ("", "again"):
        t0 = time.monotonic()
        try:
            m.fetch(h_far)
            out[key or "error"] = None
        except RemoteLostError as exc:
            out[key or "error"] = type(exc).__name__
        out[f"{key or 'lost_after'}_s"] = time.monotonic() - t0
    m.fetch(h_local)
    out["host_bitwise"] = torch.equal(local, local_ref)
    st = m.stats()
    out["lost_handles"] = st["remote"]["lost_handles"]
    (tier,) = [t for t in st["tiers"] if t["tier"] == "remote"]
    out["lender_lost"] = bool(tier["lost"])
    m.free(h_far)
    t0 = time.monotonic()
    m.close()
    out["close_s"] = time.monotonic() - t0
    return out


def _scenario_blip(address: str, tmp: Path) -> dict:
    import torch

    import aqua_offload as aq
    from conftest import random_tensor

    token = os.environ["AQUA_OFFLOAD_REMOTE_TOKEN"]
    g = torch.Generator().manual_seed(7)
    m = aq.OffloadManager("cpu", peers=None, host_bytes=256, remote=[address],
                          remote_token=token, remote_deadline_s=BLIP_DEADLINE_S)
    try:
        far = random_tensor((6 << 20,), torch.uint8, generator=g)
        ref = far.clone()
        h = m.offload(far, release=True)
        assert h.tier == "remote", h.tier
        (tmp / "ready").touch()
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not (tmp / "pulled").exists():
            assert time.monotonic() < deadline, "the cable was never pulled"
            time.sleep(0.01)
        (tmp / "fetching").touch()
        t0 = time.monotonic()
        m.fetch(h)
        fetch_s = time.monotonic() - t0
        st = m.stats()
        (tier,) = [t for t in st["tiers"] if t["tier"] == "remote"]
        return {"bitwise": torch.equal(far, ref), "lost_handles": st["remote"]["lost_handles"],
                "lender_lost": bool(tier["lost"]), "fetch_s": fetch_s}
    finally:
        m.close()


if __name__ == "__main__":
    scenario, address, tmp_dir = sys.argv[1:4]
    tmp = Path(tmp_dir)
    result = {"round_trips": _scenario_round_trips,
              "cable_pull": _scenario_cable_pull, "blip": _scenario_blip}[scenario](address, tmp)
    (tmp / f"{scenario}.json").write_text(json.dumps(result))
