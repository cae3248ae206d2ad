"""GPU smoke checks for aqua_offload: the races and leaks that unit tests tend to miss.

Each case moves random non-zero bytes through an ``OffloadManager`` and compares them bitwise
(``torch.equal`` on uint8 views) with a copy taken before the offload. The peer tier is
``cuda:1`` when there is a second GPU, else ``cuda:0`` itself (a same-device peer, which runs
the peer code path on one GPU).

Cases
-----
a  device memory and host RSS back at their baseline after ``close()``, a handle still alive.
b  an offload into the block a fetch just gave back, behind queued matmuls (widen the races).
c  prefetch on stream A, fetch on B; prefetch on A, free on B, then scribble new allocations.
d  ``offload_many(release=True)`` / ``fetch_many`` of mixed sizes (3 B .. 100 MiB) and dtypes.
e  child processes exiting with copies in flight (manager dropped or global) must exit 0.
f  a small demand fetch while 1 GiB is being offloaded vs idle (recorded only; target <= 2x).

Usage: ``python scripts/gpu_smoke.py [--out PATH] [--cases abcdef] [--quick] [--emulation]``.
``--emulation`` runs on ``device="cpu"`` (the emulation backend; no streams, no events): a (RSS
only), b, c, d, e. The JSON (``--out``, else ``$OUT/smoke.json``, else ``./smoke.json``) is
rewritten after every case, so a run killed midway still reports the cases that finished.
Exit status: 0 all passed, 1 a case failed, 2 no usable GPU (without ``--emulation``).
"""

import argparse
import contextlib
import faulthandler
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import traceback

import torch

import aqua_offload as aq
from aqua_offload import _core

MiB = 1 << 20
CUDA, DEV, PEER, QUICK = True, torch.device("cuda:0"), 0, False  # set by main()


