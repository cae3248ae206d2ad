"""Properties of the built extension itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

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


# The CUDA backend's host code has release-dependent branches (cudaMemcpyBatchAsync: none before
# 12.8, another signature in 12.8/12.9 than in 13). The dev build and the GPU image compile only
# the 13 branch, so CI fetches older releases' headers (NVIDIA's nvidia-cuda-runtime-cu12 and
# nvidia-cuda-nvcc-cu12 wheels, unpacked with `pip install --target`) and names the unpacked
# directories in AQUA_CUDA_HEADERS (os.pathsep-separated): each must compile the backend.
_CPP = Path(__file__).resolve().parents[1] / "cpp"
_HEADER_DIRS = [d for d in os.environ.get("AQUA_CUDA_HEADERS", "").split(os.pathsep) if d]


def _cuda_includes(root: Path) -> list[str]:
    """The include directories of an unpacked CUDA wheel set (runtime + nvcc's crt headers)."""
    dirs = [root / "nvidia" / "cuda_runtime" / "include", root / "nvidia" / "cuda_nvcc" / "include"]
    return [str(d) for d in dirs if d.is_dir()]


def _cudart_version(include: str) -> int:
    text = (Path(include) / "cuda_runtime_api.h").read_text()
    return int(re.search(r"#define CUDART_VERSION\s+(\d+)", text).group(1))


@pytest.mark.skipif(not _HEADER_DIRS, reason="AQUA_CUDA_HEADERS names no older CUDA headers "
                    "(.ci/run fetches 12.6 and 12.9)")
@pytest.mark.parametrize("root", _HEADER_DIRS)
def test_cuda_backend_compiles_against_older_cuda_releases(root):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or not (_CPP / "src" / "cuda").is_dir():
        pytest.skip("no C++ compiler, or not run from a source checkout")
    includes = _cuda_includes(Path(root))
    assert includes, f"{root} holds no unpacked CUDA headers"
    version = _cudart_version(includes[0])
    assert 12000 <= version < 13000, version  # the point: a release the dev build is not
    sources = sorted((_CPP / "src" / "cuda").glob("*.cpp"))
    assert sources
    for src in sources:
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wpedantic", "-Werror",
               "-DAQUA_HAVE_CUDA=1", "-DAQUA_HAVE_CUDA_KERNELS=1", f"-I{_CPP / 'include'}",
               f"-I{_CPP / 'src'}", *[f"-isystem{d}" for d in includes], str(src)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"CUDA {version}: {src.name}\n{done.stderr[-4000:]}"
