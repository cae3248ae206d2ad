"""Where the host time of small offloads goes, on CUDA and on emulation on the same machine.

The H200 run of 2026-11-28 measured a 4 KiB offload at ~40 us (torch's non-blocking copy:
~13 us) and ~13 us of host time per handle of a batch: far from DESIGN.md section 9's per-call
and batch targets, and about twice the emulation backend's per-handle cost. This script says
why: per case it times a loop (wall clock, the device synchronized at the end) and profiles it
with cProfile (top functions by own time), for the CUDA backend and for emulation ("cpu") in
one process, and times the torch primitives the CUDA path calls per call or per handle.

    python scripts/gpu_profile.py --out DIR     # DIR/profile.json, DIR/profile.txt

Not a benchmark (no baseline, no targets): a diagnosis for the next change.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import aqua_offload as aq


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _loop(fn: Callable[[], Any], n: int, dev: torch.device) -> float:
    """Seconds per call of ``fn``, over ``n`` calls after 20 warm-up calls."""
    for _ in range(20):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / n


def _profile(fn: Callable[[], Any], n: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    return buf.getvalue()


def _cases(dev: torch.device) -> dict[str, Callable[[], Any]]:
    g = torch.Generator().manual_seed(5)

    def rand(n: int) -> torch.Tensor:
        return torch.randint(1, 255, (n,), dtype=torch.uint8, generator=g).to(dev)

    m = aq.OffloadManager(dev, peers=None, host_bytes="256MiB")
    one, one_out = rand(4096), torch.empty(4096, dtype=torch.uint8, device=dev)
    rel = rand(4096)
    many = [rand(65536) for _ in range(64)]
    many_out = [torch.empty_like(t) for t in many]
    rel_many = [rand(65536) for _ in range(64)]

    def snapshot_4k() -> None:
        m.fetch(m.offload(one, release=False), out=one_out)

    def release_4k() -> None:
        m.fetch(m.offload(rel))

    def snapshot_64x64k() -> None:
        m.fetch_many(m.offload_many(many, release=False), outs=many_out)

    def release_64x64k() -> None:
        m.fetch_many(m.offload_many(rel_many))

    # The core alone (no Python above the binding): what is left when the manager's Python
    # is gone, per call and per handle of a batch.
    from aqua_offload.devices import current_stream
    core = m._store

    def core_case(srcs: list[torch.Tensor], outs: list[torch.Tensor]) -> Callable[[], None]:
        items = [(t.data_ptr(), t.nbytes, 0.0, 0) for t in srcs]
        dsts = [o.data_ptr() for o in outs]

        def run() -> None:
            stream = current_stream(dev)
            got = core.offload_many(items, stream, True)
            core.fetch_many([cid for cid, _ in got], dsts, stream, False)
        return run

    refs = {id(t): t.clone() for t in (one, rel, *many, *rel_many)}

    written = {"snapshot_4k": [(one_out, one)], "release_4k": [(rel, rel)],
               "snapshot_64x64k": list(zip(many_out, many)),
               "release_64x64k": list(zip(rel_many, rel_many)), "core_4k": [(one_out, one)],
               "core_64x64k": list(zip(many_out, many))}

    def check(case: str) -> None:
        """The bytes ``case`` wrote (into outputs zeroed before it ran, or restored in place)."""
        _sync(dev)
        if not all(torch.equal(a, refs[id(b)]) for a, b in written[case]):
            raise RuntimeError(f"gpu_profile: {case} produced wrong bytes")
        for o in (one_out, *many_out):
            o.zero_()

    for o in (one_out, *many_out):  # zeroed before each case: check() sees its bytes
        o.zero_()
    return {"snapshot_4k": snapshot_4k, "release_4k": release_4k,
            "snapshot_64x64k": snapshot_64x64k, "release_64x64k": release_64x64k,
            "core_4k": core_case([one], [one_out]), "core_64x64k": core_case(many, many_out),
            "_manager": m, "_check": check}  # type: ignore[dict-item]


def _primitives(dev: torch.device) -> dict[str, float]:
    """Microseconds per call of the torch calls the CUDA path makes."""
    from aqua_offload.devices import record_stream
    t = torch.empty(4096, dtype=torch.uint8, device=dev)
    s = t.untyped_storage()
    side = torch.cuda.Stream(dev)
    idx = dev.index or 0
    calls: dict[str, Callable[[], Any]] = {
        "torch.cuda.current_stream(dev)": lambda: torch.cuda.current_stream(dev),
        "current_stream(dev).cuda_stream": lambda: torch.cuda.current_stream(dev).cuda_stream,
        "torch._C._cuda_getCurrentRawStream(i)": lambda: torch._C._cuda_getCurrentRawStream(idx),
        "torch.empty(0, device=dev)": lambda: torch.empty(0, dtype=torch.uint8, device=dev),
        "torch.UntypedStorage(0, device=dev)": lambda: torch.UntypedStorage(0, device=dev),
        "record_stream(storage, side)": lambda: record_stream(s, side),
        "tensor.record_stream(side)": lambda: t.record_stream(side),
        "torch.empty(4096, device=dev)": lambda: torch.empty(4096, dtype=torch.uint8, device=dev),
        "t.untyped_storage()": lambda: t.untyped_storage(),
        "t.data_ptr()": lambda: t.data_ptr(),
        "t.device": lambda: t.device,
    }
    out = {}
    for name, fn in calls.items():
        try:
            out[name] = _loop(fn, 2000, dev) * 1e6
        except Exception as e:  # a private call missing on this torch
            out[name] = f"{type(e).__name__}: {e}"  # type: ignore[assignment]
    torch.cuda.synchronize(dev)
    return out


def _copy_primitives(dev: torch.device) -> dict[str, float]:
    """Microseconds per call (device time included: each loop is synchronized at its end) of
    the copies a batch makes, device to (pinned) host: on CUDA, whether a batch's cost per
    piece is the driver's (one cudaMemcpyBatchAsync of 64 pieces against 64 cudaMemcpyAsync)
    or ours (the copy kernel is timed by gpu_check's bench_tiers_kernel stage, a process of its
    own: a fault there must not end this one's CUDA context); on emulation the same calls, for
    comparison."""
    from aqua_offload.devices import current_stream
    # On CUDA a side stream, never torch's default one: that is the legacy NULL stream, which
    # cudaMemcpyBatchAsync refuses, so raw_copy_many there would time 64 cudaMemcpyAsync
    # under the batch's name. The source is made and torch's copy_ runs on that stream too.
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    with aq.OffloadManager(dev, peers=None, host_bytes="1MiB") as m, \
            (torch.cuda.stream(side) if side is not None else contextlib.nullcontext()):
        core, stream = m._store, current_stream(dev)
        src = torch.randint(1, 255, (4 << 20,), dtype=torch.uint8, device=dev)
        dst = torch.empty(4 << 20, dtype=torch.uint8, pin_memory=dev.type == "cuda")
        out: dict[str, float] = {}

        def timed(name: str, fn: Callable[[], Any], calls: int, nbytes: int) -> None:
            dst[:nbytes].zero_()
            out[name] = _loop(fn, calls, dev) * 1e6
            _sync(dev)
            if not torch.equal(dst[:nbytes], src[:nbytes].cpu()):
                raise RuntimeError(f"gpu_profile: {name} produced wrong bytes")

        for piece in (4096, 65536):
            offs = [i * piece for i in range(64)]
            d = [dst.data_ptr() + o for o in offs]
            s_ = [src.data_ptr() + o for o in offs]
            n = [piece] * 64
            kib = piece >> 10
            timed(f"raw_copy_many 64 x {kib} KiB (one batched call)",
                  lambda: core.raw_copy_many(d, s_, n, stream), 500, 64 * piece)
            timed(f"raw_copy x64, {kib} KiB each (64 calls)",
                  lambda: [core.raw_copy(a, b, piece, stream) for a, b in zip(d, s_)], 200,
                  64 * piece)
            views = [src[o:o + piece] for o in offs]
            outs = [dst[o:o + piece] for o in offs]
            timed(f"torch copy_ x64, {kib} KiB each",
                  lambda: [o.copy_(v, non_blocking=True) for o, v in zip(outs, views)], 200,
                  64 * piece)
        timed("raw_copy 4 MiB (one call)",
              lambda: core.raw_copy(dst.data_ptr(), src.data_ptr(), 4 << 20, stream), 500,
              4 << 20)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=300, help="calls per timed loop")
    ap.add_argument("--top", type=int, default=30, help="functions per profile")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    devices = [torch.device("cpu")]
    if aq.info()["backend"] == "cuda":
        devices.insert(0, torch.device("cuda", 0))
    result: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0],
                              "us_per_call": {}}
    text = []
    for dev in devices:
        name = "cuda" if dev.type == "cuda" else "emulation"
        cases = _cases(dev)
        m, check = cases.pop("_manager"), cases.pop("_check")
        try:
            for case, fn in cases.items():
                us = _loop(fn, args.calls, dev) * 1e6
                check(case)  # a wrong copy is not a timing
                result["us_per_call"][f"{name}/{case}"] = round(us, 2)
                print(f"{name:9} {case:16} {us:9.1f} us per call", flush=True)
                text.append(f"##### {name} {case}: {us:.1f} us per call\n"
                            + _profile(fn, args.calls, args.top))
        finally:
            m.close()
        result.setdefault("copies_us", {})[name] = copies = _copy_primitives(dev)
        for k, v in copies.items():
            print(f"{name:9} {k:42} {v:9.2f} us per call")
        if dev.type == "cuda":
            result["cuda_primitives_us"] = _primitives(dev)
            for k, v in result["cuda_primitives_us"].items():
                print(f"  {k:42} {v if isinstance(v, str) else f'{v:8.2f} us'}")
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))
    (args.out / "profile.txt").write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
