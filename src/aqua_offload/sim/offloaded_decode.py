"""Offloaded decoding of long prompts: tokens/s when part of the KV cache lives across a link.

The AQUA paper's second claim (4x throughput for a 32k-token prompt) is about FlexGen-style
decoding: the KV cache of the batch does not fit in the GPU's free memory, so a fixed share of
it lives elsewhere and is read across a link at **every** decoded token. This module is an
analytic model of that case (no events, no queues): the overflow on a peer GPU's lent memory
over NVLink vs on pinned host memory over PCIe. It reuses the simulator's published H100
figures (:class:`~aqua_offload.sim.roofline.GPUSpec`, :class:`~aqua_offload.sim.scenario.LinkSpec`).

Note [Offloaded decode roofline]
Placement. The KV cache of ``batch`` sequences of ``prompt + output`` tokens is reserved up
front. The GPU's free memory (``memory - weights - reserved``) holds what fits; the rest, the
*overflow*, goes to the peer's lent memory (tier ``peer``; beyond the loan, to host, as the
library's tier cascade does) or to host memory (tier ``host``). As FlexGen's percentage split
does, every layer and every token keeps the same shares, so a step at context ``c`` reads
``batch * c * kv_bytes_per_token`` bytes of KV split in the fixed fractions local / peer / host.

One decode step (one token for every sequence of the batch) at context ``c`` costs

- HBM: ``weights + local KV + 2 x remote KV`` bytes at ``hbm * mbu``. Remote KV is *staged*: a
  copy engine writes it into an HBM buffer and attention reads it from there (FlexGen loads the
  next layer's cache into GPU memory the same way; a kernel reading peer memory directly would
  save the staging, a small term next to the link);
- compute: ``2 * params * batch + attention_flops_per_pair * batch * c`` FLOPs at
  ``peak * mfu`` (negligible in decode; it keeps prefill honest);
- link: ``max(peer bytes / nvlink, host bytes / pcie)``: peer and host parts flow over
  different links at once (GPU ingress from NVLink and host-to-device PCIe do not contend).

and takes ``max(hbm, compute, link)`` when ``overlap`` (the default) or ``max(hbm, compute) +
link`` otherwise, plus ``iteration_overhead_s``. **Overlap is the default** because the case we
model overlaps by construction: FlexGen's schedule loads layer ``l + 1``'s cache while layer
``l`` computes, and the library issues copies on their own streams, so every layer costs the
slower of its HBM traffic and its link transfer; with all layers alike that is the max over
the whole step (the first layer's transfer, ``link / layers``, is not hidden: left out). The
serial variant is the bound for code that fetches and then computes; both are reported.

Prefill, per sequence (compute-bound at 32k tokens): ``2 * params * prompt +
attention_flops_per_pair * prompt * (prompt + 1) / 2`` FLOPs (causal attention: token ``i``
sees ``i`` keys) against HBM traffic ``weights + prompt KV + staged remote prompt KV``, while
the remote share of the prompt's KV is **written out** over the link (overlapped the same way,
or added). The prefill emits each sequence's first token, so the decode phase runs
``output - 1`` steps, step ``j`` at context ``prompt + j``.

Throughput: FlexGen's *generation throughput*, ``batch * output / (prefill + decode)``
(``tok_s``), and the decode-only rate ``batch * (output - 1) / decode`` (``decode_tok_s``).
Left out: link latency (~10 us per copy, ~0.3 ms per step at 32 layers), the new token's KV
written back (``batch * kv_bytes_per_token`` per step, on the opposite link direction), the
pipeline fill above, CPU attention (FlexGen's option to compute attention where the cache
lives), host memory bandwidth and NUMA, and tensor parallelism.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..errors import InvalidArgumentError
from .roofline import GPUSpec, ModelSpec
from .scenario import LinkSpec

__all__ = ["LongDecodeCase", "TierTiming", "LongDecodeResult", "PRESETS", "DEFAULT_BATCHES",
           "long_decode", "paper_case", "format_long_decode"]

GiB = 1 << 30
MAX_CONTEXT = 10_000_000   # tokens per sequence: the decode loop runs one step per token
TIER_NAMES = ("peer", "host")


@dataclass(frozen=True)
class LongDecodeCase:
    """One offloaded-decode case: a model on one GPU, a batch of long sequences.

    Attributes
    ----------
    model : ModelSpec
        ``params``, ``weights_bytes``, ``kv_bytes_per_token`` are used.
    gpu : GPUSpec
        HBM bandwidth, peak FLOPs, utilisations, per-iteration overhead (default H100 SXM).
    links : LinkSpec
        PCIe and NVLink one-way bandwidths (default: published H100 figures, 55 / 370 GB/s).
    memory_bytes : int
        GPU memory (default 80 GiB).
    reserved_bytes : int
        Memory kept for activations, workspace and the CUDA context (default 8 GiB, ~10 %).
    peer_bytes : int
        Memory the NVLink domain lends (tier ``peer``); overflow beyond it goes to host.
    prompt_tokens, output_tokens : int
        Per sequence; ``output_tokens`` counts the first token (made by the prefill).
    batch : int
        Sequences decoded together.
    attention_flops_per_pair : float
        FLOPs per (query, key) pair: ``4 x layers x hidden`` (QK^T and PV, a multiply-add each
        per head dimension). 0 leaves attention out, as :class:`~.roofline.Roofline` does.
    overlap : bool
        Link transfers overlap HBM traffic and compute (Note [Offloaded decode roofline]).
    """

    model: ModelSpec
    gpu: GPUSpec = field(default_factory=GPUSpec)
    links: LinkSpec = field(default_factory=LinkSpec)
    memory_bytes: int = 80 * GiB
    reserved_bytes: int = 8 * GiB
    peer_bytes: int = 64 * GiB
    prompt_tokens: int = 32768
    output_tokens: int = 256
    batch: int = 1
    attention_flops_per_pair: float = 0.0
    overlap: bool = True

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "output_tokens", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
        if self.prompt_tokens + self.output_tokens > MAX_CONTEXT:
            raise InvalidArgumentError(f"prompt_tokens + output_tokens must be <= {MAX_CONTEXT}")
        for name in ("memory_bytes", "reserved_bytes", "peer_bytes"):
            if not getattr(self, name) >= 0:
                raise InvalidArgumentError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.attention_flops_per_pair >= 0:
            raise InvalidArgumentError("attention_flops_per_pair must be >= 0")
        if self.model.weights_bytes + self.reserved_bytes > self.memory_bytes:
            raise InvalidArgumentError(
                f"model {self.model.name}: weights ({self.model.weights_bytes} B) + reserved "
                f"({self.reserved_bytes} B) exceed the GPU's {self.memory_bytes} B")
        if self.model.step_s is not None:
            raise InvalidArgumentError(f"model {self.model.name}: a fixed-step model has no "
                                       "bytes or FLOPs to put on a roofline")

    @property
    def kv_bytes(self) -> int:
        """KV bytes of the whole batch at full length (what is reserved)."""
        return self.batch * (self.prompt_tokens + self.output_tokens) * \
            self.model.kv_bytes_per_token

    @property
    def local_bytes(self) -> int:
        """The part of :attr:`kv_bytes` the GPU's free memory holds."""
        free = self.memory_bytes - self.model.weights_bytes - self.reserved_bytes
        return min(self.kv_bytes, free)


