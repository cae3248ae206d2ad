"""Scenario files, CSV traces, the JSON report and the command line of the simulator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import aqua_offload

from aqua_offload.sim import ScenarioError, TraceError, load_csv_trace, load_scenario
from aqua_offload.sim.__main__ import main
from aqua_offload.sim.scenario import builtin_scenarios

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """
name = "mini"
quantum_ms = 50
policies = ["admission", "fair"]
tiers = ["host"]
[models.m]
params = 1e9
kv_bytes_per_token = "100KiB"
[[gpus]]
memory = "16GiB"
serves = "m"
[[traces]]
kind = "burst"
requests = 20
prompt_tokens = [100, 300]
output_tokens = 16
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_builtins_load_and_minimal_file_gets_defaults(tmp_path):
    assert {"paper-burst", "long-prompt"} <= set(builtin_scenarios())
    pb = load_scenario("paper-burst")
    assert len(pb.gpus) == 8 and sum(g.lends_bytes > 0 for g in pb.gpus) == 4
    sc = load_scenario(write(tmp_path, MINIMAL))
    assert sc.name == "mini" and sc.quantum_s == pytest.approx(0.05)
    assert sc.models["m"].weights_bytes == 2_000_000_000  # params x 2 bytes by default
    assert sc.models["m"].kv_bytes_per_token == 100 * 1024
    assert len(sc.trace()) == 20 and sc.links.nvlink_bytes_per_s == 370e9


@pytest.mark.parametrize("edit, path", [
    (("quantum_ms = 50", "quantum_ms = 50\nquantom = 3"), "quantom"),
    (('memory = "16GiB"', 'memory = "16GiB"\nlend = "1GiB"'), "gpus[0].lend"),
    (('memory = "16GiB"', 'memory = "-16GiB"'), "gpus[0].memory"),
    (('memory = "16GiB"', "memory = -5"), "gpus[0].memory"),
    (('memory = "16GiB"', 'memory = "1GiB"'), "gpus[0]"),  # weights do not fit
    (("requests = 20", 'requests = "20"'), "traces[0].requests"),
    (("prompt_tokens = [100, 300]", "prompt_tokens = [300, 100]"), "traces[0].prompt_tokens"),
    (('serves = "m"', 'serves = "x"'), "gpus[0].serves"),
    (('tiers = ["host"]', 'tiers = ["disk"]'), "tiers[0]"),
    (('kind = "burst"', 'kind = "zipf"'), "traces[0].kind"),
    (("params = 1e9", "params = true"), "models.m.params"),
])
def test_bad_scenarios_name_the_key(tmp_path, edit, path):
    text = MINIMAL.replace(*edit)
    assert text != MINIMAL
    with pytest.raises(ScenarioError) as exc:
        load_scenario(write(tmp_path, text))
    assert str(exc.value).startswith(path + ":") or str(exc.value).startswith(path + " "), \
        str(exc.value)
    assert isinstance(exc.value, ValueError)


def _toml():
    """The TOML parser the library uses: tomllib (Python >= 3.11), else tomli, else skip."""
    try:
        import tomllib
    except ModuleNotFoundError:
        tomllib = pytest.importorskip("tomli", reason="reading TOML needs Python >= 3.11 or "
                                      "tomli")
    return tomllib


def test_yaml_and_bad_files(tmp_path):
    data = _toml().loads(MINIMAL)
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(write(tmp_path, "name = [", "bad.toml"))
    with pytest.raises(ScenarioError, match="unknown scenario format"):
        load_scenario(write(tmp_path, "x", "s.json"))
    with pytest.raises(ScenarioError, match="not a file"):
        load_scenario(tmp_path / "missing.toml")
    yaml = pytest.importorskip("yaml")  # last: the TOML checks above run without PyYAML
    sc = load_scenario(write(tmp_path, yaml.safe_dump(data), "s.yaml"))
    assert sc.name == "mini"
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(write(tmp_path, "x: [1\n", "bad.yaml"))
    # YAML reads `1:` as an int key: named, not a TypeError
    with pytest.raises(ScenarioError, match=r"^models\.1: a model name must be a string"):
        load_scenario(write(tmp_path, "models:\n  1: {params: 1, kv_bytes_per_token: 1}\n"
                            "gpus: [{memory: 100000, serves: '1'}]\n"
                            "traces: [{kind: burst, requests: 2}]\n", "intkey.yaml"))


