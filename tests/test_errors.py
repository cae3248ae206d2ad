"""Bad input gets a clear typed error and changes nothing: not the tensor, not the pools, not
any other handle; and a process ends cleanly whatever is in flight. Manager behaviour runs on
every backend (``backend``/``manager`` fixtures); pure argument validation runs once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import aqua_offload as aq
from conftest import same_bytes


def snapshot_state(m: aq.OffloadManager) -> list[tuple[int, int, int]]:
    st = m.stats()
    return [(t["used"], t["handles"], t["blocks"]) for t in st["tiers"]] + [(st["live_handles"], 0, 0)]


@pytest.fixture
def witness(backend, manager):
    """A live handle whose data must survive every error in the test."""
    t = backend.tensor((333,), torch.float32)
    ref = t.clone()
    h = manager.offload(t)
    yield h
    if h.state not in ("fetched", "freed"):
        assert same_bytes(manager.fetch(h), ref)


def test_not_a_tensor(manager, witness):
    before = snapshot_state(manager)
    with pytest.raises(aq.InvalidArgumentError, match="torch.Tensor"):
        manager.offload([1, 2, 3])
    assert snapshot_state(manager) == before


def test_wrong_device(backend, manager, witness):
    t = torch.empty(10, device="meta")
    before = snapshot_state(manager)
    with pytest.raises(aq.InvalidArgumentError, match="meta"):
        manager.offload(t)
    if backend.cuda:  # a CPU tensor, offered to a GPU's manager
        cpu = torch.ones(10)
        for release in (True, False):
            with pytest.raises(aq.InvalidArgumentError, match="cpu"):
                manager.offload(cpu, release=release)
        assert not aq.is_offloaded(cpu) and bool((cpu == 1).all())
    assert snapshot_state(manager) == before


def test_sparse_tensor_rejected(backend, manager, witness):
    t = torch.eye(4, device=backend.device).to_sparse()
    with pytest.raises(aq.InvalidArgumentError, match="strided"):
        manager.offload(t)


def test_storage_already_paged_out(backend, manager, witness):
    base = backend.tensor((10, 10), torch.int64)
    ref = base.clone()
    view = base[2:4]
    h = manager.offload(base)
    before = snapshot_state(manager)
    for release in (True, False):
        with pytest.raises(aq.InvalidArgumentError, match="paged out"):
            manager.offload(view, release=release)
    other = backend.manager(peers=None, host_bytes="64KiB")
    with pytest.raises(aq.InvalidArgumentError, match="paged out"):
        other.offload(base)
    other.close()
    assert snapshot_state(manager) == before
    assert manager.fetch(h) is base and same_bytes(base, ref)


def test_double_fetch_and_use_after_free(backend, manager, witness):
    t = backend.tensor((50,), torch.float64)
    ref = t.clone()
    h = manager.offload(t)
    manager.fetch(h)
    with pytest.raises(aq.InvalidHandleError, match="fetched"):
        manager.fetch(h)
    assert same_bytes(t, ref)  # the second fetch did not touch the restored tensor
    s = manager.offload(t, release=False)
    s.free()
    for op in (manager.fetch, manager.free, lambda x: x.wait(), lambda x: x.ready()):
        with pytest.raises(aq.InvalidHandleError, match="freed"):
            op(s)


def test_foreign_handle(backend, manager, witness):
    other = backend.manager(peers=None, host_bytes="64KiB")
    t = backend.tensor((20,), torch.float32)
    ref = t.clone()
    h = other.offload(t)
    before_mine, before_other = snapshot_state(manager), snapshot_state(other)
    with pytest.raises(aq.InvalidHandleError, match="another"):
        manager.fetch(h)
    with pytest.raises(aq.InvalidHandleError, match="another"):
        manager.free(h)
    assert snapshot_state(manager) == before_mine and snapshot_state(other) == before_other
    assert other.fetch(h) is t and same_bytes(t, ref)
    other.close()


def test_not_a_handle(backend, manager):
    with pytest.raises(aq.InvalidHandleError):
        manager.fetch(42)
    with pytest.raises(aq.InvalidHandleError, match="not paged out"):
        manager.fetch(torch.ones(3, device=backend.device))


def test_out_of_memory_changes_nothing(backend, manager, witness):
    t = backend.tensor((3_000_000,), torch.uint8)  # 3 MB > peer 1 MiB; host is 4 MiB but...
    fill = [manager.offload(backend.tensor((250_000,), torch.float32), release=False)
            for _ in range(4)]  # ...1 MB in each of 4 host-tier or peer blocks
    ref = t.clone()
    before = snapshot_state(manager)
    with pytest.raises(aq.OutOfMemoryError) as info:
        manager.offload(t)
    err = info.value
    assert err.requested == t.numel()
    assert f"peer {backend.peer_label}" in str(err) and "host cpu" in str(err)
    assert "largest free block" in str(err)
    assert not aq.is_offloaded(t) and same_bytes(t, ref)
    assert snapshot_state(manager) == before
    for h in fill:
        h.free()


def test_too_big_for_any_tier_ever(backend, manager, witness):
    t = backend.tensor((5 << 20,), torch.uint8)
    ref = t.clone()
    with pytest.raises(aq.OutOfMemoryError, match="5.00 MiB"):
        manager.offload(t, release=False)
    assert same_bytes(t, ref) and manager.stats()["live_handles"] == 1  # just the witness


@pytest.mark.parametrize("source", ["numpy", "dlpack"])
def test_non_resizable_storage_cannot_be_released(backend, manager, witness, source):
    """Memory torch's allocator does not own (numpy's, a DLPack import's) cannot be paged out
    in place; a snapshot of it is fine."""
    if source == "numpy":
        if backend.cuda:
            pytest.skip("numpy arrays live on the CPU: the DLPack case covers CUDA")
        arr = np.arange(100, dtype=np.float32) + 1
        t = torch.from_numpy(arr)
    else:
        lender = backend.tensor((100,), torch.float32)  # kept alive: t borrows its memory
        t = torch.from_dlpack(lender)
    assert not t.untyped_storage().resizable()
    ref = t.clone()
    with pytest.raises(aq.InvalidArgumentError, match="release=False"):
        manager.offload(t)
    assert not aq.is_offloaded(t) and same_bytes(t, ref)
    assert torch.equal(manager.fetch(manager.offload(t, release=False)), t)


def test_bad_out_argument_keeps_handle_valid(backend, manager, witness):
    dev = backend.device
    t = backend.tensor((4, 4), torch.float32)
    s = manager.offload(t, release=False)
    bads = [torch.empty(4, 5, device=dev), torch.empty(4, 4, dtype=torch.float64, device=dev),
            torch.empty(4, 8, device=dev)[:, ::2], "x"]
    if backend.cuda:
        bads.append(torch.empty(4, 4))  # right shape and dtype, on the CPU
    for bad in bads:
        with pytest.raises(aq.InvalidArgumentError):
            manager.fetch(s, out=bad)
    assert s.state in ("in_flight", "offloaded")
    assert same_bytes(manager.fetch(s), t)
    r = backend.tensor((4, 4), torch.float32)
    h = manager.offload(r)
    with pytest.raises(aq.InvalidArgumentError, match="in place"):
        manager.fetch(h, out=torch.empty(4, 4, device=dev))
    assert aq.is_offloaded(r)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(policy="mru"), aq.InvalidArgumentError, "policy"),
    (dict(device="tpu"), aq.InvalidArgumentError, "device"),
    (dict(peer_bytes=-5), aq.InvalidArgumentError, "negative"),
    (dict(host_bytes="lots"), aq.InvalidArgumentError, "parse"),
    (dict(peers=["emu:1", 1]), aq.InvalidArgumentError, "twice"),
    (dict(peers=["emu:9"]), aq.InvalidArgumentError, "does not exist"),
    (dict(peers=None, host_bytes=0), aq.InvalidArgumentError, "no tier"),
    (dict(peer_bytes=100), aq.InvalidArgumentError, "256-byte"),
    (dict(peers="auto", peer_bytes={"emu:1": "1MiB", "bogus": 5}), aq.InvalidArgumentError, "peer"),
])
def test_bad_constructor_arguments(kwargs, err, match):
    kwargs = {"device": "cpu", "host_bytes": "64KiB", **kwargs}
    with pytest.raises(err, match=match):
        aq.OffloadManager(**kwargs)


@pytest.mark.skipif(aq._core.cuda_compiled() and torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_device_without_gpu_is_a_backend_error():
    with pytest.raises(aq.BackendError) as info:
        aq.OffloadManager("cuda:0")
    assert info.value.error_name.startswith("cuda")


def test_closed_manager_refuses_work(backend):
    m = backend.manager(peers=None, host_bytes="64KiB")
    s = m.offload(backend.tensor((10,), torch.float32), release=False)
    m.close()
    for op in (lambda: m.offload(torch.ones(2, device=backend.device)), lambda: m.fetch(s),
               lambda: m.synchronize()):
        with pytest.raises(aq.OffloadError, match="closed"):
            op()


def test_debug_guard_turns_a_touch_into_an_error(backend, manager):
    t = torch.randn(1000).to(backend.device) + 3.0  # moderate values: the test compares sums
    ref = t.clone()
    view = t[10:20]
    h = manager.offload(t)
    with aq.debug_guard():
        for touch in (lambda: t.sum(), lambda: view + 1, lambda: t.add_(1),
                      lambda: torch.cat([ref, t])):
            with pytest.raises(aq.PagedOutError, match="paged out"):
                touch()
        assert torch.isfinite(ref.sum())  # other tensors are unaffected
        manager.fetch(h)
        assert torch.equal(t, ref) and float(t.sum()) == float(ref.sum())


def _run(backend, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child process, with ``dev`` (the backend's device, a string) and
    ``peer`` (its test peer, an index) defined; a child still running after ``timeout``
    seconds fails the test (a hang at exit)."""
    script = f"dev = {str(backend.device)!r}\npeer = {backend.peer}\n" + textwrap.dedent(code)
    try:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child process did not end within {timeout} s (hung at exit?); "
                    f"stdout {e.stdout!r}, stderr {e.stderr!r}")