@dataclass(frozen=True)
class TierTiming:
    """Timing of one case with its overflow on one tier.

    Attributes
    ----------
    tier : str
        ``peer`` or ``host``: where the overflow goes first.
    peer_bytes, host_bytes : int
        Overflow bytes placed on a peer GPU and on host memory.
    prefill_s, decode_s : float
        Prefill of every sequence (with the KV written out) and the ``output - 1`` decode steps.
    tok_s : float
        Generated tokens / (prefill + decode): FlexGen's generation throughput.
    decode_tok_s : float
        Tokens of the decode steps / decode time (0 when ``output_tokens`` is 1).
    last_step_s : float
        The last decode step (the longest context), or 0.
    bound : str
        What bounds the last decode step: ``hbm``, ``compute`` or ``link`` (``hbm`` with no
        overflow and no step).
    """

    tier: str
    peer_bytes: int
    host_bytes: int
    prefill_s: float
    decode_s: float
    tok_s: float
    decode_tok_s: float
    last_step_s: float
    bound: str


@dataclass(frozen=True)
class LongDecodeResult:
    """Both tiers of one case and their ratios (peer over host)."""

    case: LongDecodeCase
    peer: TierTiming
    host: TierTiming

    @property
    def ratio(self) -> float:
        """Peer tok/s over host tok/s (prefill included)."""
        return self.peer.tok_s / self.host.tok_s

    @property
    def decode_ratio(self) -> float:
        """Peer over host on decode alone (1.0 when there is no decode step)."""
        if self.host.decode_tok_s == 0:
            return 1.0
        return self.peer.decode_tok_s / self.host.decode_tok_s

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the case's scalars, both tiers, the ratios)."""
        c = self.case
        return {"model": c.model.name, "batch": c.batch, "prompt_tokens": c.prompt_tokens,
                "output_tokens": c.output_tokens, "overlap": c.overlap,
                "kv_bytes": c.kv_bytes, "local_bytes": c.local_bytes,
                "overflow_bytes": c.kv_bytes - c.local_bytes,
                "peer": asdict(self.peer), "host": asdict(self.host),
                "ratio": self.ratio, "decode_ratio": self.decode_ratio}


