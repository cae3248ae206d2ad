"""HF generate benchmark: tokens/s of the KV cache variants, same model, same run.

Methods (greedy decoding, identical prompts, every run's tokens compared with the first's):

- ``default_cache``: ``model.generate`` with its default ``DynamicCache`` (the baseline);
- ``offloaded_cache_peer``: :class:`~aqua_offload.hf.OffloadedCache` on a peer tier (on one GPU a
  same-device peer: the code path, not NVLink; on emulation an emulated peer);
- ``offloaded_cache_host``: the same with no peer tier (pinned host memory);
- ``transformers_offloading``: transformers' ``DynamicCache(offloading=True)`` (CUDA only).

Each method is warmed up once, then timed ``samples`` times in rounds (each round runs every
method once, so load changes on a shared machine hit all methods alike; host clock around the
whole ``generate`` call, after a device synchronize). ``ratio = tok_s / baseline tok_s``;
the result's ``overhead_us`` maps each method to the time it adds to the default cache per layer
per decoding step, ``(median - baseline median) / (layers * new_tokens)`` in microseconds (what
the cache's own path costs: paging, bookkeeping, Python). CUDA rows also carry ``vs_transformers_offloading``
(target, DESIGN.md section 9: >= 1.3 for the offloaded cache, and a ratio >= 0.9 to the
default cache).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from ..manager import OffloadManager
from .measure import EMULATION_LABEL, VerificationError
from .models import bench_device, build_model, cpu_threads, device_label, random_prompts

__all__ = ["run_hf_benchmark", "format_hf_table"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf_benchmark(*, model: str | None = None, backend: str = "auto", quick: bool = False,
                     samples: int = 3, batch: int | None = None, prompt_tokens: int | None = None,
                     new_tokens: int | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time generate with each cache; returns ``{"device", "backend", "label", "model",
    "config", "rows", "overhead_us"}``.

    Raises
    ------
    VerificationError
        A cache variant generated different tokens than the default cache.
    """
    backend, device = bench_device(backend)
    with cpu_threads(device):  # see cpu_threads: one intra-op thread on CPU
        return _run_hf(model, backend, device, quick, samples, batch, prompt_tokens,
                       new_tokens, progress)


def _run_hf(model: str | None, backend: str, device: torch.device, quick: bool, samples: int,
            batch: int | None, prompt_tokens: int | None, new_tokens: int | None,
            progress: Callable[[str], None] | None) -> dict[str, Any]:
    if samples < 3:
        raise ValueError("need samples >= 3")
    cuda = backend == "cuda"
    lm = build_model(model, device)
    batch = batch or (1 if quick or not cuda else 4)
    prompt_tokens = prompt_tokens or (64 if quick or not cuda else 1024)
    new_tokens = new_tokens or (24 if quick else (48 if not cuda else 128))
    (ids,) = random_prompts(lm, [prompt_tokens], batch=batch)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    from ..hf import OffloadedCache, cache_kwarg
    from transformers import DynamicCache

    peer = device.index if cuda else "emu:1"
    managers = {"peer": OffloadManager(device, peers=[peer]), "host": OffloadManager(device, peers=None)}
    methods: dict[str, Callable[[], Any]] = {
        "default_cache": lambda: None,
        "offloaded_cache_peer": lambda: OffloadedCache(managers["peer"], config=lm.config),
        "offloaded_cache_host": lambda: OffloadedCache(managers["host"], config=lm.config),
    }
    if cuda:
        methods["transformers_offloading"] = lambda: DynamicCache(config=lm.config, offloading=True)
    times: dict[str, list[float]] = {name: [] for name in methods}
    reference = None
    try:
        # Rounds: every method once per round (the first round warms up), so that a change of
        # load on a shared machine hits every method alike instead of the one running then.
        for i in range(samples + 1):
            for name, make in methods.items():
                if progress and i == 0:
                    progress(name)
                cache = make()
                extra = {} if cache is None else {cache_kwarg(): cache}
                _sync(device)
                t0 = time.perf_counter()
                out = lm.generate(ids, **kwargs, **extra)
                _sync(device)
                elapsed = time.perf_counter() - t0
                if reference is None:
                    reference = out
                elif not torch.equal(out, reference):
                    raise VerificationError(f"{name} generated different tokens than the "
                                            "default cache")
                if hasattr(cache, "close"):
                    cache.close()
                if i:
                    times[name].append(elapsed)
    finally:
        for m in managers.values():
            m.close()
    label = device_label(device)
    tokens = batch * new_tokens
    base_s = statistics.median(times["default_cache"])
    base = tokens / base_s
    layer_steps = int(lm.config.num_hidden_layers) * new_tokens
    hf_off = times.get("transformers_offloading")
    rows = []
    for name, runs in times.items():
        med = statistics.median(runs)
        row = {"method": name, "batch": batch, "prompt_tokens": prompt_tokens,
               "new_tokens": new_tokens, "median_s": med, "min_s": min(runs), "max_s": max(runs),
               "tok_s": tokens / med, "baseline": "default_cache", "ratio": tokens / med / base,
               "device": label, "backend": backend}
        if hf_off:
            row["vs_transformers_offloading"] = statistics.median(hf_off) / med
        rows.append(row)
    overhead = {name: (statistics.median(runs) - base_s) / layer_steps * 1e6
                for name, runs in times.items()}
    return {"device": label, "backend": backend, "overhead_us": overhead,
            "label": EMULATION_LABEL if backend == "emulation" else None,
            "model": model or ("small" if cuda else "tiny"),
            "config": {"batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                       "samples": samples, "layers": int(lm.config.num_hidden_layers)},
            "rows": rows}


def format_hf_table(result: dict[str, Any]) -> str:
    lines = [f"*** {result['label']} ***"] if result["label"] else []
    c = result["config"]
    lines.append(f"device: {result['device']}   backend: {result['backend']}   model: "
                 f"{result['model']} ({c['layers']} layers)   batch {c['batch']}, prompt "
                 f"{c['prompt_tokens']}, {c['new_tokens']} new tokens")
    lines.append(f"{'method':<26} {'tok/s':>10} {'median':>10} {'min':>10} {'max':>10} "
                 f"{'vs default':>11} {'us/layer-step':>14} {'vs hf offload':>14}")
    for r in result["rows"]:
        vs = r.get("vs_transformers_offloading")
        lines.append(f"{r['method']:<26} {r['tok_s']:>10.1f} {r['median_s']:>9.3f}s "
                     f"{r['min_s']:>9.3f}s {r['max_s']:>9.3f}s {r['ratio']:>11.2f} "
                     f"{result['overhead_us'][r['method']]:>14.1f} "
                     f"{'-' if vs is None else f'{vs:.2f}':>14}")
    if result["backend"] == "emulation":
        lines.append("(transformers' DynamicCache(offloading=True) needs CUDA: not measured here)")
    return "\n".join(lines)
