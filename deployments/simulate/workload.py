"""Arrivals of a simulated run: generated (Poisson, phases for bursts, diurnal, all at once, evenly spread) or read
from a trace, each with its request resolved by the app's own request code (serve/request.py, the preset's
defaults) into the parameters its plan and costs come from."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from deployments.simulate.config import RequestKind, WorkloadConfig
from serve.models import PRESETS
from serve.request import GenerationParams, VideoRequest


@dataclass(frozen=True)
class Arrival:
    """One request reaching the ingress."""

    t: float
    params: GenerationParams
    klass: str
    priority: int


def _pick(mix: list[RequestKind], rng: random.Random) -> RequestKind:
    return rng.choices(mix, weights=[kind.weight for kind in mix])[0]


def _poisson(rng: random.Random, start: float, duration: float, rate_per_hour: float) -> list[float]:
    times, t, rate = [], start, rate_per_hour / 3600
    if rate <= 0:
        return times
    while True:
        t += rng.expovariate(rate)
        if t >= start + duration:
            return times
        times.append(t)


def _diurnal(rng: random.Random, config: WorkloadConfig) -> list[float]:
    """Poisson with rate r(t) = mean (1 + amplitude sin(2 pi t / period)), by thinning."""
    peak = config.rate_per_hour * (1 + config.amplitude)
    times = []
    for t in _poisson(rng, 0.0, config.duration_s, peak):
        rate = config.rate_per_hour * (1 + config.amplitude * math.sin(2 * math.pi * t / config.period_s))
        if rng.random() * peak < rate:
            times.append(t)
    return times


class Resolver:
    """Request fields -> GenerationParams through VideoRequest.resolve, once per distinct request."""

    def __init__(self, preset: str):
        if preset not in PRESETS:
            raise ValueError(f"`workload.preset` {preset!r} is not a preset; presets: {', '.join(PRESETS)}")
        self._defaults = PRESETS[preset].defaults
        self._cache: dict[str, GenerationParams] = {}

    def __call__(self, request: dict) -> GenerationParams:
        key = json.dumps(request, sort_keys=True)
        if key not in self._cache:
            fields = {"prompt": "simulated", "seed": 0, **request}
            try:
                self._cache[key] = VideoRequest(**fields).resolve(self._defaults)
            except Exception as e:  # pydantic's or InvalidRequest: one line naming the request
                raise ValueError(f"workload request {request}: {e}") from None
        return self._cache[key]


def arrivals(config: WorkloadConfig, seed: int, config_dir: Path | None = None) -> list[Arrival]:
    """Every arrival of the run, in time order (deterministic for a seed)."""
    rng = random.Random(seed)
    resolve = Resolver(config.preset)

    def make(t: float, mix: list[RequestKind]) -> Arrival:
        kind = _pick(mix, rng)
        return Arrival(t, resolve(kind.request), kind.klass, kind.priority)

    if config.kind == "trace":
        return read_trace(Path(config.trace) if config_dir is None or Path(config.trace).is_absolute()
                          else config_dir / config.trace, resolve)
    if config.kind == "at-once":
        return [make(0.0, config.mix) for _ in range(config.count)]
    if config.kind == "uniform":
        return [make(i * config.duration_s / config.count, config.mix) for i in range(config.count)]
    if config.kind == "poisson":
        return [make(t, config.mix) for t in _poisson(rng, 0.0, config.duration_s, config.rate_per_hour)]
    if config.kind == "diurnal":
        return [make(t, config.mix) for t in _diurnal(rng, config)]
    out, start = [], 0.0
    for _ in range(config.repeat):
        for phase in config.phases:
            mix = phase.mix or config.mix
            out += [make(t, mix) for t in _poisson(rng, start, phase.duration_s, phase.rate_per_hour)]
            start += phase.duration_s
    return out


def read_trace(path: Path, resolve: Resolver) -> list[Arrival]:
    """A JSON-lines trace: {"t": seconds, "request": {VideoRequest fields}, "class": str, "priority": int} per line
    (class and priority optional); a ValueError names the line."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(line)
            out.append(Arrival(float(row["t"]), resolve(row.get("request", {})), str(row.get("class", "default")),
                               int(row.get("priority", 0))))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return sorted(out, key=lambda a: a.t)


def write_trace(path: Path, rows: list[tuple[float, dict, str, int]]) -> None:
    """Write (t, request, class, priority) rows as a trace `read_trace` reads."""
    path.write_text("".join(json.dumps({"t": round(t, 3), "request": request, "class": klass, "priority": priority})
                            + "\n" for t, request, klass, priority in rows))
