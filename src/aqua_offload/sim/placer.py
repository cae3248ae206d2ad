"""The placer: which model serves on which GPU, and who lends how much memory to whom.

Note [Placement objective]
Each model has ``replicas`` copies, one per GPU, and an expected load per replica: a burst of
``requests`` prompts (uniform ``prompt_tokens`` and ``output_tokens`` ranges). Its KV *demand*
is what the burst would reserve at once: requests x (mean prompt + mean output) x
kv_bytes_per_token. A GPU's KV *capacity* is memory - reserved - weights (a GPU that serves
nothing has memory - reserved). A GPU whose demand exceeds its capacity has a *deficit*: under
time slicing that much state is parked off the GPU at the peak. One whose capacity exceeds its
demand has *spare* memory it can lend. Lending works only inside an NVLink domain (between
domains a copy crosses PCIe and the host, which is what the host tier already is).

Within a domain any lender reaches any borrower at the same bandwidth, so the bytes covered
are min(sum of deficits, sum of spares); the placer hands the spare to the borrowers with the
tightest TTFT SLO first (largest 1/SLO), largest spare first, which is optimal for the
weighted objective below. What stays uncovered is paged to the host over PCIe, about 7x slower.

The placer minimises ``sum(uncovered_deficit / slo_s)`` (bytes that must go over PCIe,
weighted by how much their model's SLO cares), then the unweighted uncovered bytes, then the
number of (lender, borrower) pairs. With at most ``EXACT_MAX_GPUS`` GPUs it tries every
assignment of replicas to distinct GPUs (replicas of one model are interchangeable, so each
distinct assignment is scored once): exact. Beyond that it places replicas greedily, largest
demand first, each on the free GPU that scores best so far.

The naive placement it is compared with fills GPUs in order: the models' replicas in file
order on GPUs 0, 1, 2, ... (what a launch script does), with the same lending rule.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidArgumentError
from .roofline import ModelSpec
from .scenario import GPUConfig, LinkSpec, Scenario, TraceSpec, _load
from .schema import (ScenarioError, _check_keys, _fail, _get, _int, _num, _size, _table,
                     _tokens)
from .simulate import RunResult, percentile, simulate

__all__ = ["PlacementError", "PlacedModel", "ServerSpec", "PlacementProblem", "Placement",
           "EXACT_MAX_GPUS", "place", "naive_placement", "evaluate", "placement_scenario",
           "load_problem", "parse_problem", "place_and_simulate", "format_placement",
           "write_place_plot"]

EXACT_MAX_GPUS = 8
GiB = 1 << 30


class PlacementError(InvalidArgumentError):
    """No placement fits: more replicas than GPUs, weights larger than a GPU, a request larger
    than its GPU's KV memory. The message names the model and the numbers."""


@dataclass(frozen=True)
class PlacedModel:
    """A model to place, with its expected load per replica and its TTFT p99 SLO."""

    name: str
    params: float
    weights_bytes: int
    kv_bytes_per_token: int
    replicas: int = 1
    requests: int = 64
    prompt_tokens: tuple[int, int] = (128, 512)
    output_tokens: tuple[int, int] = (128, 128)
    slo_s: float = 1.0

    def spec(self) -> ModelSpec:
        return ModelSpec(self.name, self.params, self.weights_bytes, self.kv_bytes_per_token)

    def largest_request_bytes(self) -> int:
        return (self.prompt_tokens[1] + self.output_tokens[1]) * self.kv_bytes_per_token

    def demand_bytes(self) -> int:
        """KV bytes one replica's burst would reserve at once (Note [Placement objective])."""
        mean = (sum(self.prompt_tokens) + sum(self.output_tokens)) / 2
        return int(self.requests * mean * self.kv_bytes_per_token)


@dataclass(frozen=True)
class ServerSpec:
    """GPUs (memory each), their NVLink domains and the links."""

    memory_bytes: tuple[int, ...]
    domains: tuple[int, ...]
    reserved_bytes: int = 4 * GiB
    links: LinkSpec = LinkSpec()
    max_batch: int = 256

    def __post_init__(self) -> None:
        if not self.memory_bytes or len(self.memory_bytes) != len(self.domains):
            raise InvalidArgumentError("server: one memory size and one NVLink domain per GPU")

    @property
    def gpus(self) -> int:
        return len(self.memory_bytes)


@dataclass(frozen=True)
class PlacementProblem:
    """Models and a server (see :func:`load_problem` for the file format)."""

    name: str
    server: ServerSpec
    models: tuple[PlacedModel, ...]
    quantum_s: float = 0.25
    window_s: float = 1.0


