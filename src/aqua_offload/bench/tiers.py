"""Tier benchmarks: batched small transfers and reclaim of live data.

- ``batch``: ``offload_many`` + ``fetch_many`` of ``count`` tensors of ``size`` each (default
  64 x 64 KiB) against offload + fetch of one tensor of the same total bytes (4 MiB), same
  tier, same run, on each tier: ``peer`` (on one GPU a same-device peer: its copies cost
  almost nothing, so that row measures host time alone) and ``host`` (pinned host memory:
  the link). Target (DESIGN.md section 9): batch time <= 1.5x the single copy, i.e. a ratio
  (single median / batch median) >= 0.67. What users do today is measured beside it: torch's
  ``copy_(non_blocking=True)`` of the same pieces into and back from preallocated memory of
  that tier's kind, one 4 MiB tensor against the ``count`` pieces.
- ``bookkeeping``: ``offload_many`` + ``fetch_many`` of ``n`` tiny (256 B) snapshots, per
  handle, at 2k and at 64k live handles (16k and 2k with ``quick``), host time (the cost
  measured is the bookkeeping, not the copies; the cyclic GC is paused while timing, as
  timeit does). Target (DESIGN.md section 9): the per-handle
  cost at the larger count within 1.5x of that at the smaller, i.e. a ratio >= 0.67.
- ``reclaim``: a peer segment of ``reclaim_bytes`` (default 1 GiB, 64 MiB with ``quick``) is
  lent and filled with live handles, then reclaimed (every handle migrates to the host tier),
  against the raw copy of the same bytes to host memory (``raw_memcpy`` D2H on CUDA, one numpy
  copy on emulation). Each sample re-lends and re-fills; the fill is not timed.

Rows follow the copy benchmark's schema (``method``, ``direction``, ``bytes``, ``median_s``,
``min_s``, ``max_s``, ``gbps``, ``baseline``, ``ratio`` = baseline median / median,
``device``, ``backend``). Data is random and verified bitwise after timing.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from ..manager import OffloadManager
from .measure import (EMULATION_LABEL, VerificationError, cuda_timer, host_timer, random_bytes,
                      row)
from .models import bench_device, device_label

__all__ = ["run_tier_benchmark", "format_tier_table", "copy_path"]


def _source(n: int, seed: int, device: torch.device) -> torch.Tensor:
    return random_bytes(n, seed).to(device)


def _batch_rows(m: OffloadManager, tier: str, label: str, count: int, size: int, samples: int,
                timer: Callable[[Callable[[], None]], float], device: str,
                backend: str) -> list[dict[str, Any]]:
    """The batch experiment on ``tier`` (``m`` places there first), named ``label`` in rows."""
    small = [_source(size, 1000 + i, m.device) for i in range(count)]
    one = _source(count * size, 7, m.device)
    # Preallocated destinations: the allocator's page faults are not what is measured here.
    one_out = torch.empty_like(one)
    small_out = [torch.empty_like(t) for t in small]
    # torch's round trip through memory of the tier's kind (what users do by hand)
    away_one, away_small = _away(one, tier, m), [_away(t, tier, m) for t in small]
    result: dict[str, Any] = {}

    def single() -> None:
        result["one"] = m.fetch(m.offload(one, release=False), out=one_out)

    def batch() -> None:
        result["many"] = m.fetch_many(m.offload_many(small, release=False), outs=small_out)

    def torch_single() -> None:
        away_one.copy_(one, non_blocking=True)
        one_out.copy_(away_one, non_blocking=True)

    def torch_batch() -> None:
        for t, a, o in zip(small, away_small, small_out):
            a.copy_(t, non_blocking=True)
            o.copy_(a, non_blocking=True)

    cases = (("single", single), ("batch", batch), ("torch_single", torch_single),
             ("torch_batch", torch_batch))
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    before = m.stats()
    for i in range(samples + 1):  # the first round warms up
        for name, fn in cases[:2]:
            elapsed = timer(fn)
            if i:
                times[name].append(elapsed)
    after = m.stats()
    if any(h.tier != tier for h in m.offload_many([one, *small], release=False)):
        raise VerificationError(f"batch benchmark: a tensor did not go to the {tier} tier")
    if not torch.equal(result["one"], one) or not all(
            torch.equal(a, b) for a, b in zip(result["many"], small)):
        raise VerificationError("batched transfer produced wrong bytes")
    for i in range(samples + 1):
        for (name, fn), outs, srcs in zip(cases[2:], ([one_out], small_out), ([one], small)):
            for o in outs:  # so that the check below sees this call's bytes
                o.fill_(0)
            elapsed = timer(fn)
            if i:
                times[name].append(elapsed)
            if not all(map(torch.equal, outs, srcs)):
                raise VerificationError("torch's copies produced wrong bytes")
    total = count * size
    names = {"single": f"{label} offload+fetch x1",
             "batch": f"{label} offload_many+fetch_many x{count}",
             "torch_single": f"{label} torch copy_ x1",
             "torch_batch": f"{label} torch copy_ x{count}"}
    rows = []
    for name, _ in cases:
        base = "torch_single" if name.startswith("torch") else "single"
        r = row(names[name], "roundtrip", total, times[name], names[base],
                statistics.median(times[base]), device, backend)
        r["tier"] = tier
        if name == "batch":
            r["copy_path"] = copy_path(before, after)
        rows.append(r)
    return rows


def _away(t: torch.Tensor, tier: str, m: OffloadManager) -> torch.Tensor:
    """A buffer of ``t``'s size in memory of ``tier``'s kind: pinned host memory, or (peer)
    memory of the manager's device: on one GPU that is what a same-device peer is."""
    if tier == "host":
        return torch.empty_like(t, device="cpu", pin_memory=t.device.type == "cuda")
    return torch.empty_like(t)


