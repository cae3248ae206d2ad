"""The regime map: cell memory layout, the grid's JSON, its regimes and its command line."""

from __future__ import annotations

import json
import sys

import pytest

from aqua_offload.errors import InvalidArgumentError
from aqua_offload.sim.__main__ import main
from aqua_offload.sim.sweep import (QUICK_GRID, SweepBase, SweepGrid, cell_scenario, run_cell,
                                    run_sweep)

BASE = SweepBase()
CONFIGS = ["admission", "fcfs", "rr/host", "rr/peer", "fair/host", "fair/peer"]


def test_capacity_is_demand_over_pressure_and_never_below_one_request():
    sc, mem = cell_scenario(BASE, 4, (100, 100), (28, 28), 2.0)
    kv = BASE.model.kv_bytes_per_token
    assert mem["kv_demand_bytes"] == 4 * 128 * kv
    assert mem["kv_capacity_bytes"] == 2 * 128 * kv and mem["pressure"] == 2.0
    g = sc.gpus[0]
    assert g.memory_bytes - BASE.model.weights_bytes - g.reserved_bytes == 2 * 128 * kv
    assert sc.gpus[1].lends_bytes == BASE.lends_bytes
    # pressure 100 on 4 requests would leave room for less than one: clamped to one request
    _, mem = cell_scenario(BASE, 4, (100, 100), (28, 28), 100.0)
    assert mem["kv_capacity_bytes"] == 128 * kv and mem["pressure"] == 4.0
    assert mem["fits_gpu"]


def test_a_burst_that_fits_gains_nothing():
    grid = SweepGrid((8,), ((64, 128),), ((16, 32),), (1.0,))
    cell = run_cell(BASE, grid, grid.cells()[0])
    assert set(cell["results"]) == set(CONFIGS)
    for row in cell["results"].values():
        assert row["preemptions"] == 0 and row["paged_bytes"] == 0
        assert row["p99_gain"] == 1.0 and row["throughput_ratio"] == 1.0


def test_long_outputs_under_pressure_pass_10x_and_long_prompts_do_not():
    grid = SweepGrid((32,), ((64, 256), (1024, 4096)), ((768, 1280), (32, 96)), (4.0,))
    cells = {(c["prompt_tokens"][0], c["output_tokens"][0]): c
             for c in run_sweep(grid, jobs=1, progress=False)["cells"]}
    short_long = cells[(64, 768)]["results"]
    assert short_long["fair/peer"]["p99_gain"] > 20 and short_long["rr/peer"]["p99_gain"] > 10
    # prefill compute bounds TTFT when prompts are long and outputs short: no scheduler helps
    assert cells[(1024, 32)]["best"]["p99_gain"] < 3
    # fcfs never preempts: it must agree with the admission queue (different code)
    for c in cells.values():
        assert c["results"]["fcfs"]["ttft_p99_s"] == c["results"]["admission"]["ttft_p99_s"]