@dataclass
class Placement:
    """An assignment (``gpu_model[g]``: the model GPU ``g`` serves, or None) and its loans
    (``loans[(lender, borrower)]``: bytes), with the scores of Note [Placement objective]."""

    gpu_model: list[str | None]
    loans: dict[tuple[int, int], int] = field(default_factory=dict)
    deficit: dict[int, int] = field(default_factory=dict)     # per borrowing GPU
    spare: dict[int, int] = field(default_factory=dict)       # per GPU with memory to spare
    uncovered: dict[int, int] = field(default_factory=dict)   # per borrowing GPU, to host
    cost: tuple[float, int, int] = (0.0, 0, 0)
    method: str = ""

    def lends(self, gpu: int) -> int:
        """Bytes the plan lends from ``gpu`` (its loans summed)."""
        return sum(b for (lender, _), b in self.loans.items() if lender == gpu)

    def pool(self, gpu: int) -> int:
        """Bytes ``gpu`` offers its domain when it lends at all: its whole spare. The loans
        are sized by the peak-deficit estimate; parked state can exceed it (stale prefetches,
        uneven bursts), and spare memory costs its owner nothing to offer."""
        return self.spare.get(gpu, 0) if self.lends(gpu) else 0

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "gpu_model": self.gpu_model,
                "loans": [{"lender": a, "borrower": b, "bytes": n}
                          for (a, b), n in sorted(self.loans.items())],
                "deficit_bytes": {str(g): n for g, n in sorted(self.deficit.items())},
                "pool_bytes": {str(g): self.pool(g) for g in range(len(self.gpu_model))
                               if self.pool(g)},
                "uncovered_bytes": {str(g): n for g, n in sorted(self.uncovered.items())},
                "weighted_uncovered": self.cost[0], "uncovered_total": self.cost[1]}


# -- scoring ---------------------------------------------------------------------------------
def _capacity(problem: PlacementProblem, gpu: int, model: PlacedModel | None) -> int:
    s = problem.server
    return s.memory_bytes[gpu] - s.reserved_bytes - (model.weights_bytes if model else 0)


def _check_fits(problem: PlacementProblem, gpu: int, model: PlacedModel) -> bool:
    cap = _capacity(problem, gpu, model)
    return cap >= model.largest_request_bytes()


def evaluate(problem: PlacementProblem, gpu_model: Sequence[str | None],
             method: str = "") -> Placement:
    """Score an assignment and decide its loans (Note [Placement objective]). Raises
    :class:`PlacementError` if a model does not fit the GPU it is assigned to."""
    models = {m.name: m for m in problem.models}
    deficit: dict[int, int] = {}
    spare: dict[int, int] = {}
    for g, name in enumerate(gpu_model):
        m = models[name] if name is not None else None
        if m is not None and not _check_fits(problem, g, m):
            raise PlacementError(
                f"model {name} does not fit GPU {g}: {problem.server.memory_bytes[g]} B of "
                f"memory - {problem.server.reserved_bytes} B reserved - {m.weights_bytes} B of "
                f"weights leaves {_capacity(problem, g, m)} B of KV, its largest request "
                f"needs {m.largest_request_bytes()} B")
        left = _capacity(problem, g, m) - (m.demand_bytes() if m else 0)
        if left < 0:
            deficit[g] = -left
        elif left > 0:
            spare[g] = left
    loans: dict[tuple[int, int], int] = {}
    uncovered = dict(deficit)
    for d in sorted(set(problem.server.domains)):
        borrowers = sorted((g for g in deficit if problem.server.domains[g] == d),
                           key=lambda g: (-1.0 / models[gpu_model[g]].slo_s, g))  # type: ignore
        lenders = sorted((g for g in spare if problem.server.domains[g] == d),
                         key=lambda g: (-spare[g], g))
        left = {g: spare[g] for g in lenders}
        for b in borrowers:
            for lender in lenders:
                if uncovered[b] == 0:
                    break
                take = min(left[lender], uncovered[b])
                if take > 0:
                    loans[(lender, b)] = take
                    left[lender] -= take
                    uncovered[b] -= take
    weighted = sum(n / models[gpu_model[g]].slo_s for g, n in uncovered.items())  # type: ignore
    return Placement(list(gpu_model), loans, deficit, spare, uncovered,
                     (weighted, sum(uncovered.values()), len(loans)), method)


