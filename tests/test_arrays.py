"""numpy, CuPy and DLPack arrays are offloaded as snapshots and come back as the same kind of
array, dtype and shape, bitwise equal."""

from __future__ import annotations

import numpy as np
import pytest

import aqua_offload as aq


def _random(shape, dtype, seed=0):
    raw = np.random.default_rng(seed).integers(1, 256, size=int(np.prod(shape)) *
                                               np.dtype(dtype).itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint16, np.uint32,
                                   np.bool_, np.complex128, "datetime64[ns]", ">i4",
                                   np.dtype([("a", np.int8), ("b", np.float64)])], ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5, 2)], ids=str)
def test_numpy_round_trip(manager, dtype, shape):
    if manager.device.type != "cpu":
        pytest.skip("numpy arrays on a CUDA manager: see test_numpy_on_a_cuda_manager")
    a = _random(shape, dtype) if np.dtype(dtype) != np.bool_ else _random(shape, np.uint8) % 2 == 1
    h = manager.offload(a, release=False)
    out = manager.fetch(h)
    assert type(out) is np.ndarray and out.dtype == a.dtype and out.shape == a.shape
    assert out.tobytes() == a.tobytes()


def test_numpy_views_read_only_and_batches(manager):
    if manager.device.type != "cpu":
        pytest.skip("emulation manager")
    base = _random((8, 6), np.float64, seed=3)
    view = base[::2, 1:]  # non-contiguous
    ro = _random((5,), np.int32, seed=4)
    ro.flags.writeable = False
    hs = manager.offload_many([view, ro], release=False)
    base[:] = 0  # the snapshot is taken: later writes do not reach it
    out = manager.fetch_many(hs)
    assert out[0].tobytes() == np.ascontiguousarray(_random((8, 6), np.float64, 3)[::2, 1:]).tobytes()
    assert out[1].tobytes() == ro.tobytes()


def test_arrays_are_snapshots_only_and_object_arrays_are_refused(manager):
    if manager.device.type != "cpu":
        pytest.skip("emulation manager")
    with pytest.raises(aq.InvalidArgumentError, match="snapshots"):
        manager.offload(np.zeros(3))
    with pytest.raises(aq.InvalidArgumentError, match="object"):
        manager.offload(np.array([object()]), release=False)
    with pytest.raises(aq.InvalidArgumentError, match="masked"):  # the mask would be lost
        manager.offload(np.ma.masked_array(np.arange(1.0, 4.0), mask=[0, 1, 0]), release=False)
    assert manager.stats()["offloads"] == 0


def test_prefetched_array_snapshot(manager):
    if manager.device.type != "cpu":
        pytest.skip("emulation manager")
    a = _random((33,), np.float32, seed=5)
    h = manager.prefetch(manager.offload(a, release=False))
    assert manager.fetch(h).tobytes() == a.tobytes()


@pytest.mark.cuda
def test_numpy_on_a_cuda_manager():
    with aq.OffloadManager("cuda:0", peers=None, host_bytes="16MiB") as m:
        a = _random((4, 5), np.float32)
        out = m.fetch(m.offload(a, release=False))
        assert type(out) is np.ndarray and out.tobytes() == a.tobytes()


@pytest.mark.cuda
def test_cupy_round_trip():
    cupy = pytest.importorskip("cupy")
    with aq.OffloadManager("cuda:0", peers=[0], peer_bytes="16MiB", host_bytes="16MiB") as m:
        for dtype in (cupy.float32, cupy.float16, cupy.int8, cupy.uint16, cupy.complex64):
            a = cupy.asarray(_random((3, 7), np.dtype(dtype)))
            out = m.fetch(m.offload(a, release=False))
            assert isinstance(out, cupy.ndarray) and out.dtype == a.dtype
            assert out.shape == a.shape and bytes(out.get().tobytes()) == bytes(a.get().tobytes())
        with pytest.raises(aq.InvalidArgumentError):
            m.offload(cupy.zeros(3))  # snapshots only
