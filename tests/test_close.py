"""close() gives every pool segment back before it returns, handles referenced or not."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import aqua_offload as aq
from aqua_offload import _core
from conftest import same_bytes

MiB = 1 << 20


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS"))


def test_close_frees_pools_with_handles_still_referenced():
    """Emulation: arenas are pre-faulted host memory, so RSS shows whether they went back."""
    gc.collect()
    before = _rss()
    m = aq.OffloadManager("cpu", peers=[1], peer_bytes="256MiB", host_bytes="256MiB")
    assert _rss() - before > 400 * MiB  # the arenas are resident
    kept = [m.offload(torch.randn(1 << 16)), m.offload(torch.randn(1 << 16), release=False)]
    m.close(restore=False)
    assert _rss() - before < 64 * MiB
    s = m.stats()
    assert all(t["capacity"] == 0 and t["segments"] == 0 for t in s["tiers"]), s["tiers"]
    assert kept[1].manager is m  # the handle kept the manager object alive, not its memory


def test_close_gives_a_pretended_device_its_memory_back():
    _core.set_device_memory(1, 64 * MiB)
    try:
        m = aq.OffloadManager("cpu", peers=[1], peer_bytes="48MiB", host_bytes="4MiB")
        assert _core.memory_info("emulation", 1)[0] == 16 * MiB
        h = m.offload(torch.randn(1024), release=False)
        m.close()
        assert _core.memory_info("emulation", 1)[0] == 64 * MiB
        with pytest.raises(aq.OffloadError, match="closed"):
            m.fetch(h)
    finally:
        _core.set_device_memory(1, 0)


def test_close_restores_released_tensors_first(backend):
    m = backend.manager(peer_bytes="1MiB", host_bytes="4MiB")
    t = backend.tensor((1000,))
    ref = t.clone()
    m.offload(t)
    m.close()
    assert not aq.is_offloaded(t) and same_bytes(t, ref)


def test_close_waits_for_calls_in_progress_and_refuses_new_ones(backend):
    """Threads keep offloading while close() runs: every call either completes (and its
    tensor comes back, restored by close) or is refused with a typed error; none crashes."""
    import threading

    m = backend.manager(peer_bytes="8MiB", host_bytes="32MiB")
    stop, errors, done = threading.Event(), [], []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        while not stop.is_set():
            t = torch.randint(1, 255, (4096,), dtype=torch.uint8, generator=g).to(backend.device)
            ref = t.clone()
            try:
                h = m.offload(t, release=False)
                out = m.fetch(h)
            except aq.OffloadError:
                return  # closed under us: refused, typed
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            if not same_bytes(out, ref):
                errors.append(AssertionError("wrong bytes"))
            done.append(1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    while len(done) < 20:
        pass
    m.close()
    stop.set()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert all(t["capacity"] == 0 for t in m.stats()["tiers"])


def test_a_forked_child_exits_cleanly_and_cannot_use_the_parents_manager():
    code = textwrap.dedent("""
        import os, sys, torch, aqua_offload as aq
        m = aq.OffloadManager("cpu", peers=[1], peer_bytes="4MiB", host_bytes="4MiB")
        h = m.offload(torch.randn(1 << 18))
        pid = os.fork()
        if pid == 0:
            try:
                m._store.ready(h._id)
                os._exit(3)
            except aq.OffloadError as e:
                if "forked child" not in str(e):
                    os._exit(4)
            m2 = aq.OffloadManager("cpu", peers=None, host_bytes="1MiB")
            t = torch.arange(100.0)
            ok = torch.equal(m2.fetch(m2.offload(t, release=False)), t)
            sys.exit(0 if ok else 5)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        m.fetch(h)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0"


def test_a_forked_child_never_blocks_on_the_parents_locks():
    """Threads of the parent hold the store's lock at random moments of the fork; the child's
    reads of the parent's manager never take it: typed errors or "closed", never a hang."""
    code = textwrap.dedent("""
        import os, signal, sys, threading, torch, aqua_offload as aq
        m = aq.OffloadManager("cpu", peers=[1], peer_bytes="8MiB", host_bytes="16MiB")
        h = m.offload(torch.randn(1000))
        stop = False
        def busy():
            while not stop:
                x = torch.randn(2000); m.fetch(m.offload(x)); m.stats()
        threads = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
        for th in threads: th.start()
        bad = 0
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)
                s = m.stats()  # closed to the child: not the parent's numbers as its own
                ok = s["closed"] and s["forked_child"] and s["tiers"] == []
                ok = ok and h.state == "closed" and "closed" in repr(h)
                os._exit(0 if ok else 4)
            _, status = os.waitpid(pid, 0)
            bad += os.waitstatus_to_exitcode(status) != 0
        stop = True
        for th in threads: th.join()
        print(bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, AQUA_EMULATED_DEVICES="2"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0"


@pytest.mark.cuda
def test_close_gives_the_peer_gpu_its_memory_back():
    """CUDA: the peer's free memory (cudaMemGetInfo) is back where it was after close(), with a
    handle still referenced (the lender may reuse the memory at once)."""
    peer = 1 if torch.cuda.device_count() > 1 else 0
    torch.cuda.synchronize()
    m0 = aq.OffloadManager("cuda:0", peers=[peer], peer_bytes="512MiB", host_bytes="64MiB")
    m0.close()  # warm-up: contexts, peer access and the runtime's own allocations
    torch.cuda.empty_cache()
    before = torch.cuda.mem_get_info(peer)[0]
    m = aq.OffloadManager("cuda:0", peers=[peer], peer_bytes="512MiB", host_bytes="64MiB")
    assert before - torch.cuda.mem_get_info(peer)[0] >= 512 * MiB
    t = torch.randn(1 << 20, device="cuda:0")
    kept = m.offload(t, release=False)
    m.close()
    torch.cuda.empty_cache()
    assert abs(torch.cuda.mem_get_info(peer)[0] - before) < 32 * MiB
    assert kept.manager is m
