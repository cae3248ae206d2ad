"""Cross-process lending: a producer lends device memory to a consumer, then takes some back.

Two processes, as in the AQUA setting where each GPU serves its own model:
  producer  a process whose (small) model leaves memory spare on its device: it offers it;
  consumer  an LLM process short of KV memory: ``OffloadManager(peers="lent")`` leases the
            offer and pages tensors into it, while the producer reclaims half of it mid-run.
The consumer's data survives (it migrates to the host tier before the memory is acknowledged)
and the timeline shows the reclaim latency on both sides.

Runs on a GPU machine (consumer on cuda:0, producer on cuda:1, or cuda:0 with one GPU) and
without one (emulation backend: consumer on "cpu", producer on emulated device emu:1).

    python examples/lending_two_processes.py [--mib 64] [--reclaim-mib 32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

MiB = 1 << 20


def log(t0: float, who: str, msg: str) -> None:
    # time.monotonic() is one clock for every process of the machine (Linux): one timeline.
    print(f"[{time.monotonic() - t0:8.3f} s] {who:<8} {msg}", flush=True)


def pick_devices() -> tuple[str, str]:
    import torch

    from aqua_offload import _core

    if _core.cuda_compiled() and torch.cuda.is_available():
        return "cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    return "cpu", "emu:1"


def producer(t0: float, device: str, nbytes: int, reclaim_bytes: int, events: dict, q) -> None:
    from aqua_offload import lending

    o = lending.offer(device, nbytes)
    log(t0, "producer", f"offered {nbytes // MiB} MiB of {o.device} (offer #{o.id})")
    if not events["filled"].wait(60):
        raise SystemExit("the consumer never filled its lent memory")
    time.sleep(0.2)  # the consumer keeps paging meanwhile: reclaim mid-run
    log(t0, "producer", f"load rises: reclaiming {reclaim_bytes // MiB} MiB")
    got = o.reclaim(reclaim_bytes, timeout=60)
    s = o.stats()
    log(t0, "producer", f"reclaimed {got // MiB} MiB in {s['reclaim_last_s'] * 1e3:.2f} ms "
                        f"({s['reclaim_last_consumers']} consumer(s) migrated "
                        f"{s['reclaim_last_asked'] // MiB} MiB off); still offered "
                        f"{s['offered'] // MiB} MiB, leased {s['leased'] // MiB} MiB")
    events["reclaimed"].set()
    events["verified"].wait(60)
    o.withdraw(timeout=60)
    log(t0, "producer", "withdrew the rest of the offer")
    q.put(("producer", s))


def consumer(t0: float, device: str, offered: int, tensor_bytes: int, events: dict, q) -> None:
    import torch

    import aqua_offload as aq

    m = aq.OffloadManager(device, peers="lent", host_bytes=f"{256 if device == 'cpu' else 4096}MiB")
    deadline = time.monotonic() + 60
    # The producer may start after us: its offer wakes our thread, which leases one segment
    # at a time. Wait for the whole offer, else the tensors fill only the first segments and
    # the reclaim takes back empty ones (nothing would migrate).
    while time.monotonic() < deadline:
        s = m.stats()["lending"]
        if s["leased_bytes"] >= offered or (s["leased_bytes"] and s["lease_failures"]):
            break
        time.sleep(0.01)
    leased = m.stats()["lending"]["leased"]
    log(t0, "consumer", f"leased {', '.join(f'{v // MiB} MiB on {k}' for k, v in leased.items())}")
    gen = torch.Generator().manual_seed(0)
    live: list[tuple[aq.Handle, torch.Tensor]] = []
    n = sum(leased.values()) // tensor_bytes
    i = 0
    while not events["reclaimed"].is_set() and time.monotonic() < deadline:
        # Random bytes, never zeros; the reference copy stays on the CPU.
        ref = torch.randint(1, 256, (tensor_bytes,), dtype=torch.uint8, generator=gen)
        live.append((m.offload(ref.to(device)), ref))
        if len(live) > n:  # churn: fetch the oldest back and check it
            h, r = live.pop(0)
            assert torch.equal(m.fetch(h).cpu(), r), "corrupted"
        i += 1
        if i == n:
            tiers = {h.tier for h, _ in live}
            log(t0, "consumer", f"{len(live)} tensors of {tensor_bytes // MiB} MiB paged out, "
                                f"tiers {sorted(tiers)}; still paging in and out")
            events["filled"].set()
    s = m.stats()["lending"]
    log(t0, "consumer", f"served the reclaim: returned {s['reclaim_last_freed'] // MiB} MiB, "
                        f"{s['reclaim_last_s'] * 1e3:.2f} ms from request to ack "
                        f"({s['reclaim_last_serve_s'] * 1e3:.2f} ms migrating)")
    tiers: dict[str, int] = {}
    for h, _ in live:
        tiers[h.tier] = tiers.get(h.tier, 0) + 1
    ok = sum(torch.equal(m.fetch(h).cpu(), r) for h, r in live)
    log(t0, "consumer", f"{i} offloads in all; the {len(live)} live tensors were on {tiers}; "
                        f"{ok}/{len(live)} fetched back bit-identical")
    events["verified"].set()
    q.put(("consumer", {"ok": ok, "live": len(live), "lending": s}))
    m.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB offered (default 64)")
    parser.add_argument("--reclaim-mib", type=int, default=32, help="MiB reclaimed (default 32)")
    parser.add_argument("--tensor-mib", type=int, default=1, help="size of each tensor")
    args = parser.parse_args(argv)
    tmp = None
    if not os.environ.get("AQUA_OFFLOAD_LEDGER"):  # a private ledger: never touch a real one
        tmp = tempfile.TemporaryDirectory(prefix="aqua-lending-")
        os.environ["AQUA_OFFLOAD_LEDGER"] = os.path.join(tmp.name, "ledger")
    # Leases in 8 MiB segments: a reclaim migrates at most one segment more than it asks.
    os.environ.setdefault("AQUA_OFFLOAD_LEASE_CHUNK", "8MiB")
    ctx = mp.get_context("spawn")
    cdev, pdev = pick_devices()
    print(f"consumer on {cdev}, producer lends {pdev}; ledger {os.environ['AQUA_OFFLOAD_LEDGER']}")
    events = {k: ctx.Event() for k in ("filled", "reclaimed", "verified")}
    q = ctx.Queue()
    t0 = time.monotonic()
    procs = [ctx.Process(target=consumer, args=(t0, cdev, args.mib * MiB, args.tensor_mib * MiB,
                                                events, q)),
             ctx.Process(target=producer, args=(t0, pdev, args.mib * MiB,
                                                args.reclaim_mib * MiB, events, q))]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            who, value = q.get(timeout=120)
            results[who] = value
    except Exception:  # noqa: BLE001 - a child died: report below
        pass
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    if tmp is not None:
        tmp.cleanup()
    c, pr = results.get("consumer"), results.get("producer")
    if not c or not pr or c["ok"] != c["live"] or any(p.exitcode for p in procs):
        print("FAILED", results, [p.exitcode for p in procs])
        return 1
    print(f"reclaim latency: {pr['reclaim_last_s'] * 1e3:.2f} ms (producer: request -> last "
          f"ack), {c['lending']['reclaim_last_s'] * 1e3:.2f} ms (consumer: request -> ack); "
          f"no byte lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
