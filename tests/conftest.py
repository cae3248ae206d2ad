"""Shared fixtures. GPU tests are marked `cuda` and skip with a reason when no GPU is usable.

One API suite runs on every backend (RMM's pattern): a test that takes the ``backend`` fixture
(or ``manager``, built from it) runs on emulation always and on CUDA when a GPU is present; the
CUDA case carries the ``cuda`` marker, so ``pytest -m cuda`` selects it and it skips with a
reason elsewhere.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import pytest
import torch

import aqua_offload as aq
from aqua_offload import _core


def _gpu_reason() -> str | None:
    if not _core.cuda_compiled():
        return "aqua_offload was built without the CUDA backend"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random bits of any dtype (never zeros): random bytes reinterpreted, with floats made
    finite so that equality checks by value also hold."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(1, 256, (n * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        t = (raw % 2).bool()
    else:
        t = raw.view(dtype)
    if t.is_floating_point() or t.is_complex():
        t = torch.nan_to_num(t) if dtype.itemsize > 1 else t
    return t.reshape(shape).to(device)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of the same shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ua = a.detach().contiguous().reshape(-1).view(torch.uint8) if a.numel() else a.new_empty(0, dtype=torch.uint8)
    ub = b.detach().contiguous().reshape(-1).view(torch.uint8) if b.numel() else b.new_empty(0, dtype=torch.uint8)
    return torch.equal(ua.cpu(), ub.cpu())


def wait_until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``cond()`` (state another thread or process settles) until it holds, failing the
    test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def offload_mixed(m, n: int, seed: int):
    """Offload ``n`` random 512 KiB tensors, every other one released: (handles, tensors,
    copies of their bytes)."""
    gen = torch.Generator().manual_seed(seed)
    ts = [random_tensor((1 << 19,), torch.uint8, generator=gen) for _ in range(n)]
    refs = [t.clone() for t in ts]
    return [m.offload(t, release=i % 2 == 0) for i, t in enumerate(ts)], ts, refs


def fetch_and_check(m, hs, ts, refs) -> None:
    """Fetch every handle of :func:`offload_mixed`: bitwise, a release into its own tensor."""
    for h, t, ref in zip(hs, ts, refs):
        out = m.fetch(h)
        assert same_bytes(out, ref) and (out is t or not h.release)


class Backend:
    """One backend under test: where tensors live and how managers are made on it.

    Attributes
    ----------
    name : str
        ``"emulation"`` or ``"cuda"``.
    device : torch.device
        Device of the tensors (``cpu`` on emulation, ``cuda:0`` on CUDA).
    peer : int
        The peer device tests lend from: emulated device 1, or ``cuda:1`` when a second GPU is
        present, else ``cuda:0`` itself (a same-device "peer": the peer code path on one GPU).
    peer_label : str
        The peer's location as handles report it (``"emu:1"``, ``"cuda:1"``, ``"cuda:0"``).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "cuda":
            self.device = torch.device("cuda", 0)
            self.peer = 1 if torch.cuda.device_count() > 1 else 0
            self.peer_label = f"cuda:{self.peer}"
        else:
            self.device = torch.device("cpu")
            self.peer = 1
            self.peer_label = "emu:1"
        self._made: list[aq.OffloadManager] = []

    @property
    def cuda(self) -> bool:
        return self.name == "cuda"

    def manager(self, peers: object = "peer", **kw: object) -> aq.OffloadManager:
        """An OffloadManager on this backend, closed at teardown. ``peers="peer"`` (default)
        means this backend's test peer; anything else is passed through."""
        if isinstance(peers, str) and peers == "peer":
            peers = [self.peer]
        m = aq.OffloadManager(self.device, peers=peers, **kw)
        self._made.append(m)
        return m

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Random non-zero bits on this backend's device (see :func:`random_tensor`)."""
        return random_tensor(shape, dtype, device=str(self.device), generator=generator)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def close_all(self) -> None:
        for m in self._made:
            m.close()
        self._made.clear()

    def __repr__(self) -> str:
        return self.name


BACKENDS = ["emulation", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    """Every backend: emulation always, CUDA when a GPU is present (marked ``cuda``)."""
    if request.param == "cuda" and _gpu_reason() is not None:
        pytest.skip(_gpu_reason())
    b = Backend(request.param)
    yield b
    b.close_all()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``AQUA_TEST_FAILLOG=path``, each failure's report is appended there as it happens
    (scripts/gpu_check.sh: a suite killed at its time limit still says what failed)."""
    path = os.environ.get("AQUA_TEST_FAILLOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n"
                    f"{report.longreprtext}\n\n")


@pytest.fixture
def manager(backend: Backend):
    """A small manager on every backend: its test peer (1 MiB) and pinned host (4 MiB)."""
    return backend.manager(peer_bytes="1MiB", host_bytes="4MiB")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "emulation_only(reason): runs on the emulation backend only; the reason says "
        "why it has no CUDA case (see helpers.emulation_only)")


@pytest.fixture
def managers(backend: Backend):
    """Factory of managers on every backend (closed at teardown), sized for the store suites:
    ``peer`` bytes on this backend's test peer (``peers="peer"``) and ``host`` pinned bytes;
    other keywords go to OffloadManager."""
    from helpers import HOST, PEER

    def make(peer=PEER, host=HOST, policy="lru", peers="peer", **kw) -> aq.OffloadManager:
        return backend.manager(peers=peers, peer_bytes=peer, host_bytes=host, policy=policy,
                               **kw)

    return make


@pytest.fixture
def faults(backend: Backend):
    """Fault injection into the emulation backend's copy submissions, always reset. The hook
    exists on emulation only: a test using it is emulation-only (helpers.emulation_only)."""
    assert not backend.cuda, "fault injection is an emulation hook: mark the test emulation_only"
    try:
        yield _core.inject_copy_faults
    finally:
        _core.inject_copy_faults(0)


def workers_while(work, n: int, during, join_s: float = 120.0) -> None:
    """Run ``work(seed, stop)`` in ``n`` threads (seeds 0..n-1) while ``during()`` runs in this
    one; then set ``stop`` and fail on a worker that hangs or raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def body(seed: int) -> None:
        try:
            work(seed, stop)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(s,)) for s in range(n)]
    for t in threads:
        t.start()
    try:
        during()
    finally:
        stop.set()
        for t in threads:
            t.join(join_s)
    assert not any(t.is_alive() for t in threads), "hung"
    assert not errors, errors