def _split(case: LongDecodeCase, tier: str) -> tuple[int, int]:
    """Overflow bytes on (peer, host) when the overflow goes to ``tier`` first."""
    overflow = case.kv_bytes - case.local_bytes
    if tier == "host":
        return 0, overflow
    on_peer = min(overflow, case.peer_bytes)
    return on_peer, overflow - on_peer


def _combine(case: LongDecodeCase, hbm_s: float, compute_s: float, link_s: float
             ) -> tuple[float, str]:
    """Time of one phase from its three terms (overlapped or serial) and the bounding term."""
    terms = {"hbm": hbm_s, "compute": compute_s, "link": link_s}
    if case.overlap:
        bound = max(terms, key=terms.__getitem__)
        return terms[bound], bound
    local = max(hbm_s, compute_s)
    bound = "link" if link_s > local else ("hbm" if hbm_s >= compute_s else "compute")
    return local + link_s, bound


def _timing(case: LongDecodeCase, tier: str) -> TierTiming:
    gpu, model, links = case.gpu, case.model, case.links
    hbm, flops = gpu.hbm_bytes_per_s * gpu.mbu, gpu.peak_flops * gpu.mfu
    on_peer, on_host = _split(case, tier)
    # The fixed shares of every token's KV (Note [Offloaded decode roofline]: FlexGen's split).
    f_peer, f_host = on_peer / case.kv_bytes, on_host / case.kv_bytes
    f_remote = f_peer + f_host
    kvpt = model.kv_bytes_per_token

    def phase(kv: float, flop: float, fixed_bytes: float) -> tuple[float, str]:
        # ``kv`` bytes of KV cross the HBM once plus the remote share again (staged), and the
        # remote shares cross their links.
        hbm_s = (fixed_bytes + kv * (1.0 + f_remote)) / hbm
        link_s = max(kv * f_peer / links.nvlink_bytes_per_s,
                     kv * f_host / links.pcie_bytes_per_s)
        t, bound = _combine(case, hbm_s, flop / flops, link_s)
        return t + gpu.iteration_overhead_s, bound

    p = case.prompt_tokens
    seq_s, _ = phase(p * kvpt, 2.0 * model.params * p +
                     case.attention_flops_per_pair * p * (p + 1) / 2.0, model.weights_bytes)
    prefill_s = case.batch * seq_s

    decode_s, step_s, bound = 0.0, 0.0, "hbm"
    for j in range(1, case.output_tokens):
        context = p + j
        step_s, bound = phase(case.batch * context * kvpt,
                              case.batch * (2.0 * model.params +
                                            case.attention_flops_per_pair * context),
                              model.weights_bytes)
        decode_s += step_s
    tokens = case.batch * case.output_tokens
    total_s = prefill_s + decode_s
    if not total_s > 0:
        raise InvalidArgumentError(f"model {model.name} costs nothing (0 s): no throughput")
    decode_tok_s = case.batch * (case.output_tokens - 1) / decode_s if decode_s > 0 else 0.0
    return TierTiming(tier, on_peer, on_host, prefill_s, decode_s, tokens / total_s,
                      decode_tok_s, step_s, bound)


def long_decode(case: LongDecodeCase) -> LongDecodeResult:
    """Time ``case`` with its overflow on a peer GPU and on host memory.

    Parameters
    ----------
    case : LongDecodeCase

    Returns
    -------
    LongDecodeResult
        Both tiers' timings; ``ratio`` and ``decode_ratio`` are peer over host.
    """
    return LongDecodeResult(case, _timing(case, "peer"), _timing(case, "host"))


