"""Scenarios: a server, its models, its traffic and what to compare, from TOML or YAML.

A scenario file is validated strictly: an unknown key, a value of the wrong type, a negative
size or an impossible memory layout raises :class:`ScenarioError` whose message starts with the
key path (``gpus[1].lends: ...``), so a typo never silently falls back to a default. Sizes
accept ints or strings such as ``"80GiB"`` (:func:`aqua_offload.sizes.parse_size`). The
built-in scenarios ship as ``scenarios/*.toml`` next to this module; see docs/simulation.md for
every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from .roofline import GPUSpec, ModelSpec
from .schema import (ScenarioError, _bool, _check_keys, _choices, _fail, _get, _int, _num,
                     _size, _str, _table, _tokens)
from .trace import TraceError, TraceRequest, burst_trace, load_csv_trace, poisson_trace

__all__ = ["Scenario", "GPUConfig", "LinkSpec", "ReclaimSpec", "TraceSpec", "ScenarioError",
           "load_scenario", "parse_scenario", "builtin_scenarios", "POLICIES", "TIERS"]

POLICIES = ("admission", "fcfs", "rr", "fair")
TIERS = ("host", "peer")
MAX_REQUESTS = 1_000_000  # per trace stream: a simulation of more would not end in minutes
MAX_GPUS = 4096           # in all: a server, not a data centre


@dataclass(frozen=True)
class LinkSpec:
    """Per-direction link figures (defaults: published H100 SXM measurements, one way).

    Attributes
    ----------
    pcie_bytes_per_s : float
        GPU <-> host over PCIe Gen5 x16: ~55 GB/s measured one way (64 GB/s theoretical).
    pcie_latency_s : float
        Per-transfer latency over PCIe (an assumption: ~10 us incl. DMA setup).
    nvlink_bytes_per_s : float
        One GPU's NVLink 4 port through NVSwitch: ~370 GB/s measured one way (450 nominal).
    nvlink_latency_s : float
        Per-transfer latency over NVLink (an assumption: ~5 us).
    """

    pcie_bytes_per_s: float = 55e9
    pcie_latency_s: float = 10e-6
    nvlink_bytes_per_s: float = 370e9
    nvlink_latency_s: float = 5e-6


@dataclass(frozen=True)
class GPUConfig:
    """One GPU. ``serves`` makes it a consumer (it runs that model's requests); ``lends_bytes``
    makes it a producer (that much memory holds other GPUs' paged-out state)."""

    index: int
    memory_bytes: int
    serves: str | None = None
    lends_bytes: int = 0
    reserved_bytes: int = 0      # activations and workspace: never used for KV
    max_batch: int = 256         # most requests resident (holding a turn) at once
    max_prefill_tokens: int = 8192  # prefill tokens per iteration (chunk budget)
    nvlink_domain: int = 0       # GPUs page to each other's loans only within one domain


@dataclass(frozen=True)
class ReclaimSpec:
    """At ``at_s`` the lender ``gpu`` takes back ``nbytes`` of its loan (None: all of it)."""

    gpu: int
    at_s: float
    nbytes: int | None = None


@dataclass(frozen=True)
class TraceSpec:
    """How to build one stream of requests (``kind``: burst, poisson or csv)."""

    kind: str
    requests: int = 0
    prompt_tokens: int | tuple[int, int] = 512
    output_tokens: int | tuple[int, int] = 128
    at_s: float = 0.0
    window_s: float = 0.0
    rate_per_s: float = 1.0
    path: str | None = None
    model: str | None = None
    weight: float = 1.0  # fair-share weight of every request of a burst or poisson stream
    rows: tuple[TraceRequest, ...] | None = field(default=None, compare=False, repr=False)
    # ^ a csv trace as read (and checked) when the scenario was loaded: it is read once

    def build(self, seed: int) -> list[TraceRequest]:
        if self.kind == "burst":
            return burst_trace(self.requests, self.prompt_tokens, self.output_tokens,
                               at_s=self.at_s, window_s=self.window_s, seed=seed,
                               model=self.model, weight=self.weight)
        if self.kind == "poisson":
            return poisson_trace(self.requests, self.rate_per_s, self.prompt_tokens,
                                 self.output_tokens, start_s=self.at_s, seed=seed,
                                 model=self.model, weight=self.weight)
        reqs = list(self.rows) if self.rows is not None else load_csv_trace(self.path or "")
        return [r if r.model or not self.model else replace(r, model=self.model) for r in reqs]


@dataclass(frozen=True)
class Scenario:
    """Everything one simulation run needs (see docs/simulation.md for the file format)."""

    name: str
    gpus: tuple[GPUConfig, ...]
    models: dict[str, ModelSpec]
    traces: tuple[TraceSpec, ...]
    description: str = ""
    gpu_spec: GPUSpec = field(default_factory=GPUSpec)
    links: LinkSpec = field(default_factory=LinkSpec)
    reclaims: tuple[ReclaimSpec, ...] = ()
    quantum_s: float = 0.1
    policies: tuple[str, ...] = POLICIES
    tiers: tuple[str, ...] = TIERS
    seed: int = 0
    prefetch: bool = True

    def trace(self) -> list[TraceRequest]:
        """The scenario's requests, all streams merged by arrival time (stable). Raises
        :class:`ScenarioError` naming the stream (``traces[1]: ...``) for one that cannot be
        built (e.g. arrival times that overflow)."""
        reqs: list[TraceRequest] = []
        for k, spec in enumerate(self.traces):
            try:
                reqs.extend(spec.build(self.seed + 1000 * k))
            except (TraceError, OverflowError) as exc:
                raise ScenarioError(f"traces[{k}]: {exc}") from None
        default = next(g.serves for g in self.gpus if g.serves)
        reqs = [r if r.model else replace(r, model=default) for r in reqs]
        for r in reqs:
            if not any(g.serves == r.model for g in self.gpus):
                raise ScenarioError(f"traces: a request targets model {r.model!r}, which no GPU "
                                    "serves")
        return sorted(reqs, key=lambda r: r.arrival_s)


# -- parsing ---------------------------------------------------------------------------------
_TOP = ("name", "description", "seed", "quantum_ms", "policies", "tiers", "prefetch", "gpu",
        "links", "models", "gpus", "reclaims", "traces")
_TRACE_KEYS = {"burst": ("kind", "requests", "prompt_tokens", "output_tokens", "at_s",
                         "window_s", "model", "weight"),
               "poisson": ("kind", "requests", "prompt_tokens", "output_tokens", "at_s",
                           "rate_per_s", "model", "weight"),
               "csv": ("kind", "path", "model")}


def _list_of_tables(d: dict[str, Any], key: str, required: bool) -> list[dict[str, Any]]:
    if key not in d:
        if required:
            raise _fail(key, "required key is missing")
        return []
    v = d[key]
    if not isinstance(v, list) or (required and not v):
        raise _fail(key, f"expected a non-empty list of tables, got {v!r}")
    return [_table(x, f"{key}[{k}]") for k, x in enumerate(v)]


def _parse_models(d: dict[str, Any]) -> dict[str, ModelSpec]:
    models = {}
    for name, spec in _table(d, "models").items():
        if not isinstance(name, str):  # YAML: `1: {...}` is an int key
            raise _fail(f"models.{name!r}", f"a model name must be a string, got "
                        f"{type(name).__name__} (quote it: \"{name}\")")
        path = f"models.{name}"
        t = _table(spec, path)
        _check_keys(t, path, ("params", "bytes_per_param", "weights", "kv_bytes_per_token",
                              "state", "step_ms"))
        params = _get(t, "params", path, _num())
        weights = _get(t, "weights", path, _size, None)
        if weights is None:
            weights = int(params * _get(t, "bytes_per_param", path, _num(), 2.0))
        elif "bytes_per_param" in t:
            raise _fail(f"{path}.bytes_per_param", "give either weights or bytes_per_param")
        step_ms = _get(t, "step_ms", path, _num(0.0, strict=True), None)
        models[name] = ModelSpec(name, params, weights, _get(t, "kv_bytes_per_token", path, _size),
                                 _get(t, "state", path, _size, 0),
                                 None if step_ms is None else step_ms / 1e3)
    if not models:
        raise _fail("models", "at least one model is needed")
    return models


def _parse_gpus(d: dict[str, Any], models: dict[str, ModelSpec]) -> tuple[GPUConfig, ...]:
    gpus: list[GPUConfig] = []
    for k, t in enumerate(_list_of_tables(d, "gpus", required=True)):
        path = f"gpus[{k}]"
        _check_keys(t, path, ("count", "memory", "serves", "lends", "reserved", "max_batch",
                              "max_prefill_tokens", "nvlink_domain"))
        serves = _get(t, "serves", path, _str, None)
        if serves is not None and serves not in models:
            raise _fail(f"{path}.serves", f"unknown model {serves!r} (models: "
                        f"{', '.join(models)})")
        memory = _get(t, "memory", path, _size)
        lends = _get(t, "lends", path, _size, 0)
        reserved = _get(t, "reserved", path, _size, 0)
        weights = models[serves].weights_bytes if serves else 0
        if weights + lends + reserved > memory:
            raise _fail(path, f"weights ({weights} B) + lends ({lends} B) + reserved "
                        f"({reserved} B) exceed memory ({memory} B)")
        count = _get(t, "count", path, _int(1, MAX_GPUS), 1)
        if len(gpus) + count > MAX_GPUS:
            raise _fail(f"{path}.count", f"more than {MAX_GPUS} GPUs in all")
        for _ in range(count):
            gpus.append(GPUConfig(len(gpus), memory, serves, lends, reserved,
                                  _get(t, "max_batch", path, _int(1), 256),
                                  _get(t, "max_prefill_tokens", path, _int(1), 8192),
                                  _get(t, "nvlink_domain", path, _int(0), 0)))
    if not any(g.serves for g in gpus):
        raise _fail("gpus", "no GPU serves a model (set serves = \"<model>\" on one)")
    return tuple(gpus)


def _parse_traces(d: dict[str, Any], base_dir: Path | None) -> tuple[TraceSpec, ...]:
    specs = []
    for k, t in enumerate(_list_of_tables(d, "traces", required=True)):
        path = f"traces[{k}]"
        kind = _get(t, "kind", path, _str)
        if kind not in _TRACE_KEYS:
            raise _fail(f"{path}.kind", f"{kind!r} is not one of {', '.join(_TRACE_KEYS)}")
        _check_keys(t, path, _TRACE_KEYS[kind])
        model = _get(t, "model", path, _str, None)
        if kind == "csv":
            file = Path(_get(t, "path", path, _str))
            if not file.is_absolute() and base_dir is not None:
                file = base_dir / file
            try:
                rows = load_csv_trace(file)  # fail now, with the key path, not mid-run
            except TraceError as exc:
                raise _fail(f"{path}.path", str(exc)) from None
            specs.append(TraceSpec("csv", path=str(file), model=model, rows=tuple(rows)))
            continue
        specs.append(TraceSpec(
            kind, requests=_get(t, "requests", path, _int(1, MAX_REQUESTS)),
            prompt_tokens=_get(t, "prompt_tokens", path, _tokens, 512),
            output_tokens=_get(t, "output_tokens", path, _tokens, 128),
            at_s=_get(t, "at_s", path, _num(), 0.0),
            window_s=_get(t, "window_s", path, _num(), 0.0),
            rate_per_s=_get(t, "rate_per_s", path, _num(0.0, strict=True), 1.0), model=model,
            weight=_get(t, "weight", path, _num(0.0, strict=True), 1.0)))
    return tuple(specs)


def parse_scenario(data: Any, *, name: str = "scenario",
                   base_dir: Path | None = None) -> Scenario:
    """A :class:`Scenario` from a parsed TOML/YAML document (strictly validated)."""
    d = _table(data, "")
    _check_keys(d, "", _TOP)
    models = _parse_models(_get(d, "models", "", lambda v, p: _table(v, p)))
    gpus = _parse_gpus(d, models)
    gt = _table(d.get("gpu", {}), "gpu")
    _check_keys(gt, "gpu", tuple(GPUSpec.__dataclass_fields__))
    try:
        gpu_spec = GPUSpec(**{k: _num()(v, f"gpu.{k}") for k, v in gt.items()})
    except InvalidArgumentError as exc:
        raise _fail("gpu", str(exc)) from None
    lt = _table(d.get("links", {}), "links")
    _check_keys(lt, "links", tuple(LinkSpec.__dataclass_fields__))
    links = LinkSpec(**{k: _num(0.0, strict=k.endswith("per_s"))(v, f"links.{k}")
                        for k, v in lt.items()})
    reclaims = []
    for k, t in enumerate(_list_of_tables(d, "reclaims", required=False)):
        path = f"reclaims[{k}]"
        _check_keys(t, path, ("gpu", "at_s", "bytes"))
        g = _get(t, "gpu", path, _int(0))
        if g >= len(gpus) or gpus[g].lends_bytes == 0:
            raise _fail(f"{path}.gpu", f"GPU {g} lends no memory (lenders: "
                        f"{[x.index for x in gpus if x.lends_bytes]})")
        reclaims.append(ReclaimSpec(g, _get(t, "at_s", path, _num()),
                                    _get(t, "bytes", path, _size, None)))
    scenario = Scenario(
        name=_get(d, "name", "", _str, name), gpus=gpus, models=models,
        traces=_parse_traces(d, base_dir), description=_get(d, "description", "", _str, ""),
        gpu_spec=gpu_spec, links=links, reclaims=tuple(reclaims),
        quantum_s=_get(d, "quantum_ms", "", _num(0.0, strict=True), 100.0) / 1e3,
        policies=_get(d, "policies", "", _choices(POLICIES), POLICIES),
        tiers=_get(d, "tiers", "", _choices(TIERS), TIERS),
        seed=_get(d, "seed", "", _int(0), 0), prefetch=_get(d, "prefetch", "", _bool, True))
    for k, spec in enumerate(scenario.traces):
        if spec.model is not None and not any(g.serves == spec.model for g in gpus):
            raise _fail(f"traces[{k}].model", f"no GPU serves {spec.model!r}")
    return scenario


def builtin_scenarios() -> dict[str, str]:
    """Built-in scenario names and their one-line descriptions."""
    out = {}
    for f in sorted(resources.files(__package__).joinpath("scenarios").iterdir(),
                    key=lambda f: f.name):
        if f.name.endswith(".toml"):
            out[f.name[:-5]] = _load(f.read_text(), f.name).get("description", "")
    return out


def _load(text: str, source: str, fmt: str = "toml") -> Any:
    """Parse ``text`` as TOML or YAML (``fmt``); a missing parser or a syntax error raises
    :class:`ScenarioError` naming ``source``."""
    try:
        if fmt == "toml":
            try:
                import tomllib as parser  # Python >= 3.11
            except ModuleNotFoundError:
                import tomli as parser  # type: ignore[no-redef]
            errors: Any = parser.TOMLDecodeError
        else:
            import yaml as parser  # type: ignore[no-redef]
            errors = parser.YAMLError
    except ModuleNotFoundError:
        need = ("Python >= 3.11 or the 'tomli' package (pip install tomli)" if fmt == "toml"
                else "the 'PyYAML' package (pip install pyyaml), or write the scenario in TOML")
        raise ScenarioError(f"{source}: reading {fmt.upper()} needs {need}") from None
    try:
        return parser.loads(text) if fmt == "toml" else parser.safe_load(text)
    except errors as exc:
        raise ScenarioError(f"{source}: not valid {fmt.upper()}: {exc}") from None


def load_scenario(spec: str | Path) -> Scenario:
    """A built-in scenario by name (``paper-burst``, ``long-prompt``) or a ``.toml``,
    ``.yaml`` or ``.yml`` file. Raises :class:`ScenarioError` for anything unusable."""
    text_name = str(spec)
    builtin = resources.files(__package__).joinpath("scenarios").joinpath(f"{text_name}.toml")
    if "/" not in text_name and "\\" not in text_name and builtin.is_file():
        return parse_scenario(_load(builtin.read_text(), f"{text_name}.toml"),
                              name=text_name)
    path = Path(spec)
    if not path.is_file():
        raise ScenarioError(f"no scenario {text_name!r}: not a file, and not a built-in "
                            f"scenario ({', '.join(builtin_scenarios())})")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ScenarioError(f"{path}: unknown scenario format {suffix!r} (use .toml or .yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                            ) from None
    data = _load(text, str(path), "toml" if suffix == ".toml" else "yaml")
    return parse_scenario(data, name=path.stem, base_dir=path.parent)
