"""A burst of generate requests on one model: first-come-first-served vs time-sliced.

    python examples/hf_generate_timesliced.py            # small random Llama, GPU if present
    python examples/hf_generate_timesliced.py --model Qwen/Qwen2-0.5B   # a local checkpoint

A serving engine without preemption runs requests one after another: in a burst, the last
request waits for all the others before its first token. Time-slicing the model per token
(aqua_offload.TimeSlicer with the fair policy) gives every request the device within a few
quanta; a preempted request's KV cache is paged out (peer GPU, else pinned host memory) and back
in when its turn comes. The tokens are the same either way: this script checks it.

On a machine without a GPU everything runs on the CPU with the emulation backend.
"""

from __future__ import annotations

import argparse

import torch

import aqua_offload as aq
from aqua_offload.bench.models import build_model, cpu_threads, device_label, random_prompts
from aqua_offload.hf import OffloadedCache, generate_many, summarize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local checkpoint name or path (default: a small random "
                                   "Llama-style model built from a config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quantum-ms", type=float, default=10.0)
    args = p.parse_args()

    model = build_model(args.model, args.device)
    device = model.device
    with cpu_threads(device):  # on CPU: one intra-op thread per request thread (see its doc)
        serve(model, device, args)


def serve(model, device, args) -> None:
    # A burst: all requests arrive at once, prompts of a few lengths.
    prompts = random_prompts(model, [32 * (1 + i % 4) for i in range(args.requests)])
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    model.generate(prompts[0], **gen)  # warm-up

    manager = aq.OffloadManager(device)  # peer tier(s) first, then pinned host
    runs = {
        "fcfs (no preemption)": dict(slicer=aq.TimeSlicer(manager=manager, policy="fcfs")),
        "time-sliced": dict(slicer=aq.TimeSlicer(args.quantum_ms, manager, policy="fair")),
        "time-sliced + OffloadedCache": dict(
            slicer=aq.TimeSlicer(args.quantum_ms, manager, policy="fair"),
            cache_factory=lambda: OffloadedCache(manager, config=model.config)),
    }
    print(f"{args.requests} requests x {args.new_tokens} tokens on {device_label(device)}"
          f"{'' if device.type == 'cuda' else ' (aqua_offload emulation backend)'}\n")
    print(f"{'':<30}{'TTFT p50':>10}{'TTFT p99':>10}{'tok/s':>9}{'preempt':>9}{'paged':>11}")
    reference = None
    for name, kwargs in runs.items():
        results = generate_many(model, prompts, **kwargs, **gen)
        kwargs["slicer"].close()
        if reference is None:
            reference = [r.sequences for r in results]
        assert all(torch.equal(r.sequences, ref) for r, ref in zip(results, reference)), \
            f"{name}: different tokens"
        s = summarize(results)
        print(f"{name:<30}{s['ttft_p50_s'] * 1e3:>8.0f}ms{s['ttft_p99_s'] * 1e3:>8.0f}ms"
              f"{s['throughput_tok_s']:>9.0f}{s['preemptions']:>9}"
              f"{aq.format_size(s['bytes_paged']):>11}")
    manager.close()
    print("\nSame tokens in every run. TTFT: from arrival to the first token; paged: KV cache "
          "bytes moved by preemptions (an OffloadedCache keeps its layers offloaded already).")


if __name__ == "__main__":
    main()
