"""Note [No stray contexts] (cpp/include/aqua/backend.hpp): a thread that never used CUDA and
calls into a manager of cuda:1 must not create a context on GPU 0."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.cuda

SCRIPT = textwrap.dedent("""
    import ctypes, threading, torch, aqua_offload as aq
    cuda = ctypes.CDLL("libcuda.so.1")
    assert cuda.cuInit(0) == 0

    def primary_active(ordinal):
        dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        assert cuda.cuDeviceGet(ctypes.byref(dev), ordinal) == 0
        assert cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) == 0
        return bool(active.value)

    torch.cuda.set_device(1)
    t = torch.randn(1 << 20, device="cuda:1")
    ref = t.clone()
    m = aq.OffloadManager("cuda:1", peers=None, host_bytes="64MiB")
    assert not primary_active(0), "GPU 0 has a context before the test"
    out = {}

    def fresh_thread():  # never used CUDA before this call
        h = m.offload(t, release=False)
        h.wait()
        out["same"] = torch.equal(m.fetch(h), ref)
        m.synchronize()
        m.stats()

    th = threading.Thread(target=fresh_thread)
    th.start(); th.join()
    m.close()
    print(out["same"], primary_active(0))
""")


def test_no_context_on_gpu0_from_a_fresh_thread():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (a compute device other than 0)")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False"]
