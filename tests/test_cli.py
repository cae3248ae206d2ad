"""The ``aqua-offload`` console script: info, bench through it, plots, NVLink topology."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import aqua_offload as aq
from aqua_offload import nvml
from aqua_offload.bench import plot
from aqua_offload.cli import main

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_info_text_names_backend_devices_and_live_pools(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    with aq.OffloadManager("cpu", peers=["emu:1"], peer_bytes="3MiB", host_bytes="5MiB"):
        assert main(["info"]) == 0
    out = capsys.readouterr().out
    data = aq.info()
    assert f"backend: {data['backend']}" in out
    for d in data["devices"]:
        assert d["label"] in out and d["name"] in out
    assert "peer access" in out and "NVLink" in out
    assert "3.00 MiB" in out and "5.00 MiB" in out  # the live manager's pools
    assert f"torch {data['versions']['torch']}" in out


def test_info_json_to_stdout_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] in ("cuda", "emulation")
    n = len(data["devices"])
    assert len(data["peer_access"]) == n and all(len(r) == n for r in data["peer_access"])
    assert data["default_pools"]["host_bytes"] > 0
    assert data["versions"]["aqua_offload"] == aq.__version__
    if data["backend"] == "emulation":
        assert data["nvlink"] == {"available": False, "reason": "no GPU (emulation backend)"}
    out = tmp_path / "deep" / "info.json"
    assert main(["info", "--json", out]) == 0
    assert json.loads(out.read_text())["devices"] == data["devices"]
    assert "backend:" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert main(["info", "--json", tmp_path / "file" / "info.json"]) == 2
    assert "file" in capsys.readouterr().err


def test_version_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and aq.__version__ in capsys.readouterr().out
    for argv in ([], ["bench"], ["bench", "nope"], ["bench", "copy", "--samples", "1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


def test_bench_copy_through_the_cli_writes_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "copy.json", tmp_path / "plots" / "copy.png"
    rc = main(["bench", "copy", "--backend", "emulation", "--sizes", "4KiB", "64KiB",
               "--samples", "3", "--no-progress", "--no-overlap", "--json", out, "--plot", png])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["bytes"] for r in rows if r["direction"] == "device_to_host"} == {4096, 65536}
    assert not any(r["direction"].startswith("overlap_") for r in rows)
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000


def _fake(kind: str) -> dict:
    rows = [{"method": m, "direction": "roundtrip", "bytes": 4096, "median_s": t, "min_s": t,
             "max_s": t, "gbps": 4096 / t / 1e9, "tok_s": 1 / t, "baseline": "a",
             "ratio": 1e-3 / t, "device": "dev", "backend": "emulation"}
            for m, t in (("a", 1e-3), ("b", 2e-3))]
    return {"device": "dev", "backend": "emulation", "label": "EMULATION", "rows": rows,
            "requests": {"fcfs/None": [0.3, 0.1, 0.2], "fair/host": [0.05, 0.1, 0.08]}}


@pytest.mark.parametrize("kind", ["tiers", "hf", "burst"])
def test_every_benchmark_plots(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    plot.plot_result(kind, _fake(kind), path)
    assert path.read_bytes().startswith(PNG)


def test_plot_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="no plot for benchmark"):
        plot.plot_result("nope", _fake("hf"), tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.plot_result("hf", _fake("hf"), tmp_path / "x.png")
    rc = main(["bench", "copy", "--backend", "emulation", "--sizes", "4KiB", "--samples", "3",
               "--no-progress", "--no-overlap", "--plot", tmp_path / "y.png"])
    captured = capsys.readouterr()
    assert rc == 2 and "pip install matplotlib" in captured.err
    assert captured.out == ""  # refused before the run, not after it
    assert not (tmp_path / "y.png").exists()


def test_unwritable_output_is_refused_before_the_run(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = main(["bench", "copy", "--backend", "emulation", "--sizes", "4KiB", "--samples", "3",
               "--no-progress", "--no-overlap", "--json", blocker / "out.json"])
    captured = capsys.readouterr()
    assert rc == 2 and str(blocker) in captured.err and captured.out == ""


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import aqua_offload.sim.__main__ as sim_main
    from aqua_offload.bench import copy as copy_bench
    from aqua_offload.bench.__main__ import main as bench_main

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as Ctrl-C does, wherever the run is

    monkeypatch.setattr(copy_bench, "run_copy_benchmark", interrupt)
    monkeypatch.setattr(sim_main, "run", interrupt)
    copy_args = ["copy", "--backend", "emulation", "--sizes", "4KiB", "--samples", "3",
                 "--no-progress"]
    for run, argv, prog in ((main, ["bench", *copy_args], "aqua-offload"),
                            (bench_main, copy_args, "python -m aqua_offload.bench"),
                            (main, ["sim", "--list"], "aqua-offload"),
                            (sim_main.main, ["--list"], "python -m aqua_offload.sim")):
        assert run(argv) == 130
        captured = capsys.readouterr()
        assert captured.err == f"{prog}: interrupted\n" and captured.out == ""


def test_ctrl_c_stops_a_parallel_sweep_without_tracebacks() -> None:
    # The whole process group gets SIGINT, as from a terminal: the sweep's workers too.
    proc = subprocess.Popen(
        [sys.executable, "-m", "aqua_offload", "sim", "sweep", "--jobs", "2", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), start_new_session=True,
        # a shell's background job ignores SIGINT, and Python would then keep ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(4)  # the default grid runs for minutes: well inside it, workers started
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "python -m aqua_offload: interrupted"
    assert out == ""


@pytest.mark.parametrize("argv,message", [
    (["copy", "--plot", "{tmp}/copy.txt"], "unknown image format '.txt'"),
    (["copy", "--json", "{tmp}"], "is a directory"),
    (["hf", "--model", "{tmp}/no-such-model"], "is not a preset (tiny, small)"),
    (["burst", "--model", "no such model"], "no local checkpoint loads"),
])
def test_bench_refuses_what_would_fail_with_one_line_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        message: str) -> None:
    # Each was a traceback (matplotlib's ValueError after the whole run, transformers' OSError).
    quick = ["--sizes", "4KiB", "--samples", "3", "--no-progress", "--no-overlap"] \
        if argv[0] == "copy" else ["--quick", "--no-progress"]
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["bench", *argv, "--backend", "emulation", *quick]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # nothing was measured
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag,value", [("--quantum-ms", "-1"), ("--quantum-ms", "nan"),
                                        ("--spread-s", "-0.5"), ("--spread-s", "inf")])
def test_bench_burst_refuses_negative_times_as_usage_errors(
        capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exc:  # was InvalidArgumentError from inside the run
        main(["bench", "burst", "--quick", "--backend", "emulation", f"{flag}={value}"])
    assert exc.value.code == 2 and "expected a finite number >= 0" in capsys.readouterr().err


def test_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert 'aqua-offload = "aqua_offload.cli:main"' in scripts


def test_python_dash_m_runs_the_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "aqua_offload", "info", "--json", "-"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["versions"]["aqua_offload"] == aq.__version__


def test_installed_console_script_runs() -> None:
    exe = shutil.which("aqua-offload")
    if exe is None:
        pytest.skip("aqua-offload is not installed (a source tree run); CI installs it")
    proc = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backend:" in proc.stdout and "peer access" in proc.stdout


# -- NVLink topology from a fake NVML ----------------------------------------------------------

class _FakeNvml:
    """NVML's C calls for GPUs at ``gpus`` (PCI addresses) with ``links[gpu] = [remote|None]``."""

    def __init__(self, gpus: list[str], links: dict[int, list[str | None]]) -> None:
        self.gpus, self.links, self.shutdown = gpus, links, 0

    def nvmlInit_v2(self) -> int:
        return 0

    def nvmlShutdown(self) -> int:
        self.shutdown += 1
        return 0

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus: bytes, handle: object) -> int:
        known = [nvml._normalize(g) for g in self.gpus]
        if bus.decode() not in known:
            return 2
        handle._obj.value = known.index(bus.decode()) + 1  # type: ignore[attr-defined]
        return 0

    def _link(self, handle: ctypes.c_void_p, link: int) -> str | None | int:
        mine = self.links.get(handle.value - 1, [])
        return mine[link] if link < len(mine) else -1

    def nvmlDeviceGetNvLinkState(self, handle: ctypes.c_void_p, link: int, out: object) -> int:
        remote = self._link(handle, link)
        if remote == -1:
            return 2  # NVML_ERROR_INVALID_ARGUMENT: no such link
        out._obj.value = int(remote is not None)  # type: ignore[attr-defined]
        return 0

    def nvmlDeviceGetNvLinkRemotePciInfo_v2(self, handle: ctypes.c_void_p, link: int,
                                            out: object) -> int:
        out._obj.busId = str(self._link(handle, link)).removeprefix("gpu:").encode()  # type: ignore[attr-defined]
        return 0

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: ctypes.c_void_p, link: int,
                                            out: object) -> int:
        remote = str(self._link(handle, link))
        out._obj.value = 0 if remote.startswith("gpu:") else 2  # type: ignore[attr-defined]
        return 0