def run_with_timeout(fn, timeout=120.0):
    """Run fn in a thread: a hang fails the test instead of blocking the suite."""
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


@pytest.fixture
def ledger_path(tmp_path, monkeypatch):
    """A private lending ledger (children spawned with this environment share it), leased in
    1 MiB chunks so a lease spans several segments."""
    path = tmp_path / "ledger"
    monkeypatch.setenv("AQUA_OFFLOAD_LEDGER", str(path))
    monkeypatch.setenv("AQUA_OFFLOAD_LEASE_CHUNK", "1MiB")
    return path


@pytest.fixture
def remote_lender():
    """An in-process NIXL lender on loopback: 16 MiB of host memory in 4 MiB segments, token
    ``remote_helpers.TOKEN``, closed at teardown. Tests using it carry ``needs_nixl``."""
    from remote_helpers import TOKEN

    from aqua_offload.remote import Lender

    with Lender(TOKEN, host_bytes="16MiB", segment_bytes="4MiB") as lender:
        yield lender


@pytest.fixture
def remote_clients():
    """Factory of RemoteClients (``make(address, **kw)``, token ``remote_helpers.TOKEN``,
    deadline 5 s unless given), closed at teardown."""
    from remote_helpers import TOKEN

    from aqua_offload.remote import RemoteClient

    made = []

    def make(address: str, **kw):
        kw.setdefault("deadline_s", 5.0)
        c = RemoteClient(address, kw.pop("token", TOKEN), **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def no_block_cache(monkeypatch):
    """The remote tier gives a block back when its last handle lets go instead of caching it
    (Note [Block cache] in remote/placement.py): for tests of when blocks go back."""
    from aqua_offload.remote import placement

    monkeypatch.setattr(placement, "CACHE_BYTES", 0)


@pytest.fixture
def remote_managers():
    """Factory of emulation managers over in-process lenders (``make(*lenders, host="2MiB",
    peers=None, **kw)``, token ``remote_helpers.TOKEN``), closed at teardown."""
    from remote_helpers import TOKEN

    made: list[aq.OffloadManager] = []

    def make(*lenders, host: str = "2MiB", peers=None, **kw) -> aq.OffloadManager:
        m = aq.OffloadManager("cpu", peers=peers, host_bytes=host,
                              remote=[lender.address for lender in lenders],
                              remote_token=TOKEN, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def lender_managers(remote_managers):
    """``remote_managers`` with a 4 KiB host tier: every tensor of more than 4 KiB goes to a
    lender."""
    return functools.partial(remote_managers, host="4KiB")


# -- HuggingFace suites (test_hf_*.py) ---------------------------------------------------------
@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread. On a loaded 2-core machine, OpenMP threads spinning at
    barriers against another process make every tiny op 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class AllQueued:
    """A stopping criterion shared by the requests of one ``generate_many`` (tests): its first
    call, from the request that got the turn first, waits until the other ``n - 1`` requests
    queue for the turn, so that a zero quantum preempts at the next token whatever the load (on
    a loaded machine a short request can otherwise finish before the others enter). Only the
    turn holder calls it; it never stops a request."""

    def __init__(self, slicer: aq.TimeSlicer, n: int) -> None:
        self.slicer, self.n, self.waited = slicer, n, False

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        if not self.waited:
            self.waited = True
            wait_until(lambda: self.slicer.policy.waiting() >= self.n - 1,
                       what="every request queued for the turn")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.fixture
def small_manager():
    """An emulation manager sized for tiny models' caches (2 MiB peer, 8 MiB host)."""
    m = aq.OffloadManager("cpu", peer_bytes="2MiB", host_bytes="8MiB")
    yield m
    m.close()


@pytest.fixture
def m(small_manager):
    """``small_manager`` by the short name of the TimeSlicer suites (test_timeslice*.py,
    test_slice_state.py)."""
    return small_manager


@pytest.fixture
def checked_manager(small_manager):
    """``small_manager``, and at teardown every handle given back (:func:`check_no_leak`)."""
    yield small_manager
    check_no_leak(small_manager)


def check_no_leak(m: aq.OffloadManager) -> None:
    """Every handle of ``m`` was given back and its tiers are empty."""
    m.synchronize()
    st = m.stats()
    assert st["live_handles"] == 0, "a cache leaked handles"
    assert [t["used"] for t in st["tiers"]] == [0] * len(st["tiers"])
