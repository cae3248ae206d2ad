"""Helpers shared by the store suites (test_cascade.py, test_migration.py, test_prefetch.py,
test_incremental.py, test_batch.py, test_lend_reclaim.py, test_stats.py, test_threads*.py,
test_stateful.py): sizes, random bytes, bitwise comparison on any device, and checks of the pool
accounting against the handles' own view of where they live.

The fixtures built on them (``managers``, ``faults``) live in conftest.py, below ``backend``.

Pool accounting (``check_accounting``): ``h.location`` is live (it follows migrations); per
tier, ``used`` is the sum of the 256-aligned blocks of the handles living there. ``fenced``
(bytes released while a copy may still touch them) is free memory, not part of ``used``; it
drains to 0 once every copy completed (``check_drained``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import aqua_offload as aq

K = 1 << 10
M = 1 << 20
A = 256
SLOT = 4 * K
PEER = 4 * SLOT
HOST = 16 * SLOT
JOIN_TIMEOUT_S = 60.0


# -- bytes ----------------------------------------------------------------------------------
def run_threads(targets, timeout: float = JOIN_TIMEOUT_S, stagger_s: float = 0.0
                ) -> list[BaseException | None]:
    """Run each target in a daemon thread (``stagger_s`` apart); return what each raised, in
    order of target (None: it returned). Fails the test if a thread is still alive after
    ``timeout`` (a deadlock fails instead of hanging the run)."""
    errors: list[BaseException | None] = [None] * len(targets)

    def wrap(k, fn):
        def body():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                errors[k] = e
        return body

    threads = [threading.Thread(target=wrap(k, fn), daemon=True, name=f"worker-{k}")
               for k, fn in enumerate(targets)]
    for t in threads:
        t.start()
        if stagger_s:
            time.sleep(stagger_s)
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads did not finish within {timeout} s (deadlock?): {stuck}"
    return errors


def no_errors(errors: list[BaseException | None]) -> None:
    """Raise the first exception :func:`run_threads` reported, if any."""
    real = [e for e in errors if e is not None]
    if real:
        raise real[0]


def align(n: int) -> int:
    return (n + A - 1) // A * A


def rand_u8(n: int, gen: torch.Generator | None = None,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` random bytes, none of them zero, on ``device`` (drawn on the CPU: a seeded
    generator gives the same bytes on every backend)."""
    return torch.randint(1, 256, (n,), dtype=torch.uint8, generator=gen).to(device)


def rand_tensor(nbytes: int, dtype: torch.dtype = torch.float32,
                gen: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Random non-zero bytes reinterpreted as ``dtype`` (floats may be NaN: compare bits)."""
    return rand_u8(nbytes, gen, device).view(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The logical bytes of ``t`` (row-major) as a fresh uint8 CPU tensor, from any device."""
    # A fresh tensor, not t.contiguous(): a one-element view with stride 3 counts as
    # contiguous yet cannot be viewed as bytes.
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def storage_bits(t: torch.Tensor) -> torch.Tensor:
    """Every byte of ``t``'s storage as a fresh uint8 CPU tensor, from any device. Never call
    it on a paged-out tensor (it reads the storage)."""
    s = t.untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8, device=s.device).set_(s, 0, (s.nbytes(),), (1,))
    return raw.to("cpu", copy=True)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (on any devices)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


# Thread suites (test_threads*.py): tensors of any of these dtypes, up to a byte budget.
MIXED_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8,
                torch.complex64, torch.int32]