def test_shutdown_with_live_handles_neither_crashes_nor_hangs(backend):
    proc = _run(backend, """
        import torch, aqua_offload as aq
        m = aq.OffloadManager(dev, peers=[peer], peer_bytes="64MiB", host_bytes="64MiB")
        big = [torch.randn(2_000_000, device=dev) for _ in range(8)]
        hs = [m.offload(t) for t in big[:4]] + [m.offload(t, release=False) for t in big[4:]]
        aq.offload(torch.randn(1000, device=dev))  # and a default manager
        print("ok", flush=True)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_dropping_a_manager_with_in_flight_snapshots_is_safe(backend):
    proc = _run(backend, """
        import gc, torch, aqua_offload as aq
        for _ in range(20):
            m = aq.OffloadManager(dev, peers=[peer], peer_bytes="16MiB", host_bytes="16MiB")
            hs = [m.offload(torch.randn(1_000_000, device=dev), release=False) for _ in range(3)]
            del m, hs
            gc.collect()
        print("ok", flush=True)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_process_exit_with_copies_in_flight(backend):
    """sys.exit(0) right after offloading 64-256 MiB tensors (releases and snapshots, an
    eviction's migration and a prefetch queued too): the process ends with code 0, promptly,
    without a crash or a message from a dying runtime. The atexit hook waits for the copies
    before the pools (and on CUDA the runtime) go away. The child checks that some copy was
    still in flight when it called exit: on CUDA the copies queue behind matmuls on the
    current stream."""
    proc = _run(backend, """
        import sys, torch, aqua_offload as aq
        mib = 1 << 20
        m = aq.OffloadManager(dev, peers=[peer], peer_bytes="256MiB", host_bytes="512MiB")
        ts = [torch.empty(n * mib, dtype=torch.uint8, device=dev).fill_(i + 1)
              for i, n in enumerate((64, 128, 256, 64))]
        if dev.startswith("cuda"):  # keep the current stream busy: the copies wait for it
            a = torch.randn(4096, 4096, device=dev)
            for _ in range(20):
                a = a @ a
                a = a / a.norm()
        # 64 and 128 MiB go to the peer; 256 MiB needs the whole peer: both move down
        hs = [m.offload(ts[0]), m.offload(ts[1], release=False), m.offload(ts[2])]
        # a deferred snapshot last: nothing waits for its copy on any backend (on torch without
        # _swap_data_ptr_ an emulated release waits for its own, Note [Without _swap_data_ptr_],
        # and with it the copies queued before it)
        hs.append(m.offload(ts[3], release=False, fence="deferred"))
        m.prefetch(hs[1])
        ready = [h.ready() for h in hs]
        print("exiting", [h.tier for h in hs], ready, flush=True)
        assert not all(ready), "every copy had completed: nothing was in flight at exit"
        sys.exit(0)
    """, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("exiting"), proc.stdout
    for sign in ("Traceback", "terminate called", "Segmentation", "Error"):
        assert sign not in proc.stderr, proc.stderr[-4000:]
