"""Offload a tensor, fetch it back, verify every byte, and say where it went and how fast.

Runs on a GPU (CUDA backend) or, without one, on the emulation backend (CPU tensors).
    python examples/quickstart.py [--device cuda:0|cpu] [--mib 64]
"""

from __future__ import annotations

import argparse
import time

import torch

import aqua_offload as aq


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda:N or cpu (default: GPU if any)")
    parser.add_argument("--mib", type=int, default=64, help="tensor size in MiB")
    args = parser.parse_args()

    nbytes = args.mib << 20
    with aq.OffloadManager(device=args.device, peer_bytes=2 * nbytes, host_bytes=2 * nbytes) as m:
        label = " (EMULATION: host memory standing in for GPUs)" if m.stats()["backend"] == "emulation" else ""
        print(f"backend: {m.stats()['backend']}{label}; device {m.device}")
        print("tiers:", ", ".join(f"{t['tier']} {t['location']} {aq.format_size(t['capacity'])}"
                                  for t in m.stats()["tiers"]))

        t = torch.randn(nbytes // 4, device=m.device)  # random data, never zeros
        reference = t.clone()
        view = t[: 1 << 10]

        sync(m.device)
        start = time.perf_counter()
        h = m.offload(t)            # the whole storage is paged out; returns at once
        h.wait()
        offload_s = time.perf_counter() - start
        print(f"offloaded {aq.format_size(h.nbytes)} to the {h.tier} tier at {h.location}; "
              f"paged out: {aq.is_offloaded(t)} (and so is every view: {aq.is_offloaded(view)})")

        start = time.perf_counter()
        restored = m.fetch(h)       # restored in place: the same tensor object
        sync(m.device)
        fetch_s = time.perf_counter() - start

        assert restored is t and torch.equal(t, reference) and torch.equal(view, reference[: 1 << 10])
        print(f"verified bitwise; offload {nbytes / offload_s / 1e9:.1f} GB/s, "
              f"fetch {nbytes / fetch_s / 1e9:.1f} GB/s (one sample, wall clock; "
              f"see `python -m aqua_offload.bench copy` for real measurements)")


if __name__ == "__main__":
    main()
