"""The placer: loans computed by hand, exact vs greedy search, typed errors, NVLink domains in
the simulated server, and ``sim place`` beating the naive placement on its own example."""

from __future__ import annotations

import json

import pytest

from aqua_offload.errors import InvalidArgumentError, OffloadError
from aqua_offload.sim import ScenarioError, simulate
from aqua_offload.sim.__main__ import main
from aqua_offload.sim.placer import (PlacedModel, PlacementError, PlacementProblem, ServerSpec,
                                     evaluate, load_problem, naive_placement, parse_problem,
                                     place, placement_scenario)

GiB, MiB = 1 << 30, 1 << 20


def problem(big_replicas: int = 2, small_replicas: int = 2, gpus: int = 4,
            big_weights: int = 3 * GiB) -> PlacementProblem:
    """GPUs of 10 GiB (1 reserved) in NVLink domains of two. big: 3 GiB of weights leaves
    6 GiB of KV; its burst of 16 x 512 tokens x 1 MiB needs 8 GiB: a 2 GiB deficit. small:
    1 GiB of weights leaves 8 GiB; it needs 1 x 512 x 1 MiB = 0.5 GiB: 7.5 GiB spare."""
    server = ServerSpec((10 * GiB,) * gpus, tuple(g // 2 for g in range(gpus)), 1 * GiB)
    big = PlacedModel("big", 13e9, big_weights, MiB, big_replicas, 16, (400, 400), (112, 112),
                      slo_s=2.0)
    small = PlacedModel("small", 1e8, 1 * GiB, MiB, small_replicas, 1, (256, 256), (256, 256),
                        slo_s=1.0)
    return PlacementProblem("hand", server, (big, small), window_s=0.0)


def test_naive_puts_borrowers_where_no_lender_reaches():
    p = naive_placement(problem())
    assert p.gpu_model == ["big", "big", "small", "small"]
    assert p.deficit == {0: 2 * GiB, 1: 2 * GiB}
    assert p.loans == {}  # the lenders sit in the other NVLink domain
    assert p.uncovered == {0: 2 * GiB, 1: 2 * GiB}
    assert p.cost == (4 * GiB / 2.0, 4 * GiB, 0)


def test_exact_mixes_the_domains_and_covers_every_deficit():
    p = place(problem())
    assert p.method == "exact"
    assert [p.gpu_model[0:2].count("big"), p.gpu_model[2:4].count("big")] == [1, 1]
    assert sum(p.uncovered.values()) == 0 and p.cost[0] == 0
    assert sorted(p.loans.values()) == [2 * GiB, 2 * GiB]
    for (lender, borrower), n in p.loans.items():
        assert p.gpu_model[lender] == "small" and p.gpu_model[borrower] == "big"
        assert lender // 2 == borrower // 2  # within a domain


def test_greedy_reaches_the_optimum_here_and_idle_gpus_lend():
    p = place(problem(), exact_max_gpus=0)
    assert p.method == "greedy" and p.cost[0] == 0
    # 2 big replicas on 6 GPUs: the four idle GPUs lend 9 GiB each (10 - 1 reserved)
    q = place(problem(small_replicas=0, gpus=6))
    assert q.cost[:2] == (0.0, 0) and sorted(q.loans.values()) == [2 * GiB, 2 * GiB]


def test_the_tighter_slo_borrows_first():
    # One domain of three GPUs: two borrowers (deficits 2 GiB each) and one lender whose
    # spare is cut to 3 GiB by a heavier load: the tight-SLO model is covered in full.
    server = ServerSpec((10 * GiB,) * 3, (0, 0, 0), 1 * GiB)
    tight = PlacedModel("tight", 1e9, 3 * GiB, MiB, 1, 16, (400, 400), (112, 112), slo_s=0.5)
    loose = PlacedModel("loose", 1e9, 3 * GiB, MiB, 1, 16, (400, 400), (112, 112), slo_s=8.0)
    lender = PlacedModel("lender", 1e8, 1 * GiB, MiB, 1, 10, (256, 256), (256, 256))
    prob = PlacementProblem("slo", server, (loose, tight, lender))
    p = evaluate(prob, ["loose", "tight", "lender"])
    assert p.loans == {(2, 1): 2 * GiB, (2, 0): 1 * GiB}
    assert p.uncovered == {0: 1 * GiB, 1: 0}
    assert p.cost[0] == pytest.approx(1 * GiB / 8.0)


def test_placements_that_cannot_fit_raise_typed_errors():
    with pytest.raises(PlacementError, match="5 replicas do not fit 4 GPUs"):
        place(problem(big_replicas=3))
    with pytest.raises(PlacementError, match="fits no GPU"):
        place(problem(big_weights=9 * GiB))
    with pytest.raises(PlacementError, match="does not fit GPU 0"):
        evaluate(problem(big_weights=9 * GiB), ["big", None, None, None])
    assert issubclass(PlacementError, InvalidArgumentError)
    assert issubclass(PlacementError, OffloadError)


@pytest.mark.parametrize("doc, message", [
    ({"server": {"gpus": 2, "nvlink_domains": [[0, 1], [1]]}, "models": {}}, "two domains"),
    ({"server": {"gpus": 2, "nvlink_domains": [[0]]}, "models": {}}, "in no domain"),
    ({"server": {"gpus": 2, "memory": ["80GiB"]}, "models": {}}, "1 sizes for 2 GPUs"),
    ({"server": {"gpus": 2}, "models": {"m": {"params": 1e9, "kv_bytes_per_token": 1,
                                              "replica": 2}}}, "models.m.replica"),
    ({"server": {"gpus": 2}, "models": {}}, "at least one model"),
])
def test_bad_problem_files_name_the_key(doc, message):
    with pytest.raises(ScenarioError, match=message):
        parse_problem(doc)


def test_peer_paging_stays_within_an_nvlink_domain():
    prob = problem()
    naive = simulate(placement_scenario(prob, naive_placement(prob)), "fair", "peer")
    assert naive.paged_out_bytes > 0
    assert naive.fallback_bytes == naive.paged_out_bytes  # no lender in reach: all to host
    chosen = simulate(placement_scenario(prob, place(prob)), "fair", "peer")
    assert chosen.fallback_bytes < chosen.paged_out_bytes / 10


def test_sim_place_beats_naive_on_its_example(tmp_path, capsys):
    out = tmp_path / "place.json"
    assert main(["place", "--json", str(out)]) == 0
    assert "placer vs naive" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["placer"]["placement"]["uncovered_total"] == 0
    assert doc["naive"]["placement"]["uncovered_total"] > 0
    assert doc["throughput_ratio"] > 1.3
    assert doc["ttft_p99_gain"] >= 0.99  # no worse on TTFT p99
    assert doc["slo_met"]["placer"] >= doc["slo_met"]["naive"]
    ex = load_problem()
    assert ex.server.gpus == 8 and len(ex.models) == 2


def test_sim_place_refuses_an_unusable_spec(tmp_path, capsys):
    bad = tmp_path / "p.toml"
    bad.write_text('[server]\ngpus = 2\n[models.m]\nparams = 1e9\nkv_bytes_per_token = 1\n'
                   'replicas = 3\n')
    assert main(["place", "--spec", str(bad)]) == 2
    assert "3 replicas do not fit 2 GPUs" in capsys.readouterr().err
    assert main(["paper-burst", "--spec", str(bad)]) == 2