def test_files_that_are_not_utf8_raise_typed_errors(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_bytes(b"name = \"x\"\n\xff\xfe\n")
    with pytest.raises(ScenarioError, match="not UTF-8"):
        load_scenario(bad)
    csv_file = tmp_path / "t.csv"
    csv_file.write_bytes(b"arrival_s,prompt_tokens,output_tokens\n0,1,\xff\n")
    with pytest.raises(TraceError, match="not UTF-8"):
        load_csv_trace(csv_file)


@pytest.mark.parametrize("edit, path", [
    (("requests = 20", "requests = 100000000"), "traces[0].requests"),
    (('serves = "m"', 'serves = "m"\ncount = 100000000'), "gpus[0].count"),
])
def test_huge_sizes_are_refused_at_load(tmp_path, edit, path):
    with pytest.raises(ScenarioError, match=r"^" + re.escape(path) + ": must be <="):
        load_scenario(write(tmp_path, MINIMAL.replace(*edit)))


@pytest.mark.parametrize("extra", ["at_s = 1.7e308\nwindow_s = 1.7e308",
                                   'kind = "poisson"\nrate_per_s = 1e-320'])
def test_trace_build_errors_name_the_stream(tmp_path, extra):
    text = MINIMAL + "[[traces]]\nrequests = 3\n" + (
        extra if "kind" in extra else 'kind = "burst"\n' + extra)
    sc = load_scenario(write(tmp_path, text))
    with pytest.raises(ScenarioError, match=r"^traces\[1\]: arrival_s must be a finite"):
        sc.trace()


def test_a_csv_trace_is_read_once_at_load(tmp_path):
    csv_file = write(tmp_path, "arrival_s,prompt_tokens,output_tokens\n0,10,4\n", "t.csv")
    text = MINIMAL.replace('kind = "burst"\nrequests = 20\nprompt_tokens = [100, 300]\n'
                           'output_tokens = 16', 'kind = "csv"\npath = "t.csv"')
    sc = load_scenario(write(tmp_path, text))
    csv_file.unlink()  # the scenario holds the requests it checked
    assert [r.prompt_tokens for r in sc.trace()] == [10]


def test_csv_trace_and_its_errors(tmp_path):
    good = write(tmp_path, "# a trace\narrival_s,prompt_tokens,output_tokens\n0.5,10,4\n\n"
                 "0.1,20,8\n", "t.csv")
    trace = load_csv_trace(good)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace] == \
        [(0.1, 20, 8), (0.5, 10, 4)]
    cases = {
        "arrival_s,prompt_tokens\n0,1\n": "missing",
        "arrival_s,prompt_tokens,output_tokens,colour\n0,1,1,red\n": "unknown columns",
        "arrival_s,prompt_tokens,output_tokens\n0,ten,4\n": ":2: prompt_tokens",
        "arrival_s,prompt_tokens,output_tokens\n0,1,4\n-1,1,4\n": ":3: arrival_s",
        "arrival_s,prompt_tokens,output_tokens\n0,0,4\n": ":2:",
        "arrival_s,prompt_tokens,output_tokens\n0,1\n": "expected 3 fields",
        "arrival_s,prompt_tokens,output_tokens\n": "no requests",
    }
    for k, (text, match) in enumerate(cases.items()):
        with pytest.raises(TraceError, match=match):
            load_csv_trace(write(tmp_path, text, f"bad{k}.csv"))
    # a scenario naming a bad CSV fails at load time with the key path
    sc_text = MINIMAL.replace('kind = "burst"\nrequests = 20\nprompt_tokens = [100, 300]\n'
                              'output_tokens = 16', 'kind = "csv"\npath = "bad2.csv"')
    with pytest.raises(ScenarioError, match=r"^traces\[0\].path"):
        load_scenario(write(tmp_path, sc_text))
    ok = load_scenario(write(tmp_path, sc_text.replace("bad2.csv", "t.csv")))
    assert len(ok.trace()) == 2


def test_cli_json_plot_and_exit_codes(tmp_path, capsys):
    scen = write(tmp_path, MINIMAL)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main([str(scen), "--json", str(out), "--plot", str(png), "--seed", "3"]) == 0
    table = capsys.readouterr().out
    assert "admission" in table and "fair" in table
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "mini"
    keys = {"policy", "tier", "ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "paged_bytes",
            "paging_s"}
    assert [set(r) for r in doc["results"]] == [keys, keys]
    assert [(r["policy"], r["tier"]) for r in doc["results"]] == [("admission", None),
                                                                  ("fair", "host")]
    assert all(r["ttft_p50_s"] <= r["ttft_p99_s"] for r in doc["results"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # bad scenario: message on stderr, status 2, no traceback
    bad = write(tmp_path, MINIMAL.replace("quantum_ms = 50", "quantum_ms = -1"), "bad.toml")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "quantum_ms" in err and "Traceback" not in err
    assert main(["no-such-scenario"]) == 2
    assert main(["--list"]) == 0 and "paper-burst" in capsys.readouterr().out
    assert main([str(scen), "--policies", "fcfs", "--quantum-ms", "30"]) == 0
    with pytest.raises(SystemExit):
        main([str(scen), "--policies", "lottery"])


def test_cli_checks_outputs_before_simulating(tmp_path, capsys, monkeypatch):
    scen = write(tmp_path, MINIMAL)

    def refused(args, match):
        assert main([str(scen), *args]) == 2
        out, err = capsys.readouterr()
        assert re.search(match, err) and "Traceback" not in err, err
        assert "admission" not in out  # nothing was simulated

    refused(["--plot", str(tmp_path / "r.txt")], r"unknown image format '\.txt'")
    refused(["--plot", str(tmp_path / "r")], "unknown image format")
    refused(["--json", str(tmp_path)], "is a directory")
    blocker = write(tmp_path, "", "file")  # a parent that is a file cannot be made
    refused(["--json", str(blocker / "r.json")], "cannot create")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    refused(["--plot", str(tmp_path / "r.png")], "needs matplotlib")
    monkeypatch.undo()
    # missing parent folders are made; svg and pdf are formats matplotlib writes
    out = tmp_path / "new" / "deeper" / "r.json"
    assert main([str(scen), "--policies", "fcfs", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["scenario"] == "mini"
    svg = tmp_path / "plots" / "r.svg"
    assert main([str(scen), "--policies", "fcfs", "--plot", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:400]
    jpg = tmp_path / "plots" / "r.jpg"  # any format matplotlib writes, not only png/pdf/svg
    assert main([str(scen), "--policies", "fcfs", "--plot", str(jpg)]) == 0
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"


def test_importing_the_package_does_not_import_the_simulator():
    code = ("import sys, aqua_offload; assert 'aqua_offload.sim' not in sys.modules; "
            "import aqua_offload.sim.__main__; assert 'matplotlib' not in sys.modules")
    # the aqua_offload this suite imported (an install in CI, src/ with the built extension here)
    package_root = str(Path(aqua_offload.__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={"PYTHONPATH": package_root, "PATH": "/usr/bin:/bin"})
