"""peers="auto" takes what each peer can spare; explicit peers get exactly what they ask, and a
failure names the device, the bytes and the runtime's error."""

from __future__ import annotations

import warnings

import pytest

import aqua_offload as aq
from aqua_offload import _core
from aqua_offload.peer_budget import AUTO_FRACTION, PeerBudgetWarning

MiB = 1 << 20


@pytest.fixture
def small_peer():
    """Emulated peer 1 pretends to have 64 MiB of memory."""
    _core.set_device_memory(1, 64 * MiB)
    yield 64 * MiB
    _core.set_device_memory(1, 0)


def test_auto_takes_a_fraction_of_free_memory(small_peer):
    with aq.OffloadManager("cpu", peer_bytes="1GiB", host_bytes="4MiB") as m:
        budget, = m.stats()["peer_budgets"]
        assert budget["location"] == "emu:1" and budget["asked"] == 1 << 30
        assert budget["free"] == small_peer and budget["skipped"] is None
        assert budget["granted"] == int(small_peer * AUTO_FRACTION)
        assert m.stats()["tiers"][0]["capacity"] == budget["granted"]
        assert any(mi["peer_budgets"] == [budget] for mi in aq.info()["managers"])


def test_auto_is_capped_by_peer_bytes(small_peer):
    with aq.OffloadManager("cpu", peer_bytes="4MiB", host_bytes="4MiB") as m:
        assert m.stats()["tiers"][0]["capacity"] == 4 * MiB


def test_auto_skips_a_starved_peer_with_one_warning():
    _core.set_device_memory(1, MiB)
    try:
        with pytest.warns(PeerBudgetWarning, match="emu:1") as caught:
            m = aq.OffloadManager("cpu", host_bytes="4MiB")
        assert len(caught) == 1
        assert [t["tier"] for t in m.stats()["tiers"]] == ["host"]
        assert m.stats()["peer_budgets"][0]["skipped"]
        m.close()
    finally:
        _core.set_device_memory(1, 0)


def test_explicit_peers_fail_naming_device_bytes_and_error(small_peer):
    with pytest.raises(aq.OutOfMemoryError) as info:
        aq.OffloadManager("cpu", peers=[1], peer_bytes="100MiB", host_bytes="4MiB")
    msg = str(info.value)
    assert "emu:1" in msg and "100.00 MiB" in msg and "cudaErrorMemoryAllocation" in msg
    assert _core.memory_info("emulation", 1)[0] == small_peer  # nothing kept


def test_lend_failure_names_the_device(small_peer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = aq.OffloadManager("cpu", peers=[1], peer_bytes="16MiB", host_bytes="4MiB")
    with pytest.raises(aq.OutOfMemoryError, match="lend: cannot allocate 64.00 MiB on emu:1"):
        m.lend(1, "64MiB")
    assert m.stats()["tiers"][0]["capacity"] == 16 * MiB
    m.close()


def test_core_errors_say_where_they_were_raised():
    with pytest.raises(aq.InvalidArgumentError, match=r"chunk_bytes.*\(cpp/src/\w+\.cpp:\d+\)"):
        aq.OffloadManager("cpu", host_bytes="1MiB", chunk_bytes=100)
