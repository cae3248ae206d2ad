"""Simulator core: the event engine, the link model, the roofline, against hand-computed cases."""

from __future__ import annotations

import pytest

from aqua_offload.errors import InvalidArgumentError
from aqua_offload.sim.engine import EventEngine
from aqua_offload.sim.links import Network
from aqua_offload.sim.roofline import GPUSpec, ModelSpec, Roofline

GB = 1e9


# -- event engine -------------------------------------------------------------------------------
def test_events_run_in_time_order_and_ties_in_scheduling_order():
    sim, seen = EventEngine(), []
    sim.schedule_at(2.0, seen.append, "late")
    sim.schedule_at(1.0, seen.append, "tie-1")
    sim.schedule_at(1.0, seen.append, "tie-2")
    sim.schedule_at(1.0, seen.append, "urgent", priority=-1)
    sim.schedule_at(0.5, seen.append, "early")
    assert sim.run() == 2.0
    assert seen == ["early", "urgent", "tie-1", "tie-2", "late"]


def test_clock_moves_with_events_and_callbacks_schedule_relative_to_now():
    sim, times = EventEngine(), []

    def tick(n):
        times.append(sim.now)
        if n:
            sim.schedule(0.25, tick, n - 1)
    sim.schedule(1.0, tick, 3)
    sim.run()
    assert times == [1.0, 1.25, 1.5, 1.75]


def test_cancel_until_and_past_events():
    sim, seen = EventEngine(), []
    ev = sim.schedule(1.0, seen.append, "cancelled")
    sim.schedule(3.0, seen.append, "after")
    sim.cancel(ev)
    assert sim.pending() == 1
    assert sim.run(until=2.0) == 2.0 and seen == []
    with pytest.raises(InvalidArgumentError, match="clock is at"):
        sim.schedule_at(1.5, seen.append, "past")
    with pytest.raises(InvalidArgumentError):
        sim.schedule(-1.0, seen.append, "negative")
    sim.run()
    assert seen == ["after"]


# -- links --------------------------------------------------------------------------------------
def _net(bw=10 * GB, latency=0.0):
    sim = EventEngine()
    net = Network(sim)
    net.add_channel("a.out", bw, latency)
    net.add_channel("a.in", bw, latency)
    net.add_channel("b.in", bw, 0.0)
    return sim, net


def test_single_transfer_takes_latency_plus_bytes_over_bandwidth():
    sim, net = _net(bw=50 * GB, latency=10e-6)
    done = []
    t = net.transfer(1 << 30, ["a.out"], lambda t: done.append(sim.now))
    sim.run()
    assert done == [pytest.approx(10e-6 + (1 << 30) / (50 * GB), rel=1e-12)]
    assert t.duration_s == pytest.approx(done[0])
    assert net.channels["a.out"].bytes_moved == 1 << 30


def test_two_transfers_on_one_channel_share_it_equally():
    sim, net = _net(bw=10 * GB)
    done = {}
    net.transfer(int(1 * GB), ["a.out"], lambda t: done.setdefault("small", sim.now))
    net.transfer(int(3 * GB), ["a.out"], lambda t: done.setdefault("big", sim.now))
    sim.run()
    # Both at 5 GB/s until the small one ends at 0.2 s (1 GB); the big one has 2 GB left,
    # then alone at 10 GB/s: 0.2 + 0.2 = 0.4 s (= 4 GB / 10 GB/s, no bandwidth lost).
    assert done["small"] == pytest.approx(0.2)
    assert done["big"] == pytest.approx(0.4)


def test_a_late_transfer_slows_the_running_one_from_its_start():
    sim, net = _net(bw=10 * GB)
    done = {}
    net.transfer(int(2 * GB), ["a.out"], lambda t: done.setdefault("first", sim.now))
    sim.schedule(0.1, lambda: net.transfer(int(1 * GB), ["a.out"],
                                           lambda t: done.setdefault("second", sim.now)))
    sim.run()
    # first: 1 GB alone by 0.1 s, then 5 GB/s each: second's 1 GB ends at 0.3 s, when first
    # has 0 GB left too -> both at 0.3 s.
    assert done["first"] == pytest.approx(0.3)
    assert done["second"] == pytest.approx(0.3)


def test_opposite_directions_do_not_contend():
    sim, net = _net(bw=10 * GB)
    done = {}
    net.transfer(int(1 * GB), ["a.out"], lambda t: done.setdefault("out", sim.now))
    net.transfer(int(1 * GB), ["a.in"], lambda t: done.setdefault("in", sim.now))
    sim.run()
    assert done == {"out": pytest.approx(0.1), "in": pytest.approx(0.1)}


def test_max_min_fairness_across_two_channels():
    sim, net = _net(bw=10 * GB)
    net.channels["b.in"].bandwidth = 4 * GB
    # x: a.out + b.in (bottleneck b.in alone: 4 GB/s); y: a.out only, gets the rest: 6 GB/s.
    x = net.transfer(int(4 * GB), ["a.out", "b.in"])
    y = net.transfer(int(6 * GB), ["a.out"])
    sim.run(until=0.01)
    assert (x.rate, y.rate) == (pytest.approx(4 * GB), pytest.approx(6 * GB))
    sim.run()
    assert x.finished == pytest.approx(1.0) and y.finished == pytest.approx(1.0)


def test_zero_byte_transfer_costs_only_latency():
    sim, net = _net(latency=5e-6)
    t = net.transfer(0, ["a.out"])
    sim.run()
    assert t.finished == pytest.approx(5e-6)


# -- roofline -----------------------------------------------------------------------------------
def test_roofline_decode_is_memory_bound_and_prefill_compute_bound():
    gpu = GPUSpec(hbm_bytes_per_s=3.35e12, peak_flops=989e12, mbu=0.8, mfu=0.5)
    model = ModelSpec("m", params=13e9, weights_bytes=26_000_000_000, kv_bytes_per_token=819200)
    r = Roofline(gpu, model)
    # decode, batch 8 x 1000 tokens: (26e9 + 8 * 1000 * 819200) B / (3.35e12 * 0.8) B/s
    assert r.decode_s(8, 1000) == pytest.approx((26e9 + 8 * 819200e3) / (3.35e12 * 0.8))
    # prefill of 4096 tokens: 2 * 13e9 * 4096 FLOP / (989e12 * 0.5) FLOP/s > weights read
    assert r.prefill_s(4096) == pytest.approx(2 * 13e9 * 4096 / (989e12 * 0.5))
    assert r.iteration_s(0, 0, 0) == 0.0
    with pytest.raises(InvalidArgumentError):
        GPUSpec(mbu=1.5)