def rand_mixed(rng: random.Random, gen: torch.Generator, max_bytes: int,
               device: torch.device) -> torch.Tensor:
    """A random tensor of a random dtype of :data:`MIXED_DTYPES` and at most ``max_bytes``
    (possibly empty), half of the time 2-D (rows of 6)."""
    dtype = rng.choice(MIXED_DTYPES)
    es = torch.empty(0, dtype=dtype).element_size()
    n = rng.randrange(0, max_bytes // es + 1)
    raw = torch.randint(0, 256, (n * es,), dtype=torch.uint8, generator=gen).to(device)
    t = raw.view(dtype)
    if n >= 6 and rng.random() < 0.5:
        t = t[: n - n % 6].view(-1, 6)
    return t


# -- pool accounting ------------------------------------------------------------------------
def tier_of(m: aq.OffloadManager, location: str) -> dict:
    return next(t for t in m.stats()["tiers"] if t["location"] == location)


def check_accounting(m: aq.OffloadManager, handles, blocks: dict | None = None) -> None:
    """Per tier: used == sum of the 256-aligned blocks of the live handles living there
    (``blocks`` overrides the block size of some handles, e.g. one with headroom)."""
    blocks = blocks or {}
    s = m.stats()
    live = [h for h in handles if h.state not in ("fetched", "freed")]
    assert s["live_handles"] == len(live)
    for t in s["tiers"]:
        here = [h for h in live if h.location == t["location"]]
        want = sum(blocks.get(id(h), align(h.nbytes)) for h in here)
        assert t["used"] == want, (t, [(h.nbytes, h.location) for h in here])
        assert t["used"] + t["free"] == t["capacity"], t
        assert t["handles"] == len(here), t
        assert t["blocks"] == sum(1 for h in here if h.nbytes > 0), t
        assert t["largest_free"] <= t["free"]
        assert type(t["fenced"]) is int and t["fenced"] >= 0, t


def check_drained(m: aq.OffloadManager) -> dict:
    """Everything freed or fetched: no byte used on any tier, each segment one free range, and
    once every copy completed no byte is fenced."""
    m.synchronize()
    s = m.stats()
    assert s["live_handles"] == 0
    assert s["prefetched_bytes"] == 0
    for t in s["tiers"]:
        assert t["used"] == 0, t
        assert t["blocks"] == 0 and t["handles"] == 0, t
        assert t["free"] == t["capacity"], t
        assert t["free_ranges"] == t["segments"], t
        assert t["fenced"] == 0, t
    return s


def assert_drained(m: aq.OffloadManager) -> dict:
    """Nothing live, one free range per tier, and (every copy done) no byte fenced: stricter
    than :func:`check_drained` on the ranges (for managers that never lent a segment), and it
    does not look at prefetched bytes."""
    m.synchronize()
    s = m.stats()
    assert s["live_handles"] == 0
    for t in s["tiers"]:
        assert t["used"] == 0, t
        assert t["fenced"] == 0, t
        assert t["blocks"] == 0 and t["handles"] == 0, t
        assert t["used"] + t["free"] == t["capacity"]
        assert t["free_ranges"] == 1 and t["largest_free"] == t["capacity"], t
    return s


def victims_of(before: dict, handles) -> list:
    """Handles whose location changed since ``before`` (id -> location)."""
    return [h for h in handles if before[id(h)] != h.location]


def locations(handles) -> dict:
    return {id(h): h.location for h in handles}


# -- emulation only -------------------------------------------------------------------------
def emulation_only(reason: str):
    """Decorator: the test runs on the emulation backend only (``backend`` is parametrized with
    ``"emulation"`` alone, so no CUDA case is collected), and carries the ``emulation_only``
    marker with ``reason`` (why it has no CUDA counterpart): ``pytest -m emulation_only``
    lists them all."""
    def decorate(fn):
        fn = pytest.mark.parametrize("backend", ["emulation"], indirect=True)(fn)
        fn = pytest.mark.usefixtures("backend")(fn)
        return pytest.mark.emulation_only(reason=reason)(fn)
    return decorate


# Code for run_emulated bodies that sweep asynchronous exceptions (Note [Interrupted batches]):
# interrupted(fn, n) runs fn under a tracer that raises KeyboardInterrupt at the n-th line
# executed inside aqua_offload and returns whether it fired; traced(fn, tracer) runs fn under
# any tracer. Another exception is recorded in ``errors`` ([n, repr]) when a list is given
# (an interrupt must never turn into another error), else it propagates.
INTERRUPTS = """
    import gc, sys
    def traced(fn, tracer, errors=None, n=None):
        sys.settrace(tracer)
        try:
            fn()
        except KeyboardInterrupt:
            pass
        except Exception as exc:
            if errors is None:
                raise
            errors.append([n, repr(exc)])
        finally:
            sys.settrace(None)
    class Interrupt:
        def __init__(self, n):
            self.n, self.fired = n, False
        def __call__(self, frame, event, arg):
            return self.local if "aqua_offload" in frame.f_code.co_filename else None
        def local(self, frame, event, arg):
            if event == "line" and not self.fired:
                self.n -= 1
                if self.n < 0:
                    self.fired = True
                    raise KeyboardInterrupt
            return self.local
    def interrupted(fn, n, errors=None):
        tracer = Interrupt(n)
        traced(fn, tracer, errors, n)
        return tracer.fired
"""


def run_emulated(devices: int, body: str) -> dict:
    """Run ``body`` in a child process with ``devices`` emulated devices (emu:0 computes, the
    others are peers); ``body`` fills the dict ``result``, which comes back decoded."""
    code = textwrap.dedent("""
        import json, torch, aqua_offload as aq
        def rand(n):
            return torch.randint(1, 256, (n,), dtype=torch.uint8)
        result = {}
    """) + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    env = dict(os.environ, AQUA_EMULATED_DEVICES=str(devices))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