def test_cli_quick_json_on_stdout_holds_every_cell_and_configuration(capsys):
    assert main(["sweep", "--quick", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["cells"]) == len(QUICK_GRID.cells()) == 12
    assert doc["configs"] == CONFIGS
    for cell in doc["cells"]:
        for c in CONFIGS:
            row = cell["results"][c]
            assert row["ttft_p99_s"] > 0 and row["throughput_tok_s"] > 0
            assert row["p99_gain"] == pytest.approx(
                cell["results"]["admission"]["ttft_p99_s"] / row["ttft_p99_s"])
    s = doc["summary"]["fair/peer"]
    assert s["cells"] == 12 and s["p99_gain_ge_10x"] >= 1 and s["max_p99_gain"] >= 10


def test_cli_plot_and_parallel_jobs_agree(tmp_path, capsys):
    png, out = tmp_path / "map.png", tmp_path / "map.json"
    args = ["sweep", "--quick", "--requests", "12", "--pressures", "3", "--no-progress"]
    assert main(args + ["--plot", str(png), "--json", str(out)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = json.loads(out.read_text())
    assert main(args + ["--jobs", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["cells"] == one["cells"]


def test_bad_grids_are_refused():
    with pytest.raises(InvalidArgumentError, match="pressures axis is empty"):
        SweepGrid((8,), ((1, 2),), ((1, 2),), ())
    with pytest.raises(InvalidArgumentError, match="finite and > 0"):
        SweepGrid((8,), ((1, 2),), ((1, 2),), (0.0,))
    with pytest.raises(InvalidArgumentError, match="low <= high"):
        SweepGrid((8,), ((5, 2),), ((1, 2),), (1.0,))
    with pytest.raises(InvalidArgumentError, match="admission"):
        SweepGrid((8,), ((1, 2),), ((1, 2),), (1.0,), policies=("fair",))
    with pytest.raises(InvalidArgumentError, match="jobs"):
        run_sweep(QUICK_GRID, jobs=0)
    with pytest.raises(SystemExit):
        main(["sweep", "--pressures", "0"])


_INTERRUPTED_SWEEP = r"""
import os, signal, sys, threading, time
import aqua_offload.sim.sweep as sweep

class Pool(sweep.ProcessPoolExecutor):
    def map(self, *args, **kwargs):
        it = super().map(*args, **kwargs)  # every cell submitted, the workers started
        print(*[p.pid for p in self._processes.values()], flush=True)
        threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C, in a cell
        return it

sweep.ProcessPoolExecutor = Pool
grid = sweep.SweepGrid(requests=(2048,), prompts=((64, 256),), outputs=((768, 1280),),
                       pressures=(1.0, 2.0, 4.0, 8.0))  # each cell about 30 s on 2 cores
try:
    sweep.run_sweep(grid, jobs=2, progress=False)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_stops_the_running_cells_instead_of_waiting_for_them():
    # The pool's shutdown waited for the cells already running (and the one queued behind
    # them): seconds to minutes after Ctrl-C, with workers that ignore SIGINT.
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_SWEEP], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert len(workers) == 2 and "interrupted" in out, (out, err)
    assert took < 15, f"the sweep ended {took:.0f} s after its workers started"
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "workers left running"


_FORK_SERVER_SIGINT = r"""
from multiprocessing import forkserver
import aqua_offload.sim.sweep as sweep

sweep._workers()
pid = forkserver._forkserver._forkserver_pid  # at once: it is still importing the sweep
with open(f"/proc/{pid}/status") as f:
    print(next(line.split()[1] for line in f if line.startswith("SigIgn:")), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_the_fork_server_ignores_ctrl_c_while_it_imports_the_sweep():
    # It set SIGINT to ignored only after importing its preload (torch: a second or more,
    # more on a loaded machine); a Ctrl-C then printed its KeyboardInterrupt traceback under
    # the sweep's one line, and its workers inherited the handler until their initializer.
    import os
    import signal
    import subprocess

    out = subprocess.run([sys.executable, "-c", _FORK_SERVER_SIGINT], capture_output=True,
                         text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stderr
    assert int(out.stdout, 16) & (1 << (signal.SIGINT - 1)), f"SigIgn {out.stdout.strip()}"


_INTERRUPTED_LAUNCH = r"""
import os, signal
import multiprocessing.popen_forkserver as popen
import aqua_offload.sim.sweep as sweep

launch = popen.Popen._launch

def _launch(self, process_obj):
    launch(self, process_obj)  # the fork server made the worker and sent it its start
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C before the pool has recorded it

popen.Popen._launch = _launch
try:
    sweep.run_sweep(sweep.QUICK_GRID, jobs=2, progress=False)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="the sweep's workers come from a fork server")
def test_ctrl_c_while_a_worker_starts_leaves_no_half_started_worker():
    # Interrupted there, the pool lost the worker; it outlived the caller and failed to read
    # its start (FileNotFoundError from a semaphore the caller had removed), a traceback.
    import os
    import subprocess

    out = subprocess.run([sys.executable, "-c", _INTERRUPTED_LAUNCH], capture_output=True,
                         text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.stdout == "interrupted\n" and "Traceback" not in out.stderr, out.stderr
