"""The methods the copy benchmark compares, per direction and backend, built as measure.Cases.

Directions: ``device_to_host``/``host_to_device`` (the pinned host tier), ``device_to_peer``/
``peer_to_device`` (the peer tier: another GPU when one is peer-accessible, else the same GPU,
which exercises the code path but not NVLink) and ``bidirectional`` (a device-to-host and a
host-to-device copy at once, on two streams or, on emulation, two threads).

Methods (the baseline of every direction is ``raw_memcpy``, the core's unchunked copy on the
current stream: ``cudaMemcpyAsync``, or ``memcpy`` on the calling thread on emulation):
``aqua_offload`` (``offload(t, release=False)`` away from the device, ``fetch(h, out=...)``
towards it), ``aqua_offload_many`` (the same bytes as 64 tensors through ``offload_many``/
``fetch_many``), ``torch_copy`` (``out.copy_(src, non_blocking=True)`` into preallocated
memory, pinned on the host), and on CUDA ``torch_to_nonblocking`` (``src.to(other,
non_blocking=True)``: a new tensor, pinned when on the host) and ``torch_blocking`` (``.cpu()``
and ``pageable.to(device)``: what code without pinned memory does).

Buffers of a size are allocated once, shared by the methods; outputs are scribbled before
each method, and each case verifies its own output after timing.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from ..handle import Handle
from ..manager import OffloadManager
from ..sizes import format_size
from .measure import Case, check_equal, random_bytes

__all__ = ["BATCH_COUNT", "DIRECTIONS", "cuda_cases", "emulation_cases"]

BATCH_COUNT = 64   # tensors per aqua_offload_many batch
MIN_PART = 4 << 10  # ... of at least 4 KiB each
DIRECTIONS = ("device_to_host", "host_to_device", "device_to_peer", "peer_to_device",
              "bidirectional")
D2H, H2D, D2P, P2D, BIDI = DIRECTIONS


def _free_all(m: OffloadManager, handles: list[Handle]) -> None:
    while handles:
        m.free(handles.pop())


def _check_tier(handles: list[Handle], tier: str, what: str) -> None:
    wrong = [h.tier for h in handles if h.tier != tier]
    if wrong:  # a spill to another tier would time the wrong path
        raise RuntimeError(f"{what}: a copy landed on the {wrong[0]} tier, not {tier}; the pools "
                           "are too small for this benchmark")


def copy_case(method: str, directions: tuple[str, ...], copy: Callable[[], Any],
              expected: torch.Tensor, what: str, out: torch.Tensor | None = None) -> Case:
    """A plain copy; verifies ``out``, or the tensor the last call returned."""
    last: list[Any] = [None]

    def issue(k: int) -> None:
        for _ in range(k):
            last[0] = None  # an allocating method reuses the block it returned last time
            last[0] = copy()

    return Case(method, directions, "raw_memcpy", issue,
                verify=lambda: check_equal(last[0] if out is None else out, expected, what),
                reset=(lambda: None) if out is None else out.zero_)


def offload_case(m: OffloadManager, src: torch.Tensor, out: torch.Tensor, direction: str,
                 tier: str, what: str) -> Case:
    """Snapshot offloads; the last handle of a batch is kept to verify its bytes by fetching."""
    live: list[Handle] = []

    def issue(k: int) -> None:
        for _ in range(k):
            live.append(m.offload(src, release=False))

    def finish() -> None:
        _check_tier(live, tier, what)
        last = live.pop()
        _free_all(m, live)
        live.append(last)

    def verify() -> None:
        last = live.pop()
        _free_all(m, live)
        out.zero_()
        m.fetch(last, out=out)
        check_equal(out, src, what)

    return Case("aqua_offload", (direction,), "raw_memcpy", issue, verify,
                prepare=lambda k: _free_all(m, live), finish=finish)


def fetch_case(m: OffloadManager, src: torch.Tensor, out: torch.Tensor, direction: str,
               tier: str, what: str) -> Case:
    """Fetches into ``out=`` of handles offloaded (untimed) before each batch."""
    pending: list[Handle] = []

    def prepare(k: int) -> None:
        pending[:] = [m.offload(src, release=False) for _ in range(k)]
        _check_tier(pending, tier, what)

    def issue(k: int) -> None:  # one at a time from the front: bidirectional pairs issue k=1
        for _ in range(k):
            m.fetch(pending.pop(0), out=out)

    return Case("aqua_offload", (direction,), "raw_memcpy", issue, reset=out.zero_,
                prepare=prepare, finish=lambda: _free_all(m, pending),
                verify=lambda: check_equal(out, src, what))


def _split(src: torch.Tensor) -> list[torch.Tensor] | None:
    """``src`` as BATCH_COUNT separate tensors, or None when too small or not divisible."""
    n = src.numel()
    if n % BATCH_COUNT or n // BATCH_COUNT < MIN_PART:
        return None
    return [p.clone() for p in src.split(n // BATCH_COUNT)]


def many_cases(m: OffloadManager, src: torch.Tensor, out_dir: str, in_dir: str, tier: str,
               what: str) -> list[Case]:
    """``offload_many``/``fetch_many`` of the bytes of ``src`` as BATCH_COUNT tensors."""
    parts = _split(src)
    if parts is None:
        return []
    outs = [torch.empty_like(p) for p in parts]
    live: list[list[Handle]] = []
    pending: list[list[Handle]] = []

    def drop(batches: list[list[Handle]]) -> None:
        while batches:
            _free_all(m, batches.pop())

    def issue_out(k: int) -> None:
        for _ in range(k):
            live.append(m.offload_many(parts, release=False))

    def finish_out() -> None:
        _check_tier([h for b in live for h in b], tier, what)
        last = live.pop()
        drop(live)
        live.append(last)

    def verify(fetch_last: bool) -> None:
        if fetch_last:
            last = live.pop()
            drop(live)
            for o in outs:
                o.zero_()
            m.fetch_many(last, outs=outs)
        check_equal(torch.cat(outs), src, what)

    def prepare_in(k: int) -> None:
        pending[:] = [m.offload_many(parts, release=False) for _ in range(k)]
        _check_tier([h for b in pending for h in b], tier, what)

    def issue_in(k: int) -> None:
        for _ in range(k):
            m.fetch_many(pending.pop(0), outs=outs)

    def scribble() -> None:
        for o in outs:
            o.zero_()

    return [Case("aqua_offload_many", (out_dir,), "raw_memcpy", issue_out,
                 verify=lambda: verify(True), prepare=lambda k: drop(live), finish=finish_out),
            Case("aqua_offload_many", (in_dir,), "raw_memcpy", issue_in,
                 verify=lambda: verify(False), reset=scribble, prepare=prepare_in,
                 finish=lambda: drop(pending))]


PairRunner = Callable[[Case, Case, int], None]


def concurrent(a: Case, b: Case, run_pair: PairRunner) -> Case:
    """Cases ``a`` and ``b`` at once, as one ``bidirectional`` case: a sample is k pairs."""
    assert a.method == b.method

    def prepare(k: int) -> None:
        a.prepare(k)
        b.prepare(k)

    return Case(a.method, (BIDI,), "raw_memcpy", lambda k: run_pair(a, b, k),
                verify=lambda: (a.verify(), b.verify())[-1],
                reset=lambda: (a.reset(), b.reset())[-1], prepare=prepare,
                finish=lambda: (a.finish(), b.finish())[-1])


def _two_threads(a: Case, b: Case, k: int) -> None:
    """Emulation: ``b``'s k copies on a second thread while ``a``'s run on this one (each call
    blocks until its copy is complete, so two threads are what keeps two copies in flight)."""
    error: list[BaseException] = []

    def run_b() -> None:
        try:
            b.issue(k)
        except BaseException as exc:  # re-raised on the caller's thread
            error.append(exc)

    t = threading.Thread(target=run_b, name="aqua-bench-bidirectional")
    t.start()
    try:
        a.issue(k)
    finally:
        t.join()
    if error:
        raise error[0]


def _two_streams(device: torch.device) -> PairRunner:
    """CUDA: ``a``'s copies issued from one side stream and ``b``'s from another, alternating
    one by one (issued all of ``a`` first, small copies would finish before ``b``'s start), all
    after the current stream's work so far (the timer's start event) and before its next (the
    end event)."""
    sa, sb = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def run(a: Case, b: Case, k: int) -> None:
        cur = torch.cuda.current_stream(device)
        sa.wait_stream(cur)
        sb.wait_stream(cur)
        for _ in range(k):
            with torch.cuda.stream(sa):
                a.issue(1)
            with torch.cuda.stream(sb):
                b.issue(1)
        cur.wait_stream(sa)
        cur.wait_stream(sb)
    return run


def emulation_cases(n: int, host_m: OffloadManager, peer_m: OffloadManager) -> list[Case]:
    """Every method at ``n`` bytes on the emulation backend (all memory is host memory)."""
    src = random_bytes(n, seed=n)
    out, out2 = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    src2 = random_bytes(n, seed=n + 1)
    raw, size = host_m._store.raw_copy, format_size(n)  # stream 0: memcpy on this thread
    plain = (D2H, H2D, D2P, P2D)  # the same host-to-host copy stands for each of them
    cases = [
        copy_case("raw_memcpy", plain, lambda: raw(out.data_ptr(), src.data_ptr(), n, 0), src,
                  f"raw_memcpy {size}", out),
        copy_case("torch_copy", plain, lambda: out.copy_(src), src, f"torch_copy {size}", out),
    ]
    for m, tier, d_out, d_in in ((host_m, "host", D2H, H2D), (peer_m, "peer", D2P, P2D)):
        cases += [offload_case(m, src, out, d_out, tier, f"offload {tier} {size}"),
                  fetch_case(m, src, out, d_in, tier, f"fetch {tier} {size}"),
                  *many_cases(m, src, d_out, d_in, tier, f"offload_many {tier} {size}")]
    cases += [
        concurrent(copy_case("raw_memcpy", (D2H,), lambda: raw(out.data_ptr(), src.data_ptr(),
                                                              n, 0), src, "raw a", out),
                   copy_case("raw_memcpy", (H2D,), lambda: raw(out2.data_ptr(), src2.data_ptr(),
                                                               n, 0), src2, "raw b", out2),
                   _two_threads),
        concurrent(copy_case("torch_copy", (D2H,), lambda: out.copy_(src), src, "torch a", out),
                   copy_case("torch_copy", (H2D,), lambda: out2.copy_(src2), src2, "torch b",
                             out2), _two_threads),
        concurrent(offload_case(host_m, src, out, D2H, "host", f"bidirectional offload {size}"),
                   fetch_case(host_m, src2, out2, H2D, "host", f"bidirectional fetch {size}"),
                   _two_threads),
    ]
    return cases


def cuda_cases(n: int, host_m: OffloadManager, peer_m: OffloadManager,
               peer: torch.device) -> list[Case]:
    """Every method at ``n`` bytes on CUDA; ``peer_m``'s peer tier lives on ``peer``."""
    dev = host_m.device
    src = random_bytes(n, seed=n).to(dev)
    out, out2 = torch.empty_like(src), torch.empty_like(src)
    h_src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h_src.copy_(random_bytes(n, seed=n + 1))
    h_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = h_src.clone()  # the same bytes in pageable memory
    p_src = src if peer == dev else src.to(peer)
    p_out = torch.empty(n, dtype=torch.uint8, device=peer)
    raw, size = host_m._store.raw_copy, format_size(n)
    pair = _two_streams(dev)

    def stream() -> int:
        return int(torch.cuda.current_stream(dev).cuda_stream)

    def raw_case(d: str, dst: torch.Tensor, s: torch.Tensor, what: str) -> Case:
        return copy_case("raw_memcpy", (d,), lambda: raw(dst.data_ptr(), s.data_ptr(), n,
                                                         stream()), s, what, dst)

    def torch_case(d: str, dst: torch.Tensor, s: torch.Tensor, what: str) -> Case:
        return copy_case("torch_copy", (d,), lambda: dst.copy_(s, non_blocking=True), s, what,
                         dst)

    cases = [
        raw_case(D2H, h_out, src, f"raw D2H {size}"),
        torch_case(D2H, h_out, src, f"torch_copy D2H {size}"),
        copy_case("torch_to_nonblocking", (D2H,), lambda: src.to("cpu", non_blocking=True), src,
                  f"torch_to_nonblocking D2H {size}"),
        copy_case("torch_blocking", (D2H,), src.cpu, src, f".cpu() {size}"),
        offload_case(host_m, src, out, D2H, "host", f"offload host {size}"),
        raw_case(H2D, out, h_src, f"raw H2D {size}"),
        torch_case(H2D, out, h_src, f"torch_copy H2D {size}"),
        copy_case("torch_to_nonblocking", (H2D,), lambda: h_src.to(dev, non_blocking=True),
                  h_src, f"torch_to_nonblocking H2D {size}"),
        copy_case("torch_blocking", (H2D,), lambda: pageable.to(dev), pageable,
                  f"pageable .to(device) {size}"),
        fetch_case(host_m, src, out, H2D, "host", f"fetch host {size}"),
        *many_cases(host_m, src, D2H, H2D, "host", f"offload_many host {size}"),
        raw_case(D2P, p_out, src, f"raw D2P {size}"),
        torch_case(D2P, p_out, src, f"torch_copy D2P {size}"),
        offload_case(peer_m, src, out, D2P, "peer", f"offload peer {size}"),
        raw_case(P2D, out, p_src, f"raw P2D {size}"),
        torch_case(P2D, out, p_src, f"torch_copy P2D {size}"),
        fetch_case(peer_m, src, out, P2D, "peer", f"fetch peer {size}"),
        *many_cases(peer_m, src, D2P, P2D, "peer", f"offload_many peer {size}"),
        concurrent(raw_case(D2H, h_out, src, "raw a"), raw_case(H2D, out2, h_src, "raw b"), pair),
        concurrent(torch_case(D2H, h_out, src, "torch a"),
                   torch_case(H2D, out2, h_src, "torch b"), pair),
        concurrent(offload_case(host_m, src, out, D2H, "host", f"bidirectional offload {size}"),
                   fetch_case(host_m, src, out2, H2D, "host", f"bidirectional fetch {size}"),
                   pair),
    ]
    if peer != dev:  # .to() the same device would return the source itself: no copy to time
        cases += [copy_case("torch_to_nonblocking", (D2P,),
                            lambda: src.to(peer, non_blocking=True), src, f"to peer {size}"),
                  copy_case("torch_to_nonblocking", (P2D,),
                            lambda: p_src.to(dev, non_blocking=True), p_src, f"from peer {size}")]
    return cases