def _replicas(problem: PlacementProblem) -> list[str]:
    out = [m.name for m in problem.models for _ in range(m.replicas)]
    if len(out) > problem.server.gpus:
        raise PlacementError(f"{len(out)} replicas do not fit {problem.server.gpus} GPUs (one "
                             "replica per GPU)")
    for m in problem.models:
        if not any(_check_fits(problem, g, m) for g in range(problem.server.gpus)):
            raise PlacementError(
                f"model {m.name} fits no GPU: weights {m.weights_bytes} B + reserved "
                f"{problem.server.reserved_bytes} B + its largest request "
                f"{m.largest_request_bytes()} B exceed the largest GPU "
                f"({max(problem.server.memory_bytes)} B)")
    return out


def naive_placement(problem: PlacementProblem) -> Placement:
    """Replicas in file order on GPUs 0, 1, 2, ... (the launch-script placement)."""
    reps = _replicas(problem)
    return evaluate(problem, reps + [None] * (problem.server.gpus - len(reps)), "naive")


def place(problem: PlacementProblem, exact_max_gpus: int = EXACT_MAX_GPUS) -> Placement:
    """The best placement: exhaustive for at most ``exact_max_gpus`` GPUs, greedy beyond
    (Note [Placement objective]). Raises :class:`PlacementError` when none fits."""
    reps = _replicas(problem)
    n = problem.server.gpus
    if n <= exact_max_gpus:
        return _exact(problem, reps)
    return _greedy(problem, reps)


def _exact(problem: PlacementProblem, reps: list[str]) -> Placement:
    n = problem.server.gpus
    best: Placement | None = None
    seen: set[tuple[str | None, ...]] = set()
    for gpus in itertools.permutations(range(n), len(reps)):
        gm: list[str | None] = [None] * n
        for name, g in zip(reps, gpus):
            gm[g] = name
        key = tuple(gm)
        if key in seen:  # the same assignment with replicas of a model swapped
            continue
        seen.add(key)
        try:
            p = evaluate(problem, gm, "exact")
        except PlacementError:
            continue
        if best is None or (p.cost, _order(p)) < (best.cost, _order(best)):
            best = p
    if best is None:
        raise PlacementError("no assignment of the replicas to GPUs fits every model (each "
                             "model fits some GPU, but not all of them at once)")
    return best


def _order(p: Placement) -> tuple[int, ...]:
    # Deterministic tie-break: the assignment whose served GPUs come first.
    return tuple(k for k, m in enumerate(p.gpu_model) if m is not None)


def _greedy(problem: PlacementProblem, reps: list[str]) -> Placement:
    models = {m.name: m for m in problem.models}
    order = sorted(reps, key=lambda r: (-models[r].demand_bytes() / models[r].slo_s, r))
    gm: list[str | None] = [None] * problem.server.gpus
    for name in order:
        best: tuple[Any, int] | None = None
        for g in range(problem.server.gpus):
            if gm[g] is not None or not _check_fits(problem, g, models[name]):
                continue
            gm[g] = name
            cost = evaluate(problem, gm).cost
            gm[g] = None
            if best is None or (cost, g) < best:
                best = (cost, g)
        if best is None:
            raise PlacementError(f"greedy placement: no free GPU fits model {name}")
        gm[best[1]] = name
    return evaluate(problem, gm, "greedy")


# -- simulation ------------------------------------------------------------------------------
def placement_scenario(problem: PlacementProblem, placement: Placement, seed: int = 0
                       ) -> Scenario:
    """The simulator's scenario of a placement: each GPU serves its model; a GPU the plan
    lends from offers its whole spare (:meth:`Placement.pool`) within its NVLink domain; one
    burst per model (its replicas' requests, routed round robin). GPUs that serve nothing get an idle one-parameter model
    (the simulator wants every GPU to be described; it receives no requests)."""
    s = problem.server
    models = {m.name: m.spec() for m in problem.models}
    models["idle"] = ModelSpec("idle", 1.0, 0, 0)
    gpus = []
    for g, name in enumerate(placement.gpu_model):
        gpus.append(GPUConfig(g, s.memory_bytes[g], name or "idle", placement.pool(g),
                              s.reserved_bytes, s.max_batch, nvlink_domain=s.domains[g]))
    traces = tuple(TraceSpec("burst", m.requests * m.replicas, m.prompt_tokens, m.output_tokens,
                             window_s=problem.window_s, model=m.name) for m in problem.models)
    return Scenario(name=f"{problem.name}-{placement.method}", gpus=tuple(gpus), models=models,
                    traces=traces, links=s.links, quantum_s=problem.quantum_s,
                    policies=("fair",), tiers=("peer",), seed=seed)


