"""Remote transfers: the borrower's RemoteClient writes and reads vs the raw NIXL
transfer of the same bytes vs a plain memcpy, on a loopback lender in a child process.

For each size, the client's ``write``/``read`` of one item (checks, one NIXL request, post,
poll under its deadline) is timed against the raw NIXL path on the same agent and the same
registered memory: one request created once and reposted, polled in a tight loop (what an
application driving NIXL by hand gets at best). A batch of scattered 4 KiB items is compared
the same way. memcpy is a single-threaded numpy copy of the same bytes between two host
buffers (row by row for the batch). Every sample
is the median of ``samples`` (>= 3) batches of repeats; the bytes are verified after timing.
Host timers (``time.perf_counter``): every buffer is in host memory.

Manager rows (``manager_rows``): an ``OffloadManager(remote=[lender])`` whose host tier is a
single 256-byte block, so every tensor goes to the lender, offloads and fetches one tensor of
each size, and ``offload_many``/``fetch_many`` the 1000 x 4 KiB batch (also into the host tier
of a manager without a lender: what the manager itself costs). Each round trip is followed by
the raw NIXL write and read of the same bytes (one item, or the batch scattered) on a client
of its own, so the ratio ``vs_raw`` (median manager call over median raw transfer) compares
timings taken under the same load. Two modes: ``release`` pages the storage out, and its
fetch includes what a release fetch does (fresh memory for the bytes, whose first touch
page-faults on the host), so a single tensor's release fetch is also timed against the raw
read into memory allocated and registered for it (``vs_raw_fresh``: what paging in by hand
costs, the same fresh memory); ``snapshot`` offloads with ``release=False`` and fetches into
``out=`` tensors made once, like the raw buffers: the library's own cost. Every call is
timed alone: ``median_s`` is the median call (``min_s``/``max_s`` likewise), ``mean_s`` the
mean, which includes the pauses of Python's cyclic garbage collector (a full collection lands
on some batch calls: 1000 handles are thousands of objects).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..sizes import format_size
from .measure import VerificationError, random_bytes

__all__ = ["run_remote_benchmark", "check_lender", "sizes_for", "format_remote_table", "DEFAULT_SIZES",
           "QUICK_SIZES"]

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = (4 * KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB)
QUICK_SIZES = (4 * KiB, MiB, 16 * MiB)
BATCH_ITEMS, BATCH_ITEM = 1000, 4 * KiB
MODES = ("release", "snapshot")
START_TIMEOUT_S = 60.0
STAGING_SLACK = 16 * MiB  # what the manager rows hold at the lender besides the sizes


def _repeats(nbytes: int) -> int:
    return max(1, min(200, (32 * MiB) // nbytes))


def _time(fn: Callable[[], None], repeats: int, samples: int) -> list[float]:
    fn()  # warm-up (connection setup, page faults)
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out.append((time.perf_counter() - t0) / repeats)
    return out


def _stat(times: list[float], nbytes: int) -> dict[str, float]:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "GBps": nbytes / med / 1e9}


class _Raw:
    """The raw NIXL path: one request over fixed descriptors, created once, reposted."""

    def __init__(self, client: Any, op: str, local: np.ndarray, remote: np.ndarray) -> None:
        agent = client._agent
        self.b, self.a = agent._b, agent._agent
        opcode = self.b.NIXL_WRITE if op == "WRITE" else self.b.NIXL_READ
        self.remote = remote
        self.h = self.a.createXferReq(opcode, self.b.nixlXferDList(self.b.DRAM_SEG, local),
                                      self.b.nixlXferDList(self.b.DRAM_SEG, remote),
                                      client._peer, "", [agent._backend])

    def __call__(self) -> None:
        s = self.a.postXferReq(self.h)
        while s == self.b.NIXL_IN_PROG:
            s = self.a.getXferStatus(self.h)
        if s != self.b.NIXL_SUCCESS:
            raise VerificationError(f"raw NIXL transfer failed: {s}")

    def close(self) -> None:
        self.a.releaseXferReq(self.h)


def _start_lender(nbytes: int, segment: int, token: str, tls: str | None,
                  tmp: Path) -> tuple[subprocess.Popen, str]:
    ready = tmp / "ready.json"
    env = dict(os.environ, AQUA_OFFLOAD_REMOTE_TOKEN=token,
               PYTHONPATH=os.pathsep.join(sys.path))
    if tls:
        env["UCX_TLS"] = tls
    proc = subprocess.Popen([sys.executable, "-m", "aqua_offload.remote", "--host-bytes",
                             str(nbytes), "--segment", str(segment), "--ready-file", str(ready)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark's lender did not start")
            time.sleep(0.05)
        return proc, json.loads(ready.read_text())["address"]
    except BaseException:  # Ctrl-C too: the child must not outlive the benchmark
        proc.kill()
        proc.wait()
        raise


def sizes_for(sizes: list[int] | None, quick: bool) -> list[int]:
    """The sizes a run measures: those given, else the quick or the default ones; sorted."""
    return sorted(sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))


def run_remote_benchmark(sizes: list[int] | None = None, *, quick: bool = False,
                         samples: int = 5, tls: str | None = None,
                         lender: str | None = None, token: bytes | str | None = None,
                         progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure; see the module docstring. Needs NIXL (the ``remote`` extra).

    ``lender``: a running lender's ``"host:port"`` (e.g. on another node) to measure against,
    with its ``token``, instead of a child process on loopback. Its segment must hold the
    largest size and its arena about two of them (:func:`check_lender`); ``tls`` then sets
    this side's transports only (the lender's are its own)."""
    from ..remote import nixl_unavailable
    from ..sysinfo import info

    reason = nixl_unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    sizes = sizes_for(sizes, quick)
    segment = max(64 * MiB, ((max(sizes) + MiB - 1) // MiB) * MiB)
    old_tls = os.environ.get("UCX_TLS")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="aqua-bench-remote-") as tmp:
        proc = None
        if lender is None:
            token = secrets.token_hex(32)
            proc, address = _start_lender(4 * segment, segment, token, tls, Path(tmp))
        else:
            address = lender
        try:
            if tls:
                os.environ["UCX_TLS"] = tls  # this side's agent uses the same transports
            client = check_lender(address, token, sizes)
            try:
                for n in sizes:
                    if progress:
                        progress(format_size(n))
                    rows += _size_rows(client, n, samples)
                if progress:
                    progress("batch")
                rows += _batch_rows(client, samples)
            finally:
                client.close()
            if progress:
                progress("manager")
            manager_rows = _manager_rows(address, token, sizes, samples)
        finally:
            if tls:
                if old_tls is None:
                    os.environ.pop("UCX_TLS", None)
                else:
                    os.environ["UCX_TLS"] = old_tls
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    data = info()
    where = f"child process on loopback ({address})" if proc is not None else address
    return {"benchmark": "remote", "lender": where,
            "transports": tls or "UCX default", "samples": samples,
            "machine": {"host": f"{platform.machine() or 'cpu'} CPU x{os.cpu_count()}",
                        "platform": platform.platform(), **data["versions"]},
            "rows": rows, "manager_rows": manager_rows}


def check_lender(address: str, token: bytes | str | None, sizes: list[int]) -> Any:
    """A client of the lender at ``address``, once it is known to hold what the benchmark
    allocates at once: a block of the largest size (its segment) and about two of them with
    the batch's block beside (its arena).

    Raises
    ------
    InvalidArgumentError
        The lender is too small; also a malformed address or no token.
    RemoteError
        Cannot connect, or the tokens differ.
    """
    from ..errors import InvalidArgumentError
    from ..remote import RemoteClient

    client = RemoteClient(address, token, deadline_s=60.0)
    largest = max(max(sizes), 2 * BATCH_ITEMS * BATCH_ITEM)
    # at most two blocks of a size at once (the manager's handle and the raw pair's; measured
    # peak: 32 MiB for --sizes 16MiB), the batch's block beside, and the manager's slabs
    need = 2 * max(sizes) + 2 * BATCH_ITEMS * BATCH_ITEM + STAGING_SLACK
    segment, arena = int(client.lender["segment_bytes"]), int(client.lender["arena_bytes"])
    if segment < largest or arena < need:
        client.close()
        raise InvalidArgumentError(
            f"the lender at {address} lends {format_size(arena)} in segments of "
            f"{format_size(segment)}; these sizes need segments of at least "
            f"{format_size(largest)} and {format_size(need)} in all")
    return client


def _size_rows(client: Any, n: int, samples: int) -> list[dict[str, Any]]:
    src, out = random_bytes(n, seed=n % 9973), torch.empty(n, dtype=torch.uint8)
    rs, ro = client.register(src), client.register(out)
    (blk,) = client.allocate([n])
    reps = _repeats(n)
    loc_s = np.array([(src.data_ptr(), n, 0)], dtype=np.uint64)
    loc_o = np.array([(out.data_ptr(), n, 0)], dtype=np.uint64)
    rem = np.array([(blk.addr, n, client.lender["device"])], dtype=np.uint64)
    rows = []
    try:
        for op, raw_local in (("write", loc_s), ("read", loc_o)):
            out.fill_(0)
            item = [(rs, blk, 0, n)] if op == "write" else [(ro, blk, 0, n)]
            fn = client.write if op == "write" else client.read
            t_client = _time(lambda: fn(item), reps, samples)
            raw = _Raw(client, op.upper(), raw_local, rem)
            try:
                t_raw = _time(raw, reps, samples)
            finally:
                raw.close()
            if op == "read" and not torch.equal(out, src):
                raise VerificationError(f"remote round trip of {n} bytes: wrong bytes")
            s_np, o_np = src.numpy(), out.numpy()
            t_mem = _time(lambda: np.copyto(o_np, s_np), reps, samples)
            rows.append(_row(op, n, 1, t_client, t_raw, t_mem))
    finally:
        client.free([blk])
        client.unregister(rs)
        client.unregister(ro)
    return rows


def _batch_rows(client: Any, samples: int) -> list[dict[str, Any]]:
    n, size = BATCH_ITEMS, BATCH_ITEM
    stride = 2 * size
    src, out = random_bytes(n * size, seed=77), torch.empty(n * size, dtype=torch.uint8)
    rs, ro = client.register(src), client.register(out)
    (blk,) = client.allocate([n * stride])
    perm = np.random.default_rng(5).permutation(n)
    rows = []
    try:
        for op, region, t in (("write", rs, src), ("read", ro, out)):
            items = [((region, i * size), blk, int(perm[i]) * stride, size) for i in range(n)]
            fn = client.write if op == "write" else client.read
            out.fill_(0)
            t_client = _time(lambda: fn(items), 3, samples)
            local = np.array([(t.data_ptr() + i * size, size, 0) for i in range(n)],
                             dtype=np.uint64)
            remote = np.array([(blk.addr + int(perm[i]) * stride, size, 0) for i in range(n)],
                              dtype=np.uint64)
            raw = _Raw(client, op.upper(), local, remote)
            try:
                t_raw = _time(raw, 3, samples)
            finally:
                raw.close()
            if op == "read" and not torch.equal(out, src):
                raise VerificationError("remote batch round trip: wrong bytes")
            so, oo = src.numpy().reshape(n, size), out.numpy().reshape(n, size)
            idx = perm  # the same scatter as the transfers, one row at a time
            t_mem = _time(lambda: [np.copyto(oo[i], so[i]) for i in idx], 3, samples)
            rows.append(_row(op, n * size, n, t_client, t_raw, t_mem))
    finally:
        client.free([blk])
        client.unregister(rs)
        client.unregister(ro)
    return rows


class _RawPair:
    """A raw NIXL write and read (:class:`_Raw`) of ``n`` bytes in ``items`` pieces (one
    item, or the batch scattered as in :func:`_batch_rows`) on a client of its own: the
    baseline the manager rows are timed against, one of each after every manager round
    trip."""

    def __init__(self, client: Any, n: int, items: int) -> None:
        self.client = client
        self.src = random_bytes(n, seed=n % 9901 + items)
        self.out = torch.empty(n, dtype=torch.uint8)
        self.regions = [client.register(self.src), client.register(self.out)]
        size = n // items
        stride = size if items == 1 else 2 * size
        (self.blk,) = client.allocate([items * stride])
        perm = np.arange(items) if items == 1 else np.random.default_rng(5).permutation(items)
        dev = client.lender["device"]
        remote = np.array([(self.blk.addr + int(perm[i]) * stride, size, dev)
                           for i in range(items)], dtype=np.uint64)
        local = [np.array([(t.data_ptr() + i * size, size, 0) for i in range(items)],
                          dtype=np.uint64) for t in (self.src, self.out)]
        self.write = _Raw(client, "WRITE", local[0], remote)
        self.read = _Raw(client, "READ", local[1], remote)

    def check(self) -> None:
        if not torch.equal(self.out, self.src):
            raise VerificationError("raw NIXL round trip: wrong bytes")

    def read_fresh(self) -> float:
        """The raw read of one item into memory allocated for it: what paging in by hand
        costs (allocate, register, one request, deregister), the baseline of a release fetch,
        which must give the storage fresh memory too. Returns its time; verified after it."""
        t0 = time.perf_counter()
        out = torch.empty_like(self.out)
        region = self.client.register(out)
        try:
            local = np.array([(out.data_ptr(), out.nbytes, 0)], dtype=np.uint64)
            raw = _Raw(self.client, "READ", local, self.read.remote)
            try:
                raw()
            finally:
                raw.close()
        finally:
            self.client.unregister(region)
        elapsed = time.perf_counter() - t0
        if not torch.equal(out, self.src):
            raise VerificationError("raw NIXL read into fresh memory: wrong bytes")
        return elapsed

    def close(self) -> None:
        self.write.close()
        self.read.close()
        self.client.free([self.blk])
        for r in self.regions:
            self.client.unregister(r)


def _manager_rows(address: str, token: str, sizes: list[int], samples: int) -> list[dict[str, Any]]:
    """The manager's offload/fetch of single tensors and of the batch (module docstring)."""
    from ..manager import OffloadManager
    from ..remote import RemoteClient

    client = RemoteClient(address, token, deadline_s=60.0)
    m = OffloadManager("cpu", peers=None, host_bytes=256, remote=[address],
                       remote_token=token, remote_deadline_s=60.0)
    rows = []
    try:
        for n in sizes:
            t = random_bytes(n, seed=n % 9967).clone()  # owned by torch alone: pageable
            raw = _RawPair(client, n, 1)
            try:
                for mode in MODES:
                    times = _time_round_trips(m, [t], _repeats(n), samples, "remote", mode, raw)
                    rows += _manager_pair(n, 1, times, "remote", mode)
            finally:
                raw.close()
        n, size = BATCH_ITEMS, BATCH_ITEM
        ts = [x.clone() for x in random_bytes(n * size, seed=78).split(size)]
        raw = _RawPair(client, n * size, n)
        try:
            for tier in ("remote", "host"):
                if tier == "host":
                    m.close()
                    m = OffloadManager("cpu", peers=None, host_bytes=2 * n * size)
                for mode in MODES:
                    times = _time_round_trips(m, ts, 3, samples, tier, mode, raw)
                    rows += _manager_pair(n * size, n, times, tier, mode)
        finally:
            raw.close()
    finally:
        m.close()
        client.close()
    return rows


def _time_round_trips(m: Any, ts: list[torch.Tensor], repeats: int, samples: int, tier: str,
                      mode: str, raw: _RawPair) -> tuple[list[float], ...]:
    """The offload and fetch time of each of ``samples * repeats`` round trips of ``ts``
    (``offload``/``fetch`` for one tensor, ``offload_many``/``fetch_many`` for more), in
    ``mode`` "release" (the storage paged out; fetch restores it into fresh memory) or
    "snapshot" (``release=False``; fetched into ``out=`` tensors made once), each followed by
    the raw write and read of the same bytes (so both see the same machine). The bytes are
    verified after every round trip."""
    refs = [t.clone() for t in ts]
    release = mode == "release"
    outs = None if release else [torch.empty_like(t).fill_(1) for t in ts]  # touched once

    fresh = release and len(ts) == 1  # (a batch's small storages come warm from the heap)

    def trip() -> tuple[float, ...]:
        t0 = time.perf_counter()
        hs = ([m.offload(ts[0], release)] if len(ts) == 1
              else m.offload_many(ts, release))
        t1 = time.perf_counter()
        if any(h.tier != tier for h in hs):  # (a core lookup per handle: not the fetch's)
            raise VerificationError(f"a manager benchmark tensor did not go to the {tier} tier")
        t1b = time.perf_counter()
        if len(hs) == 1:
            m.fetch(hs[0], outs[0] if outs else None)
        else:
            m.fetch_many(hs, outs)
        t2 = time.perf_counter()
        if not all(torch.equal(a, b) for a, b in zip(outs or ts, refs)):
            raise VerificationError(f"manager round trip ({mode}, {tier}): wrong bytes")
        if outs:
            for o in outs:
                o[0] ^= 1  # the next fetch must write every byte again (checked above)
        raw.out[0] ^= 1
        t3 = time.perf_counter()
        raw.write()
        t4 = time.perf_counter()
        raw.read()
        t5 = time.perf_counter()
        raw.check()
        if not fresh:
            return t1 - t0, t2 - t1b, t4 - t3, t5 - t4
        return t1 - t0, t2 - t1b, t4 - t3, t5 - t4, raw.read_fresh()

    trip()  # warm-up
    got = [trip() for _ in range(samples * repeats)]
    return tuple(list(x) for x in zip(*got))


def _manager_pair(nbytes: int, items: int, times: tuple[list[float], ...], tier: str,
                  mode: str) -> list[dict[str, Any]]:
    out = []
    for op, t, r in (("offload", times[0], times[2]), ("fetch", times[1], times[3])):
        s, rs = _stat(t, nbytes), _stat(r, nbytes)
        s["mean_s"] = statistics.fmean(t)
        out.append({"op": op, "mode": mode, "tier": tier, "bytes": nbytes, "items": items,
                    "manager": s, "raw_nixl": rs, "vs_raw": s["median_s"] / rs["median_s"]})
    if len(times) > 4:  # a release fetch against the raw read into fresh memory too
        fresh = _stat(times[4], nbytes)
        out[1]["raw_fresh"] = fresh
        out[1]["vs_raw_fresh"] = out[1]["manager"]["median_s"] / fresh["median_s"]
    return out


def _row(op: str, nbytes: int, items: int, t_client: list[float], t_raw: list[float],
         t_mem: list[float]) -> dict[str, Any]:
    c, r, m = _stat(t_client, nbytes), _stat(t_raw, nbytes), _stat(t_mem, nbytes)
    return {"op": op, "bytes": nbytes, "items": items, "client": c, "raw_nixl": r,
            "memcpy": m, "client_vs_raw": r["median_s"] / c["median_s"]}


def format_remote_table(result: dict[str, Any]) -> str:
    """The rows as a text table."""
    out = [f"remote transfers: client vs raw NIXL vs memcpy; lender {result['lender']}, "
           f"transports {result['transports']}, median of {result['samples']}",
           f"{'op':<6}{'size':>12}{'items':>7}{'client GB/s':>13}{'raw GB/s':>10}"
           f"{'memcpy GB/s':>13}{'client us':>11}{'raw us':>9}{'client/raw':>12}"]
    for r in result["rows"]:
        out.append(f"{r['op']:<6}{format_size(r['bytes']):>12}{r['items']:>7}"
                   f"{r['client']['GBps']:>13.2f}{r['raw_nixl']['GBps']:>10.2f}"
                   f"{r['memcpy']['GBps']:>13.2f}{r['client']['median_s'] * 1e6:>11.1f}"
                   f"{r['raw_nixl']['median_s'] * 1e6:>9.1f}{r['client_vs_raw']:>12.2f}")
    out.append("client/raw: raw time over client time (1.00 = the client adds nothing)")
    if result.get("manager_rows"):
        out += ["", "OffloadManager(remote=...): offload / fetch, vs the raw NIXL write / read "
                "of the same bytes, timed after each round trip",
                f"{'op':<8}{'mode':<9}{'tier':<7}{'size':>12}{'items':>7}{'manager GB/s':>14}"
                f"{'raw GB/s':>10}{'manager us':>12}{'mean us':>10}{'raw us':>9}{'vs raw':>8}"
                f"{'vs fresh':>10}"]
        for r in result["manager_rows"]:
            raw = r["raw_nixl"] or {"GBps": float("nan"), "median_s": float("nan")}
            ratio = f"{r['vs_raw']:.2f}x" if r["vs_raw"] is not None else "-"
            out.append(f"{r['op']:<8}{r.get('mode', 'release'):<9}{r['tier']:<7}"
                       f"{format_size(r['bytes']):>12}{r['items']:>7}"
                       f"{r['manager']['GBps']:>14.2f}{raw['GBps']:>10.2f}"
                       f"{r['manager']['median_s'] * 1e6:>12.1f}"
                       f"{r['manager']['mean_s'] * 1e6:>10.1f}{raw['median_s'] * 1e6:>9.1f}"
                       f"{ratio:>8}"
                       + (f"{r['vs_raw_fresh']:>9.2f}x" if "vs_raw_fresh" in r else ""))
        out.append("vs raw: median manager call over raw time (1.00x = the manager adds "
                   "nothing); mean: with the garbage collector's pauses. release: the storage "
                   "is paged out and fetched into fresh memory (first-touch page faults "
                   "included); snapshot: release=False, fetched into out= tensors made once. "
                   "vs fresh: a release fetch over the raw read into memory allocated and "
                   "registered for it (what paging in by hand costs: the same fresh memory)")
    return "\n".join(out)
