"""Properties of the built extension itself."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import aqua_offload as aq
from aqua_offload import _core


def test_extension_needs_no_cuda_library():
    """The CUDA runtime is linked statically: the module must load with no CUDA libraries."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run([readelf, "-d", _core.__file__], capture_output=True, text=True,
                         check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert needed, out  # libc at least: the parse works
    assert not [lib for lib in needed if "cuda" in lib.lower() or "nvidia" in lib.lower()], needed


def test_cuda_backend_without_a_driver_reports_no_devices():
    if not _core.cuda_compiled():
        with pytest.raises(aq.BackendError, match="not compiled"):
            _core.backend_info("cuda")
        return
    info = _core.backend_info("cuda")
    assert info["name"] == "cuda" and info["emulation"] is False
    assert info["device_count"] == len(info["devices"]) >= 0
    if info["device_count"] == 0:  # the reason is said, and a store names it
        assert "cudaError" in info["status"]
        with pytest.raises(aq.BackendError, match="no device") as err:
            _core.Store("cuda", 0, [], 1 << 20)
        assert info["status"] in str(err.value)
    else:
        assert info["status"] == ""


def test_emulation_backend_describes_itself():
    info = _core.backend_info("emulation")
    assert info["emulation"] is True and info["device_count"] >= 2
    assert [d["label"] for d in info["devices"]][:2] == ["emu:0", "emu:1"]


def test_unknown_backend_name():
    with pytest.raises(aq.InvalidArgumentError, match="unknown backend"):
        _core.backend_info("opencl")