def test_nvlink_direct_links_switches_and_down_links() -> None:
    a, b, c = "0000:19:00.0", "0000:3B:00.0", "00000000:4c:00.0"
    # GPU 0: two links to b, one down, one to a switch, one to a GPU hidden from CUDA
    lib = _FakeNvml([a, b, c], {0: [b, b, None, "0000:99:00.0", "gpu:0000:77:00.0"],
                                1: [a, a], 2: ["0000:aa:00.0"]})
    topo = nvml.nvlink_topology([a, b.lower(), "4c:00.0"], lib=lib)
    assert topo["available"] and lib.shutdown == 1
    assert topo["links"] == [[0, 2, 0], [2, 0, 0], [0, 0, 0]]
    assert topo["switch_links"] == [1, 0, 1]
    assert topo["matrix"] == [["X", "NV2", "NVSW"], ["NV2", "X", "-"], ["NVSW", "-", "X"]]
    # an NVML without the remote type: anything not ours counts as a switch
    del _FakeNvml.nvmlDeviceGetNvLinkRemoteDeviceType
    try:
        older = nvml.nvlink_topology([a, b, c], lib=_FakeNvml([a, b, c], lib.links))
    finally:
        _FakeNvml.nvmlDeviceGetNvLinkRemoteDeviceType = _remote_type
    assert older["switch_links"] == [2, 0, 1]