# Published architectures in BF16. KV bytes per token: 2 (K, V) x layers x KV heads x head dim x
# 2 bytes; attention FLOPs per (query, key) pair: 4 x layers x hidden.
PRESETS: dict[str, tuple[ModelSpec, float]] = {
    # Llama-3.1-8B: 32 layers, hidden 4096, 8 KV heads of 128 (GQA), 128k context.
    "llama-3.1-8b": (ModelSpec("llama-3.1-8b", 8.03e9, int(8.03e9 * 2), 2 * 32 * 8 * 128 * 2),
                     4.0 * 32 * 4096),
    # Llama-2-13B: 40 layers, hidden 5120, 40 KV heads of 128 (no GQA): 6.25x the KV per token.
    "llama-2-13b": (ModelSpec("llama-2-13b", 13.0e9, int(13.0e9 * 2), 2 * 40 * 40 * 128 * 2),
                    4.0 * 40 * 5120),
}
DEFAULT_BATCHES = (1, 8, 14, 15, 16, 17, 20, 24, 32, 64)


def paper_case(model: str = "llama-3.1-8b", batch: int = 16, *, prompt_tokens: int = 32768,
               output_tokens: int = 256, overlap: bool = True,
               kv_budget_bytes: int | None = None) -> LongDecodeCase:
    """The paper's long-prompt case on one H100 SXM 80 GB (our assumptions, not its setup).

    Parameters
    ----------
    model : str
        A key of :data:`PRESETS`.
    batch : int
        Sequences of ``prompt_tokens`` decoded together.
    prompt_tokens, output_tokens : int
        Default 32k prompt, 256 generated tokens.
    overlap : bool
        Overlap link transfers with HBM traffic (default) or add them.
    kv_budget_bytes : int, optional
        Free HBM for KV; default ``80 GiB - weights - 8 GiB`` reserved. Set it to model a GPU
        whose memory other work holds (it changes ``reserved_bytes``).

    Returns
    -------
    LongDecodeCase
        With a 64 GiB loan from the NVLink domain (as a producer lends in ``paper-burst``).
    """
    if model not in PRESETS:
        raise InvalidArgumentError(f"unknown model {model!r} (from: {', '.join(PRESETS)})")
    spec, attention = PRESETS[model]
    memory = 80 * GiB
    reserved = 8 * GiB
    if kv_budget_bytes is not None:
        if not 0 <= kv_budget_bytes <= memory - spec.weights_bytes:
            raise InvalidArgumentError(f"kv_budget_bytes must be in [0, "
                                       f"{memory - spec.weights_bytes}], got {kv_budget_bytes}")
        reserved = memory - spec.weights_bytes - kv_budget_bytes
    return LongDecodeCase(spec, memory_bytes=memory, reserved_bytes=reserved,
                          prompt_tokens=prompt_tokens, output_tokens=output_tokens, batch=batch,
                          attention_flops_per_pair=attention, overlap=overlap)


def format_long_decode(results: Sequence[LongDecodeResult]) -> str:
    """A table: one row per case, peer and host tok/s and the ratios."""
    if not results:
        return "(no cases)"
    c0 = results[0].case
    lines = [f"offloaded decode (modelled, not measured): {c0.model.name} on one H100 SXM "
             f"80 GB, prompt {c0.prompt_tokens}, output {c0.output_tokens} tokens, "
             f"{'overlapped' if c0.overlap else 'serial'} link transfers; overflow KV on a peer "
             f"GPU (NVLink {c0.links.nvlink_bytes_per_s / 1e9:.0f} GB/s) vs pinned host (PCIe "
             f"{c0.links.pcie_bytes_per_s / 1e9:.0f} GB/s)",
             f"{'batch':>5} {'KV GB':>7} {'overflow':>8} {'peer tok/s':>10} {'host tok/s':>10} "
             f"{'ratio':>6} {'decode ratio':>12} {'bound peer/host':>15} {'peer tier on host':>17}"]
    for r in results:
        c = r.case
        overflow = c.kv_bytes - c.local_bytes
        lines.append(f"{c.batch:>5} {c.kv_bytes / 1e9:>7.1f} {overflow / c.kv_bytes:>7.0%} "
                     f"{r.peer.tok_s:>10.1f} {r.host.tok_s:>10.1f} {r.ratio:>5.2f}x "
                     f"{r.decode_ratio:>11.2f}x {r.peer.bound + '/' + r.host.bound:>15} "
                     f"{r.peer.host_bytes / 1e9:>14.1f} GB")
    lines.append(f"(ratio: peer over host tok/s, prefill included; the peer tier holds "
                 f"{c0.peer_bytes / GiB:.0f} GiB of lent memory and cascades the rest to host, "
                 f"read over PCIe at the same time)")
    return "\n".join(lines)