def _per_model(problem: PlacementProblem, placement: Placement, r: RunResult
               ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in problem.models:
        reqs = [q for q in r.requests if placement.gpu_model[q.gpu] == m.name]
        ttft = sorted(q.ttft_s for q in reqs)
        p99 = percentile(ttft, 99)
        out[m.name] = {"requests": len(reqs), "ttft_p50_s": percentile(ttft, 50),
                       "ttft_p99_s": p99, "slo_s": m.slo_s, "slo_met": p99 <= m.slo_s}
    return out


def simulate_placement(problem: PlacementProblem, placement: Placement, seed: int = 0,
                       policy: str = "fair") -> dict[str, Any]:
    """Serve the problem's load on ``placement`` (``policy`` with peer paging)."""
    sc = placement_scenario(problem, placement, seed)
    r = simulate(sc, policy, "peer")
    return {"placement": placement.to_json(), "policy": f"{policy}/peer",
            "ttft_p50_s": r.ttft_p50_s, "ttft_p99_s": r.ttft_p99_s,
            "throughput_tok_s": r.throughput_tok_s, "makespan_s": r.makespan_s,
            "paged_bytes": r.paged_bytes, "host_fallback_bytes": r.fallback_bytes,
            "models": _per_model(problem, placement, r)}


def place_and_simulate(problem: PlacementProblem, seed: int | None = None) -> dict[str, Any]:
    """Place, simulate the placement and the naive one under fair with peer paging."""
    chosen, naive = place(problem), naive_placement(problem)
    a = simulate_placement(problem, chosen, seed or 0)
    b = simulate_placement(problem, naive, seed or 0)
    return {"problem": problem.name, "placer": a, "naive": b,
            "throughput_ratio": a["throughput_tok_s"] / b["throughput_tok_s"],
            "ttft_p99_gain": b["ttft_p99_s"] / a["ttft_p99_s"],
            "slo_met": {"placer": sum(v["slo_met"] for v in a["models"].values()),
                        "naive": sum(v["slo_met"] for v in b["models"].values()),
                        "models": len(problem.models)},
            "emulated": "simulation (no hardware involved)"}


def format_placement(doc: dict[str, Any]) -> str:
    """A text report of :func:`place_and_simulate`."""
    lines = [f"placement of {doc['problem']} (simulated, fair scheduling, peer paging)"]
    for who in ("placer", "naive"):
        d = doc[who]
        p = d["placement"]
        lines.append(f"{who} ({p['method']}): " + "  ".join(
            f"gpu{g}={m or '-'}" for g, m in enumerate(p["gpu_model"])))
        loans = ", ".join(f"gpu{x['lender']}->gpu{x['borrower']} {x['bytes'] / GiB:.1f} GiB"
                          for x in p["loans"]) or "none"
        lines.append(f"  loans: {loans}")
        lines.append(f"  to host (uncovered): {p['uncovered_total'] / GiB:.1f} GiB; TTFT p50 "
                     f"{d['ttft_p50_s']:.2f} s, p99 {d['ttft_p99_s']:.2f} s, "
                     f"{d['throughput_tok_s']:.0f} tok/s, host fallback "
                     f"{d['host_fallback_bytes'] / GiB:.1f} GiB")
        for name, m in d["models"].items():
            lines.append(f"  {name:<14} TTFT p99 {m['ttft_p99_s']:>7.2f} s (SLO "
                         f"{m['slo_s']:g} s: {'met' if m['slo_met'] else 'missed'})")
    lines.append(f"placer vs naive: throughput x{doc['throughput_ratio']:.2f}, TTFT p99 gain "
                 f"x{doc['ttft_p99_gain']:.2f}, SLOs met {doc['slo_met']['placer']} vs "
                 f"{doc['slo_met']['naive']} of {doc['slo_met']['models']}")
    return "\n".join(lines)


def write_place_plot(path: Any, doc: dict[str, Any]) -> None:
    """A bar chart of per-model TTFT p99, placer vs naive, with the SLOs (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt
    names = list(doc["placer"]["models"])
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 3, 4))
    xs = range(len(names))
    for k, who in enumerate(("naive", "placer")):
        ax.bar([x + 0.38 * k for x in xs], [doc[who]["models"][n]["ttft_p99_s"] for n in names],
               width=0.38, label=who)
    ax.scatter([x + 0.19 for x in xs], [doc["placer"]["models"][n]["slo_s"] for n in names],
               marker="_", s=400, color="k", label="SLO")
    ax.set_xticks([x + 0.19 for x in xs], names)
    ax.set_ylabel("TTFT p99 (s)")
    ax.set_title(f"{doc['problem']}: placer vs naive (simulated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- problem files ---------------------------------------------------------------------------
def parse_problem(data: Any, name: str = "placement") -> PlacementProblem:
    """A :class:`PlacementProblem` from a parsed TOML document::

        name = "..."
        quantum_ms = 250
        window_s = 1.0
        [server]
        gpus = 8                      # or memory = ["80GiB", ...] one per GPU
        memory = "80GiB"
        reserved = "4GiB"
        nvlink_domains = [[0, 1, 2, 3], [4, 5, 6, 7]]   # default: one domain
        [models.NAME]
        params = 13e9
        bytes_per_param = 2           # or weights = "26GB"
        kv_bytes_per_token = 819200
        replicas = 2
        requests = 128                # burst per replica
        prompt_tokens = [128, 1024]
        output_tokens = 256
        slo_ms = 5000                 # TTFT p99 target

    Raises :class:`~aqua_offload.sim.ScenarioError` naming the key for a bad file.
    """
    d = _table(data, "")
    _check_keys(d, "", ("name", "description", "quantum_ms", "window_s", "server", "models"))
    # description: for the reader of the file only
    srv = _table(_get(d, "server", "", lambda v, p: v), "server")
    _check_keys(srv, "server", ("gpus", "memory", "reserved", "nvlink_domains", "max_batch"))
    n = _get(srv, "gpus", "server", _int(1, 4096))
    mem = srv.get("memory", "80GiB")
    if isinstance(mem, list):
        memory = tuple(_size(v, f"server.memory[{k}]") for k, v in enumerate(mem))
        if len(memory) != n:
            raise _fail("server.memory", f"{len(memory)} sizes for {n} GPUs")
    else:
        memory = (_size(mem, "server.memory"),) * n
    domains = [0] * n
    groups = srv.get("nvlink_domains", [list(range(n))])
    if not isinstance(groups, list) or not all(isinstance(x, list) for x in groups):
        raise _fail("server.nvlink_domains", "expected a list of lists of GPU indices")
    seen: set[int] = set()
    for k, grp in enumerate(groups):
        for g in grp:
            g = _int(0, n - 1)(g, f"server.nvlink_domains[{k}]")
            if g in seen:
                raise _fail(f"server.nvlink_domains[{k}]", f"GPU {g} is in two domains")
            seen.add(g)
            domains[g] = k
    if seen != set(range(n)):
        raise _fail("server.nvlink_domains", f"GPUs {sorted(set(range(n)) - seen)} are in "
                                              "no domain")
    server = ServerSpec(memory, tuple(domains), _get(srv, "reserved", "server", _size, 4 * GiB),
                        max_batch=_get(srv, "max_batch", "server", _int(1), 256))
    models = []
    for mname, t in _table(_get(d, "models", "", lambda v, p: v), "models").items():
        path = f"models.{mname}"
        t = _table(t, path)
        _check_keys(t, path, ("params", "bytes_per_param", "weights", "kv_bytes_per_token",
                              "replicas", "requests", "prompt_tokens", "output_tokens",
                              "slo_ms"))
        params = _get(t, "params", path, _num(0.0, strict=True))
        weights = _get(t, "weights", path, _size, None)
        if weights is None:
            weights = int(params * _get(t, "bytes_per_param", path, _num(), 2.0))
        elif "bytes_per_param" in t:
            raise _fail(f"{path}.bytes_per_param", "give either weights or bytes_per_param")

        def rng(key: str, default: int) -> tuple[int, int]:
            v = _get(t, key, path, _tokens, default)
            return v if isinstance(v, tuple) else (v, v)
        models.append(PlacedModel(
            str(mname), params, weights, _get(t, "kv_bytes_per_token", path, _size),
            _get(t, "replicas", path, _int(1, 4096), 1), _get(t, "requests", path, _int(1), 64),
            rng("prompt_tokens", 512), rng("output_tokens", 128),
            _get(t, "slo_ms", path, _num(0.0, strict=True), 1000.0) / 1e3))
    if not models:
        raise _fail("models", "at least one model is needed")
    return PlacementProblem(_get(d, "name", "", lambda v, p: str(v), name), server,
                            tuple(models),
                            _get(d, "quantum_ms", "", _num(0.0, strict=True), 250.0) / 1e3,
                            _get(d, "window_s", "", _num(), 1.0))


def load_problem(path: str | Path | None = None) -> PlacementProblem:
    """A placement problem from a ``.toml`` file (None: the built-in example,
    ``placements/example.toml``)."""
    if path is None:
        f = resources.files(__package__).joinpath("placements").joinpath("example.toml")
        return parse_problem(_load(f.read_text(), "example.toml"), "example")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read placement problem {p}: {exc}") from None
    return parse_problem(_load(text, str(p)), p.stem)