def rand_bytes(n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``n`` random bytes in 1..255 (never zeros), viewed as ``dtype``; made on the current stream."""
    return torch.randint(1, 256, (n,), dtype=torch.uint8, device=DEV).view(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(flat(a), flat(b))


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def busy() -> None:
    """Queue a few matmuls on the current stream, so copies fenced against it start late and
    pile up together (the window in which a missing fence or an early reuse shows)."""
    if CUDA:
        x = torch.rand((1024, 1024) if QUICK else (2048, 2048), device=DEV)  # QUICK: sanitizer
        for _ in range(8):
            torch.mm(x, x, out=torch.empty_like(x))


def manager(peer: bool = True, peer_bytes: str = "256MiB", host_bytes: str = "256MiB"):
    return aq.OffloadManager(DEV, peers=[PEER] if peer else None, peer_bytes=peer_bytes,
                             host_bytes=host_bytes)


def settle() -> None:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def rss() -> int:
    with open("/proc/self/status") as f:  # kB
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def case_a(info: dict) -> None:
    devs = sorted({DEV.index or 0, PEER}) if CUDA else []
    # Warm up first: contexts, peer access and the core's one-time state never come back.
    with manager(peer_bytes="64MiB", host_bytes="64MiB") as m:  # and the kernels used below
        t = rand_bytes(MiB); r = t.clone()  # noqa: E702
        check(same(m.fetch(m.offload(t)), r), "warm-up fetch")
    settle()
    free0, rss0 = {d: torch.cuda.mem_get_info(d)[0] for d in devs}, rss()
    m = manager(peer_bytes="1GiB", host_bytes="1GiB")
    rss_open = rss()
    ts = [rand_bytes(n) for n in (4 * MiB, 64 * MiB, 200 * MiB)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t) for t in ts]
    snap = m.offload(refs[0], release=False)  # a live handle, still referenced after close
    check(same(m.fetch(hs[0]), refs[0]), "fetch before close")
    m.close()  # pages hs[1], hs[2] back in first
    check(same(ts[1], refs[1]) and same(ts[2], refs[2]), "close() restored the paged-out tensors")
    del ts, refs
    settle()
    free1, rss1 = {d: torch.cuda.mem_get_info(d)[0] for d in devs}, rss()
    info.update(rss_before_mib=rss0 / MiB, rss_open_mib=rss_open / MiB, rss_after_mib=rss1 / MiB,
                free_before_mib={d: v / MiB for d, v in free0.items()},
                free_after_mib={d: v / MiB for d, v in free1.items()}, handle_alive=snap is not None)
    for d in devs:
        check(free1[d] >= free0[d] - 64 * MiB, f"cuda:{d}: {(free0[d] - free1[d]) / MiB:.0f} MiB "
              "not given back after close()")
    check(rss1 <= rss0 + 64 * MiB, f"RSS {(rss1 - rss0) / MiB:.0f} MiB above its baseline after close()")


def case_b(info: dict) -> None:
    gen, iters = random.Random(1), (8 if QUICK else 25)
    tiers = info.setdefault("tiers", {})
    info["iterations"] = 2 * iters
    for peer in (True, False):  # the peer pool, then the pinned host pool
        with manager(peer=peer) as m:
            for i in range(iters):
                n = gen.randint(MiB, 64 * MiB)
                if i % 3:  # mostly behind queued work; sometimes not, for other timings
                    busy()
                a = rand_bytes(n); ra = a.clone()  # noqa: E702
                ha = m.offload(a)
                a = m.fetch(ha)
                b = rand_bytes(n); rb = b.clone()  # noqa: E702
                hb = m.offload(b)  # lands in the block ha's fetch just gave back
                b = m.fetch(hb)
                tiers[hb.tier] = tiers.get(hb.tier, 0) + 1
                check(same(a, ra), f"A corrupted (iteration {i}, {n} B, {ha.tier})")
                check(same(b, rb), f"B corrupted (iteration {i}, {n} B, {hb.tier})")


def case_c(info: dict) -> None:
    sa, sb = (torch.cuda.Stream(DEV), torch.cuda.Stream(DEV)) if CUDA else (None, None)
    on = (lambda s: torch.cuda.stream(s)) if CUDA else (lambda s: contextlib.nullcontext())
    reps = 3 if QUICK else 8
    info.update(reps=2 * reps, streams=CUDA)
    for peer in (True, False):
        with manager(peer=peer) as m:
            for i in range(reps):
                n = (i + 1) * 7 * MiB + i
                with on(sa):  # prefetch on A, fetch on B
                    x = rand_bytes(n); rx = x.clone()  # noqa: E702
                    h = m.offload(x, release=i % 2 == 0)
                    busy()
                    m.prefetch(h)
                with on(sb):
                    y = m.fetch(h)
                    if CUDA:
                        sb.wait_stream(sa)  # for rx only: queued after the fetch, orders nothing in it
                    check(same(y, rx), f"prefetch on A, fetch on B: corrupted (rep {i}, {h.tier})")
                with on(sa):  # prefetch on A, free on B
                    x = rand_bytes(n)
                    h = m.offload(x)
                    tier = h.tier
                    busy()
                    m.prefetch(h)
                del x  # paged out, and its data is dropped by the free below: never touch it
                with on(sb):
                    m.free(h)
                    junk_b = torch.full((n,), 0x5A, dtype=torch.uint8, device=DEV)
                with on(sa):  # A's pool gave the prefetch buffer: a new block here may be it
                    junk_a = torch.full((n,), 0xA5, dtype=torch.uint8, device=DEV)
                    z = rand_bytes(n); rz = z.clone()  # noqa: E702
                    z = m.fetch(m.offload(z))  # may take the tier block the free gave back
                settle()
                check(bool((junk_a == 0xA5).all()) and bool((junk_b == 0x5A).all()),
                      f"memory allocated after free() was overwritten (rep {i}, {tier})")
                check(same(z, rz), f"offload after a free of a prefetched handle (rep {i})")


def case_d(info: dict) -> None:
    spec = [(4096, torch.float32), (MiB, torch.bfloat16), (40 * MiB, torch.int64),
            (100 * MiB, torch.float16), (3, torch.uint8)]
    placed = info.setdefault("tiers", [])
    for peer_bytes in ("1GiB", "16MiB"):  # all in the peer tier; then the big ones in the host
        with manager(peer_bytes=peer_bytes, host_bytes="1GiB" if CUDA else "256MiB") as m:
            busy()
            ts = [rand_bytes(n, dt) for n, dt in spec]
            refs = [t.clone() for t in ts]
            hs = m.offload_many(ts, release=True)
            check(all(aq.is_offloaded(t) for t in ts), "offload_many left a tensor resident")
            placed.append([h.tier for h in hs])
            back = m.fetch_many(hs)
            check(all(b is t for b, t in zip(back, ts)), "fetch_many returned new tensor objects")
            bad = [n for (n, _), t, r in zip(spec, back, refs) if not same(t, r)]
            check(not bad, f"corrupted sizes {bad} (peer_bytes={peer_bytes}, tiers {placed[-1]})")


CHILD = """
import sys, torch, aqua_offload as aq
dev, peer, n, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def start():
    m = aq.OffloadManager(dev, peers=[peer], peer_bytes=2 * n, host_bytes=2 * n)
    ts = [torch.randint(1, 256, (n,), dtype=torch.uint8, device=dev) for _ in range(3)]
    return m, ts, [m.offload(ts[0]), m.offload(ts[1]), m.offload(ts[2], release=False)]
if variant.startswith("global"):
    KEEP = start()  # referenced from a global until the interpreter exits
else:
    start()  # the manager is dropped at once, its copies still in flight
if variant.endswith("sys_exit"):
    sys.exit(0)
"""


def case_e(info: dict) -> None:
    n = (256 if CUDA else 32) * MiB
    variants = ["dropped_sys_exit", "dropped_end", "global_sys_exit", "global_end"]
    procs = {v: subprocess.Popen([sys.executable, "-c", CHILD, str(DEV), str(PEER), str(n), v],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for v in variants}  # in parallel: each is mostly interpreter and CUDA start-up
    bad = []
    for v, p in procs.items():
        try:
            text, rc = p.communicate(timeout=60)[0], p.returncode
        except subprocess.TimeoutExpired:  # a hang at exit: the bug this case is after
            p.kill()
            text, rc = p.communicate()[0], "timeout"
        info[v] = {"rc": rc, "output_tail": text[-800:]}
        bad += [f"{v}: rc {rc}"] if rc != 0 else []
    check(not bad, "; ".join(bad))


def case_f(info: dict) -> None:
    if not CUDA:
        raise NotImplementedError("needs CUDA events")
    reps = 3 if QUICK else 5
    for peer in (True, False):
        with manager(peer=peer, peer_bytes="2GiB", host_bytes="2GiB") as m:
            small = rand_bytes(MiB)
            hs = m.offload(small, release=False)
            m.synchronize()

            def timed_fetch() -> float:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                y = m.fetch(hs, keep=True)
                e1.record()
                e1.synchronize()
                check(same(y, small), "small fetch corrupted")
                return e0.elapsed_time(e1)

            idle, loaded = [], []
            for r in range(reps):
                idle.append(timed_fetch())
                big = rand_bytes(1 << 30)
                rbig = big.clone() if r == 0 else None
                torch.cuda.synchronize()  # big is ready: its copy starts at once
                hb = m.offload(big)
                loaded.append(timed_fetch())
                if rbig is None:
                    m.free(hb)
                else:
                    check(same(m.fetch(hb), rbig), "the 1 GiB offload came back corrupted")
                del big, rbig
                m.synchronize()
            i, b = statistics.median(idle), statistics.median(loaded)
            info["peer" if peer else "host"] = {"idle_ms": i, "during_1GiB_offload_ms": b,
                                                "ratio": b / i, "target_ratio": 2.0}


CASES = {"a": ("memory_after_close", case_a), "b": ("block_reuse_after_fetch", case_b),
         "c": ("prefetch_across_streams", case_c), "d": ("offload_many_mixed_sizes", case_d),
         "e": ("exit_with_copies_in_flight", case_e), "f": ("demand_fetch_latency", case_f)}


def main(argv: list[str] | None = None) -> int:
    global CUDA, DEV, PEER, QUICK
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "smoke.json"))
    ap.add_argument("--cases", default="abcdef", help="letters of the cases to run")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (e.g. under a sanitizer)")
    ap.add_argument("--emulation", action="store_true", help='run on device="cpu" (emulation)')
    args = ap.parse_args(argv)
    QUICK = args.quick
    if args.emulation:
        CUDA, DEV, PEER = False, torch.device("cpu"), 1
    elif not (_core.cuda_compiled() and torch.cuda.is_available()):
        print(f"no usable GPU: cuda_compiled={_core.cuda_compiled()}, torch.cuda.is_available()="
              f"{torch.cuda.is_available()}; use --emulation to run on the CPU", file=sys.stderr)
        return 2
    else:
        PEER = 1 if torch.cuda.device_count() > 1 else 0
    report = {"backend": "cuda" if CUDA else "emulation", "device": str(DEV), "peer": PEER,
              "device_name": torch.cuda.get_device_name(DEV) if CUDA else "cpu",
              "torch": torch.__version__, "aqua_offload": aq.__file__, "quick": QUICK, "cases": {}}

    def dump() -> None:  # after every step: a killed run still leaves what it did
        report["ok"] = all(c["status"] in ("PASS", "SKIP") for c in report["cases"].values())
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(args.out + ".tmp", args.out)

    # On a hang the caller's `timeout` sends SIGTERM: print every thread's stack first.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    for letter in args.cases:
        name, fn = CASES[letter]
        t0, entry = time.perf_counter(), {"status": "PASS"}
        report["cases"][f"{letter}_{name}"] = {"status": "RUNNING"}  # what a hang leaves
        dump()
        try:
            fn(entry)  # fills in what it measured, also when it fails halfway
        except NotImplementedError as exc:
            entry.update(status="SKIP", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 -- every case runs, each failure is recorded
            entry.update(status="FAIL", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc()[-2000:])
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report["cases"][f"{letter}_{name}"] = entry
        print(f"{letter}_{name:28s} {entry['status']:4s} {entry['seconds']:6.1f}s "
              f"{entry.get('error', entry.get('reason', ''))}", flush=True)
        settle()
        dump()
    failed = [k for k, v in report["cases"].items() if v["status"] == "FAIL"]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all passed'}; results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