def copy_path(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Which submission path the batches between two ``stats()`` took: ``"batched"`` (one
    cudaMemcpyBatchAsync, or one task on emulation), ``"kernel"`` (one launch of the copy
    kernel, AQUA_COPY_KERNEL=1), ``"per-copy fallback"`` (the runtime refused the batch API),
    ``"mixed"``, or ``"none"``."""
    used = [name for name, key in (("batched", "batched_submissions"), ("kernel", "batch_kernels"),
                                   ("per-copy fallback", "batch_fallbacks"))
            if after[key] - before[key]]
    return used[0] if len(used) == 1 else "mixed" if used else "none"


def _bookkeeping_rows(tdev: torch.device, counts: tuple[int, int], samples: int, device: str,
                      backend: str) -> list[dict[str, Any]]:
    size = 256  # one pool block: what is measured is the per-handle bookkeeping
    per_handle: dict[int, list[float]] = {}
    for n in counts:
        srcs = [_source(size, 3000 + i % 97, tdev) for i in range(n)]
        outs = [torch.empty_like(t) for t in srcs]
        with OffloadManager(tdev, peers=None, host_bytes=n * size + (1 << 20)) as m:
            per_handle[n] = []
            for i in range(samples + 1):
                # As timeit does: the interpreter's cyclic GC scans every live Python object of
                # the process, whoever made it; that is not this library's bookkeeping.
                gc.collect()
                gc.disable()
                try:
                    t0 = time.perf_counter()
                    got = m.fetch_many(m.offload_many(srcs, release=False), outs=outs)
                    if tdev.type == "cuda":
                        torch.cuda.synchronize(tdev)
                    elapsed = time.perf_counter() - t0
                finally:
                    gc.enable()
                if i:
                    per_handle[n].append(elapsed / n)
            if not all(torch.equal(a, b) for a, b in zip(got, srcs)):
                raise VerificationError("bookkeeping benchmark: wrong bytes")
    small = counts[0]
    base = statistics.median(per_handle[small])
    name = "offload_many+fetch_many per handle, {} live".format
    return [row(name(n), "bookkeeping", size, per_handle[n], name(small), base, device, backend)
            for n in counts]


def _reclaim_rows(m: OffloadManager, peer: Any, nbytes: int, samples: int, device: str,
                  backend: str) -> list[dict[str, Any]]:
    piece = max(nbytes // 16, 1 << 20)
    srcs = [_source(piece, 50 + i, m.device) for i in range(nbytes // piece)]
    moved = piece * len(srcs)
    host_dst = torch.empty(moved, dtype=torch.uint8, pin_memory=m.device.type == "cuda")
    flat = torch.cat(srcs)
    reclaim_t, raw_t = [], []
    for i in range(samples + 1):
        m.lend(peer, moved)
        handles = m.offload_many(srcs, release=False)
        if any(h.tier != "peer" for h in handles):
            raise VerificationError("reclaim benchmark: the fill did not land on the peer tier")
        m.synchronize()
        t0 = time.perf_counter()
        m.reclaim(peer)  # blocks until every handle moved and the memory is freed
        elapsed = time.perf_counter() - t0
        if any(h.tier != "host" for h in handles):
            raise VerificationError("reclaim benchmark: a handle did not move to the host tier")
        outs = m.fetch_many(handles)
        if not all(torch.equal(o, s) for o, s in zip(outs, srcs)):
            raise VerificationError("reclaim lost or corrupted bytes")
        if m.device.type == "cuda":
            raw = cuda_timer(lambda: m._store.raw_copy(
                host_dst.data_ptr(), flat.data_ptr(), moved,
                int(torch.cuda.current_stream(m.device).cuda_stream)))
        else:
            a, b = flat.numpy(), host_dst.numpy()
            raw = host_timer(lambda: np.copyto(b, a))
        if i:
            reclaim_t.append(elapsed)
            raw_t.append(raw)
    if not torch.equal(host_dst, flat.cpu()):
        raise VerificationError("raw baseline copy produced wrong bytes")
    base = statistics.median(raw_t)
    return [row("raw_memcpy" if backend == "cuda" else "numpy_copy", "reclaim", moved, raw_t,
                 "raw_memcpy" if backend == "cuda" else "numpy_copy", base, device, backend),
            row("reclaim", "reclaim", moved, reclaim_t,
                 "raw_memcpy" if backend == "cuda" else "numpy_copy", base, device, backend)]


def run_tier_benchmark(*, backend: str = "auto", quick: bool = False, samples: int = 5,
                       count: int = 64, size: int = 64 << 10,
                       reclaim_bytes: int | None = None,
                       bookkeeping_counts: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run the batch, reclaim and bookkeeping benchmarks; returns ``{"device", "backend",
    "label", "rows", "config"}``.

    Raises
    ------
    VerificationError
        A transfer produced wrong bytes.
    """
    backend, tdev = bench_device(backend)
    if samples < 3:
        raise ValueError("need samples >= 3")
    reclaim_bytes = reclaim_bytes or ((64 << 20) if quick else (1 << 30))
    pool = max(4 * count * size, 2 * reclaim_bytes) + (16 << 20)
    peer = tdev.index if backend == "cuda" else "emu:1"
    device = device_label(tdev)
    timer = cuda_timer if backend == "cuda" else host_timer
    # peer: on one GPU a same-device peer stands in (labelled so); emulation emulates one
    peer_label = "peer (same device)" if backend == "cuda" else "peer"
    with OffloadManager(tdev, peers=None, host_bytes=4 * count * size + (1 << 20)) as m:
        rows = _batch_rows(m, "host", "host", count, size, samples, timer, device, backend)
    with OffloadManager(tdev, peers=[peer], peer_bytes=4 * count * size + (1 << 20),
                        host_bytes=pool) as m:
        rows += _batch_rows(m, "peer", peer_label, count, size, samples, timer, device, backend)
        m.reclaim(peer)  # the reclaim experiment lends its own segments
        rows += _reclaim_rows(m, peer, reclaim_bytes, samples, device, backend)
    counts = bookkeeping_counts or ((2048, 16384) if quick else (2048, 65536))
    rows += _bookkeeping_rows(tdev, counts, samples, device, backend)
    return {"device": device, "backend": backend,
            "label": EMULATION_LABEL if backend == "emulation" else None, "rows": rows,
            "config": {"count": count, "size": size, "reclaim_bytes": reclaim_bytes,
                       "samples": samples, "bookkeeping_counts": list(counts)}}


def format_tier_table(result: dict[str, Any]) -> str:
    lines = []
    if result["label"]:
        lines.append(f"*** {result['label']} ***")
    lines.append(f"device: {result['device']}   backend: {result['backend']}   "
                 "ratio = baseline median / median")
    lines.append(f"{'experiment':<11} {'method':<50} {'bytes':>12} {'median':>11} "
                 f"{'min':>11} {'max':>11} {'ratio':>7}")
    for r in result["rows"]:
        path = f"  [{r['copy_path']}]" if "copy_path" in r else ""
        lines.append(f"{r['direction']:<11} {r['method']:<50} {r['bytes']:>12} "
                     f"{r['median_s'] * 1e3:>9.4f}ms {r['min_s'] * 1e3:>9.4f}ms "
                     f"{r['max_s'] * 1e3:>9.4f}ms {r['ratio']:>7.2f}{path}")
    return "\n".join(lines)
