"""The remote tier: offload into memory that other processes (or nodes) lend over NIXL.

Two lenders on loopback, both holding one shared token (from the environment):
  near  an in-process ``Lender`` (16 MiB), first in the manager's list;
  far   ``aqua-offload lend`` in a child process (32 MiB), used when ``near`` is full.
The manager has a 16 MiB host tier: offloading 48 MiB spills the oldest tensors to ``near``,
then to ``far``. Every tensor comes back bitwise. Then ``near`` reclaims its memory: the
manager moves those tensors into its host tier (or to ``far``) before answering, and nothing
is lost. Then ``far`` is killed with SIGKILL: its tensors raise ``RemoteLostError`` within
the deadline (what only a lender held is lost with it), everything else keeps working.
Finally a manager with ``remote_copies=2`` keeps each tensor on ``near`` and on a new ``far``
lender: that lender is killed too, and every tensor still comes back bitwise.

Runs on a GPU machine (pinned staging, CUDA tensors) and without one (emulation backend).
Needs NIXL: ``pip install "aqua_offload[remote]"``.

    python examples/remote_tier.py [--mib 48]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time

# UCX reads these when the first agent starts: loopback only, no InfiniBand modules (they
# crash processes at exit where the RDMA libraries exist without a NIC), quiet NIXL logs.
for key, value in (("UCX_NET_DEVICES", "lo"), ("UCX_MODULES", "^ib*"),
                   ("NIXL_LOG_LEVEL", "WARN")):
    os.environ.setdefault(key, value)
os.environ.setdefault("AQUA_OFFLOAD_REMOTE_TOKEN", secrets.token_hex(32))

MiB = 1 << 20
CHUNK = 4 * MiB  # one tensor; also the lenders' segment (the largest block)


def start_far_lender(tmp: str, name: str = "far") -> tuple[subprocess.Popen, str]:
    """``python -m aqua_offload.remote`` (``aqua-offload lend``) in a child; its address."""
    import aqua_offload

    ready = os.path.join(tmp, f"{name}.json")
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(aqua_offload.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH",
                                                                                  "")]))
    proc = subprocess.Popen([sys.executable, "-m", "aqua_offload.remote", "--host-bytes",
                             "32MiB", "--segment", "4MiB", "--ready-file", ready], env=env,
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the far lender did not start")
        time.sleep(0.05)
    with open(ready) as f:
        return proc, json.load(f)["address"]


def where(handles: list) -> str:
    counts: dict[str, int] = {}
    for h in handles:
        label = f"{h.tier} {h.location}"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} on {label}" for label, n in counts.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=48, help="MiB to offload (4 MiB tensors)")
    args = parser.parse_args()

    import torch

    import aqua_offload as aq
    from aqua_offload.errors import RemoteLostError
    from aqua_offload.remote import Lender, nixl_unavailable

    why = nixl_unavailable()
    if why is not None:
        print(f"NIXL is not usable here ({why}); install aqua_offload[remote]")
        return 1
    device = "cuda:0" if aq._core.cuda_compiled() and torch.cuda.is_available() else "cpu"
    token = os.environ["AQUA_OFFLOAD_REMOTE_TOKEN"]
    with tempfile.TemporaryDirectory() as tmp, \
            Lender(token, host_bytes="16MiB", segment_bytes="4MiB") as near:
        far, far_address = start_far_lender(tmp)
        try:
            m = aq.OffloadManager(device, peers=None, host_bytes="16MiB",
                                  remote=[near.address, far_address], remote_deadline_s=3.0)
            print(f"{m} ({'emulation backend' if device == 'cpu' else 'CUDA'})")
            g = torch.Generator().manual_seed(0)
            ts = [torch.randint(1, 256, (CHUNK,), dtype=torch.uint8, generator=g).to(device)
                  for _ in range(args.mib * MiB // CHUNK)]
            refs = [t.clone() for t in ts]

            # 1. offload everything (the oldest spill to the lenders), fetch it back bitwise
            t0 = time.perf_counter()
            hs = [m.offload(t) for t in ts]
            m.synchronize()
            t_off = time.perf_counter() - t0
            print(f"offloaded {len(ts) * CHUNK // MiB} MiB: {where(hs)}")
            s = m.stats()["remote"]
            print(f"  {s['spilled_bytes'] / MiB:.0f} MiB spilled to lenders in {s['spills']} "
                  f"rounds; {len(ts) * CHUNK / t_off / 1e9:.2f} GB/s overall")
            t0 = time.perf_counter()
            back = m.fetch_many(hs)
            t_fetch = time.perf_counter() - t0
            assert all(x is t and torch.equal(t, r) for x, t, r in zip(back, ts, refs))
            s = m.stats()["remote"]
            print(f"fetched back bitwise: {len(ts) * CHUNK / t_fetch / 1e9:.2f} GB/s overall, "
                  f"{s['bytes_read'] / MiB:.0f} MiB of it read from lenders")

            # 2. the near lender takes its memory back: its tensors move, nothing is lost
            hs = [m.offload(t) for t in ts]
            on_near = [k for k, h in enumerate(hs) if h.location == near.address]
            host = [k for k, h in enumerate(hs) if h.tier == "host"]
            for k, x in zip(host, m.fetch_many([hs[k] for k in host])):  # room in the host tier
                assert torch.equal(x, refs[k])
            print(f"offloaded again: {where(hs)}; the near lender reclaims 16 MiB")
            ticket = near.reclaim(16 * MiB)
            if not ticket.wait(30):
                raise SystemExit("the reclaim did not complete")
            s = m.stats()["remote"]
            print(f"  reclaimed: {len(on_near)} tensors moved ({where([hs[k] for k in on_near])})"
                  f" in {s['reclaim_last_s'] * 1e3:.1f} ms; near lender arena now "
                  f"{near.stats()['arena_bytes'] // MiB} MiB")
            on_far = [k for k, h in enumerate(hs) if h.location == far_address]
            rest = [k for k in range(len(hs)) if k not in on_far and k not in host]
            for k, x in zip(rest, m.fetch_many([hs[k] for k in rest])):
                assert torch.equal(x, refs[k])
            print(f"  {len(rest)} tensors fetched back bitwise after the reclaim")

            # 3. the far lender dies: only its tensors are lost, with a typed error
            far.kill()
            far.wait(30)
            print(f"far lender killed with SIGKILL; it held {len(on_far)} tensors")
            t0 = time.perf_counter()
            try:
                m.fetch(hs[on_far[0]])
                raise SystemExit("a fetch from a dead lender succeeded?")
            except RemoteLostError as exc:
                print(f"  fetch: {type(exc).__name__} after {time.perf_counter() - t0:.2f} s: "
                      f"{exc}")
            s = m.stats()["remote"]
            print(f"  stats: {s['lost_handles']} handles ({s['lost_bytes'] // MiB} MiB) lost")
            t = torch.randint(1, 256, (CHUNK,), dtype=torch.uint8, generator=g).to(device)
            assert torch.equal(m.fetch(m.offload(t.clone())), t)
            print("  the other tiers keep working: a new offload/fetch round trip is bitwise")
            m.close()  # what the dead lender held stays discarded
            print("closed")

            # 4. two copies on two lenders: a lender killed with SIGKILL loses nothing
            near.grow(16 * MiB)  # the near lender lends again
            far, far_address = start_far_lender(tmp, "far2")
            m = aq.OffloadManager(device, peers=None, host_bytes="4MiB",
                                  remote=[near.address, far_address], remote_deadline_s=3.0,
                                  remote_copies=2)
            hs = m.offload_many(ts[:3])  # 12 MiB: more than the host tier, a copy on each
            print(f"remote_copies=2: offloaded {3 * CHUNK // MiB} MiB ({where(hs)}), a copy "
                  f"also on {far_address}")
            far.kill()
            far.wait(30)
            back = m.fetch_many(hs)
            assert all(x is t and torch.equal(t, r) for x, t, r in zip(back, ts, refs))
            s = m.stats()["remote"]
            print(f"  {far_address} killed with SIGKILL: fetched back bitwise, "
                  f"{s['lost_handles']} handles lost")
            m.close()
        finally:
            if far.poll() is None:
                far.kill()
            far.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
