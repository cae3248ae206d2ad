"""Model timing: how long one engine iteration (a batch step) takes on one GPU.

A roofline: an iteration is bound either by reading memory (the weights once per iteration,
plus the KV cache of every decoding request) or by arithmetic (2 x parameters FLOPs per
token, prefill and decode tokens alike); it takes the larger of the two, plus a fixed
overhead. Left out (see docs/simulation.md): attention FLOPs (quadratic in context), kernel
launch gaps, tensor parallelism, CPU-side scheduling cost, and the activation traffic of large
prefills.

:class:`FixedStep` replaces the roofline with a constant step time: it drives synthetic
workloads (one task = one slot, one step = one "token"), such as the validation against the
real :class:`~aqua_offload.TimeSlicer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import InvalidArgumentError

__all__ = ["GPUSpec", "ModelSpec", "StepModel", "Roofline", "FixedStep", "H100_SXM", "step_model"]


@dataclass(frozen=True)
class GPUSpec:
    """Compute and memory figures of one GPU (defaults: H100 SXM5 80 GB, published specs).

    Attributes
    ----------
    hbm_bytes_per_s : float
        Peak HBM bandwidth (H100 SXM: 3.35 TB/s).
    peak_flops : float
        Dense BF16 tensor-core peak (H100 SXM: 989 TFLOPS without sparsity).
    mbu : float
        Memory-bandwidth utilisation reached by decode kernels (0.8 is typical of tuned
        engines; an assumption, not a measurement).
    mfu : float
        FLOP utilisation reached by prefill GEMMs (0.5: an assumption).
    iteration_overhead_s : float
        Fixed cost per iteration (kernel launches, sampling, scheduling).
    """

    hbm_bytes_per_s: float = 3.35e12
    peak_flops: float = 989e12
    mbu: float = 0.8
    mfu: float = 0.5
    iteration_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hbm_bytes_per_s", "peak_flops"):
            if not getattr(self, name) > 0:
                raise InvalidArgumentError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("mbu", "mfu"):
            if not 0 < getattr(self, name) <= 1:
                raise InvalidArgumentError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not self.iteration_overhead_s >= 0:
            raise InvalidArgumentError("iteration_overhead_s must be >= 0")


H100_SXM = GPUSpec()


@dataclass(frozen=True)
class ModelSpec:
    """A served model.

    Attributes
    ----------
    name : str
    params : float
        Parameter count (FLOPs per token = 2 x params).
    weights_bytes : int
        Bytes of weights resident on the GPU (params x bytes per parameter).
    kv_bytes_per_token : int
        KV-cache bytes per token of context: 2 (K and V) x layers x kv_heads x head_dim x
        dtype bytes. Llama-2-13B in BF16: 2 x 40 x 40 x 128 x 2 = 819,200 B.
    state_bytes : int
        Extra per-request state paged with the KV cache (0 for an LLM; the whole state of
        a synthetic task).
    step_s : float, optional
        If set, every iteration takes this long (:class:`FixedStep`) instead of the roofline.
    """

    name: str
    params: float
    weights_bytes: int
    kv_bytes_per_token: int
    state_bytes: int = 0
    step_s: float | None = None

    def __post_init__(self) -> None:
        if self.step_s is not None and not self.step_s > 0:
            raise InvalidArgumentError(f"model {self.name}: step_s must be > 0")
        if not self.params >= 0:
            raise InvalidArgumentError(f"model {self.name}: params must be >= 0")
        for name in ("weights_bytes", "kv_bytes_per_token", "state_bytes"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"model {self.name}: {name} must be >= 0")

    def request_bytes(self, tokens: int) -> int:
        """Bytes of one request's state with ``tokens`` tokens of context."""
        return self.state_bytes + tokens * self.kv_bytes_per_token


class StepModel(Protocol):
    """Anything that times an iteration."""

    def iteration_s(self, prefill_tokens: int, decode_requests: int,
                    kv_read_bytes: int) -> float: ...


class Roofline:
    """Iteration time of ``model`` on ``gpu``:

    ``max(2 * params * tokens / (peak_flops * mfu),
    (weights + kv_read) / (hbm * mbu)) + iteration_overhead_s``,
    where ``tokens`` counts prefill tokens plus one per decoding request.
    """

    def __init__(self, gpu: GPUSpec, model: ModelSpec) -> None:
        self.gpu = gpu
        self.model = model

    def iteration_s(self, prefill_tokens: int, decode_requests: int, kv_read_bytes: int) -> float:
        tokens = prefill_tokens + decode_requests
        if tokens == 0:
            return 0.0
        compute = 2.0 * self.model.params * tokens / (self.gpu.peak_flops * self.gpu.mfu)
        memory = (self.model.weights_bytes + kv_read_bytes) / (self.gpu.hbm_bytes_per_s *
                                                               self.gpu.mbu)
        return max(compute, memory) + self.gpu.iteration_overhead_s

    def decode_s(self, batch: int, context_tokens: int) -> float:
        """One decode step of ``batch`` requests of ``context_tokens`` each."""
        return self.iteration_s(0, batch, batch * context_tokens * self.model.kv_bytes_per_token)

    def prefill_s(self, prompt_tokens: int) -> float:
        """Prefill of one prompt of ``prompt_tokens`` tokens."""
        return self.iteration_s(prompt_tokens, 0, 0)


class FixedStep:
    """Every iteration takes ``step_s`` seconds (a synthetic task's step)."""

    def __init__(self, step_s: float) -> None:
        if not step_s > 0:
            raise InvalidArgumentError(f"step_s must be > 0, got {step_s!r}")
        self.step_s = float(step_s)

    def iteration_s(self, prefill_tokens: int, decode_requests: int, kv_read_bytes: int) -> float:
        return self.step_s if prefill_tokens + decode_requests else 0.0


def step_model(gpu: GPUSpec, model: ModelSpec) -> StepModel:
    """The iteration timer of ``model``: :class:`FixedStep` if it has ``step_s``, else the
    roofline on ``gpu``."""
    return FixedStep(model.step_s) if model.step_s is not None else Roofline(gpu, model)