_remote_type = _FakeNvml.nvmlDeviceGetNvLinkRemoteDeviceType


def test_nvlink_unknown_is_reported_not_raised() -> None:
    assert nvml.nvlink_topology([])["available"] is False
    missing = nvml.nvlink_topology(["0000:19:00.0"], lib=_FakeNvml(["0000:20:00.0"], {}))
    assert missing == {"available": False, "reason": "NVML has no device at PCI 00000000:19:00.0"}
    assert nvml.nvlink_topology(["garbage"])["available"] is False

    class Old:  # an NVML without the PCI-bus lookup
        shutdown = 0

        def nvmlInit_v2(self) -> int:
            return 0

        def nvmlShutdown(self) -> int:
            self.shutdown += 1
            return 0

    old = Old()
    topo = nvml.nvlink_topology(["0000:19:00.0"], lib=old)
    assert topo["available"] is False and "lacks a function" in topo["reason"]
    assert old.shutdown == 1


def test_help_names_every_benchmark_and_shows_no_rest_markup(
        capsys: pytest.CaptureFixture[str]) -> None:
    from aqua_offload.bench.__main__ import build_parser as bench_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    bench_line = next(line for line in capsys.readouterr().out.splitlines()
                      if line.strip().startswith("bench "))
    names = bench_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert all(name in bench_line for name in names), (bench_line, list(names))
    for command in ("sim", "lending", "lend", *(["bench", name] for name in names)):
        argv = [command] if isinstance(command, str) else command
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":class:" not in out and ":meth:" not in out, command


def test_sim_and_lending_are_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--list"]) == 0
    out = capsys.readouterr().out
    assert "paper-burst" in out and "long-prompt" in out
    with pytest.raises(SystemExit) as exc:
        main(["lending", "--help"])
    assert exc.value.code == 0 and "ledger" in capsys.readouterr().out


def test_bench_reports_only_an_unknown_model_as_a_usage_error(monkeypatch) -> None:
    """Another InvalidArgumentError from inside a run is a bug: its traceback must show, not
    an exit status 2 that blames the command line."""
    from aqua_offload.bench import hf
    from aqua_offload.errors import InvalidArgumentError

    def broken(*args, **kwargs):
        raise InvalidArgumentError("a library bug")

    monkeypatch.setattr(hf, "build_model", broken)
    with pytest.raises(InvalidArgumentError, match="a library bug"):
        main(["bench", "hf", "--quick", "--no-progress", "--backend", "emulation"])
