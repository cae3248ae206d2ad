"""Offloaded decoding (``sim/offloaded_decode.py``), pinned by numbers computed by hand.

Tiny case: HBM 100 B/s, 1000 FLOP/s, mbu = mfu = 1; PCIe 10 B/s, NVLink 50 B/s; a model of
10 params, 100 B of weights, 10 B of KV per token; 300 B of GPU memory, nothing reserved, so
200 B are free for KV. Batch 4, prompt 7, output 3: KV reserved 4 x (7 + 3) x 10 = 400 B,
local 200 B, overflow 200 B: half of every token's KV is remote (f = 1/2).

Decode: output - 1 = 2 steps, at contexts 8 and 9.
  c = 8: KV read 4 x 8 x 10 = 320 B, remote 160. HBM (100 + 320 + 160 staged) / 100 = 5.8 s;
         compute 4 x 2 x 10 / 1000 = 0.08 s; peer 160 / 50 = 3.2 s; host 160 / 10 = 16 s.
  c = 9: KV 360 B, remote 180. HBM (100 + 360 + 180) / 100 = 6.4 s; peer 3.6 s; host 18 s.
Prefill, per sequence: KV 70 B, remote 35. HBM (100 + 70 + 35) / 100 = 2.05 s; compute
  2 x 10 x 7 / 1000 = 0.14 s; write-out peer 35 / 50 = 0.7 s, host 35 / 10 = 3.5 s.

Overlapped (max of the terms):
  peer: prefill 4 x 2.05 = 8.2, decode 5.8 + 6.4 = 12.2, tok/s 12 / 20.4; bound hbm.
  host: prefill 4 x 3.5 = 14.0, decode 16 + 18 = 34, tok/s 12 / 48; bound link.
  ratio 48 / 20.4 = 2.3529..., decode ratio (8 / 12.2) / (8 / 34) = 34 / 12.2 = 2.7868...
Serial (HBM or compute, plus link):
  peer: prefill 4 x 2.75 = 11.0, decode 9.0 + 10.0 = 19.0, tok/s 12 / 30.
  host: prefill 4 x 5.55 = 22.2, decode 21.8 + 24.4 = 46.2, tok/s 12 / 68.4; ratio 2.28.

Loan of 120 B (the peer tier cascades 80 B to host; f_peer = 0.3, f_host = 0.2), overlapped:
  c = 8: peer 96 / 50 = 1.92 s, host 64 / 10 = 6.4 s (both links at once): link 6.4 > HBM 5.8.
  c = 9: peer 2.16 s, host 7.2 s > 6.4. Decode 13.6 s. Prefill write-out max(21 / 50, 14 / 10)
  = 1.4 < HBM 2.05: 8.2 s. tok/s 12 / 21.8.

Fits (memory 500 B): no overflow, both tiers alike. Decode (100 + 320) / 100 + (100 + 360) / 100
  = 8.8 s, prefill 4 x (100 + 70) / 100 = 6.8 s, ratio exactly 1.

Attention (2 FLOPs per pair, peak 50 FLOP/s): prefill compute (2 x 10 x 7 + 2 x 7 x 8 / 2) / 50
  = (140 + 56) / 50 = 3.92 s, above HBM 2.05 and the host write-out 3.5: 4 x 3.92 = 15.68 s on
  both tiers. Decode c = 8: (4 x (20 + 2 x 8)) / 50 = 2.88 s, below HBM 5.8.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from aqua_offload.errors import InvalidArgumentError, OffloadError
from aqua_offload.sim.__main__ import main
from aqua_offload.sim.offloaded_decode import (LongDecodeCase, PRESETS, long_decode,
                                               paper_case)
from aqua_offload.sim.roofline import GPUSpec, ModelSpec
from aqua_offload.sim.scenario import LinkSpec

GPU = GPUSpec(hbm_bytes_per_s=100.0, peak_flops=1000.0, mbu=1.0, mfu=1.0)
LINKS = LinkSpec(pcie_bytes_per_s=10.0, pcie_latency_s=0.0, nvlink_bytes_per_s=50.0,
                 nvlink_latency_s=0.0)
TINY = ModelSpec("tiny", 10.0, 100, 10)


def tiny(**changes) -> LongDecodeCase:
    args = dict(model=TINY, gpu=GPU, links=LINKS, memory_bytes=300, reserved_bytes=0,
                peer_bytes=1000, prompt_tokens=7, output_tokens=3, batch=4)
    args.update(changes)
    return LongDecodeCase(**args)


def test_overlapped_decode_by_hand():
    r = long_decode(tiny())
    assert (r.case.kv_bytes, r.case.local_bytes) == (400, 200)
    assert (r.peer.peer_bytes, r.peer.host_bytes) == (200, 0)
    assert (r.host.peer_bytes, r.host.host_bytes) == (0, 200)
    assert r.peer.prefill_s == pytest.approx(8.2)
    assert r.peer.decode_s == pytest.approx(12.2)
    assert r.peer.last_step_s == pytest.approx(6.4)
    assert r.peer.tok_s == pytest.approx(12 / 20.4)
    assert r.peer.bound == "hbm"
    assert r.host.prefill_s == pytest.approx(14.0)
    assert r.host.decode_s == pytest.approx(34.0)
    assert r.host.tok_s == pytest.approx(12 / 48)
    assert r.host.bound == "link"
    assert r.ratio == pytest.approx(48 / 20.4)
    assert r.decode_ratio == pytest.approx(34 / 12.2)


def test_serial_decode_adds_the_link_by_hand():
    r = long_decode(tiny(overlap=False))
    assert r.peer.prefill_s == pytest.approx(11.0)
    assert r.peer.decode_s == pytest.approx(19.0)
    assert r.host.prefill_s == pytest.approx(22.2)
    assert r.host.decode_s == pytest.approx(46.2)
    assert r.ratio == pytest.approx(68.4 / 30)
    assert (r.peer.bound, r.host.bound) == ("hbm", "link")


def test_overflow_beyond_the_loan_is_read_from_host_at_the_same_time():
    r = long_decode(tiny(peer_bytes=120))
    assert (r.peer.peer_bytes, r.peer.host_bytes) == (120, 80)
    assert r.peer.decode_s == pytest.approx(13.6)
    assert r.peer.prefill_s == pytest.approx(8.2)
    assert r.peer.tok_s == pytest.approx(12 / 21.8)
    assert r.peer.bound == "link"
    assert r.host.decode_s == pytest.approx(34.0)  # the host tier does not use the loan


def test_no_overflow_means_no_difference():
    r = long_decode(tiny(memory_bytes=500))
    assert r.case.local_bytes == r.case.kv_bytes == 400
    assert r.peer == dataclasses.replace(r.host, tier="peer")
    assert r.peer.decode_s == pytest.approx(8.8)
    assert r.peer.prefill_s == pytest.approx(6.8)
    assert r.ratio == 1.0 and r.decode_ratio == 1.0


def test_causal_attention_flops_bound_the_prefill():
    r = long_decode(tiny(gpu=GPUSpec(100.0, 50.0, 1.0, 1.0), attention_flops_per_pair=2.0))
    assert r.peer.prefill_s == pytest.approx(15.68)
    assert r.host.prefill_s == pytest.approx(15.68)
    # decode stays HBM-bound (2.88 s of compute < 5.8 s): the same steps as without attention
    assert r.peer.decode_s == pytest.approx(12.2)


def test_one_output_token_is_prefill_only():
    r = long_decode(tiny(output_tokens=1))
    assert r.peer.decode_s == 0.0 and r.peer.decode_tok_s == 0.0
    assert r.decode_ratio == 1.0
    # KV 4 x 8 x 10 = 320 B, local 200: f = 120 / 320 = 0.375; per sequence 70 B, 26.25 remote:
    # HBM (100 + 70 + 26.25) / 100 = 1.9625 s; host write-out 2.625 s.
    assert r.peer.prefill_s == pytest.approx(4 * 1.9625)
    assert r.host.prefill_s == pytest.approx(4 * 2.625)


@pytest.mark.parametrize("changes", [dict(batch=0), dict(output_tokens=0), dict(prompt_tokens=-1),
                                     dict(batch=True), dict(batch=2.0), dict(memory_bytes=50),
                                     dict(peer_bytes=-1), dict(attention_flops_per_pair=-1.0),
                                     dict(model=ModelSpec("step", 1.0, 0, 1, step_s=0.1))])
def test_bad_cases_raise_typed_errors(changes):
    with pytest.raises(InvalidArgumentError):
        tiny(**changes)


def test_paper_case_presets_and_budget():
    spec, attention = PRESETS["llama-3.1-8b"]
    assert spec.kv_bytes_per_token == 131072 and attention == 4 * 32 * 4096
    case = paper_case("llama-3.1-8b", 1, kv_budget_bytes=1 << 30)
    assert case.local_bytes == 1 << 30
    with pytest.raises(OffloadError):
        paper_case("gpt-5")
    with pytest.raises(InvalidArgumentError):
        paper_case("llama-2-13b", kv_budget_bytes=80 << 30)


def test_paper_case_ratio_rises_from_one_to_the_link_ratio():
    # 8B on 80 GiB - 16 GB - 8 GiB: 14 sequences of 33k tokens fit, so no difference; at 20 both
    # tiers are link-bound at every step and within the 64 GiB loan: decode ratio = 370 / 55.
    fits = long_decode(paper_case("llama-3.1-8b", 14))
    assert fits.case.kv_bytes == fits.case.local_bytes and fits.ratio == 1.0
    bound = long_decode(paper_case("llama-3.1-8b", 20))
    assert bound.peer.host_bytes == 0
    assert bound.decode_ratio == pytest.approx(370 / 55, rel=1e-9)
    assert 1.0 < bound.ratio < bound.decode_ratio  # the prefill is the same on both tiers


def test_cli_long_decode_json(tmp_path, capsys):
    out = tmp_path / "ld.json"
    assert main(["long-decode", "--batch", "14", "20", "--json", str(out)]) == 0
    assert "offloaded decode (modelled" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["modelled"] is True
    assert [r["batch"] for r in doc["results"]] == [14, 20]
    assert doc["results"][0]["ratio"] == 1.0
    assert doc["results"][1]["decode_ratio"] == pytest.approx(370 / 55)
    assert doc["results"][1]["peer"]["tok_s"] > doc["results"][1]["host"]["tok_s"]


@pytest.mark.parametrize("argv", [["long-decode", "--model", "gpt-5"],
                                  ["long-decode", "--kv-budget", "lots"],
                                  ["long-decode", "--plot", "x.png"]])
def test_cli_long_decode_refuses_bad_arguments(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "x.png").exists()
