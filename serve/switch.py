"""Switch policies and the plan they give a request: which model denoises which steps.

A policy is parsed from a short spec string (the CLI flag, the HTTP field):

    step:K                    the first K steps are sketched (K = N: no rendering)
    step:A:B                  large for steps < A, small for A..B-1, large again from B (A < B <= N)
    ratio:R                   K = round(R * N), at least 1
    ratio:RA:RB               the three-segment form in fractions of N: A = round(RA * N), B = round(RB * N)
    adaptive:THR[:MIN:MAX]    SRDiffusion's rate-of-change rule (defaults 0.01, 5, 30)
    boundary:R                Wan 2.2 style: steps with t >= R * 1000 are sketched (none if R * 1000 > t_0,
                              as in diffusers: then the render model runs every step)
    quality:T                 the cheapest schedule the model pair's calibration (serve/calibration.py) measured
                              at T or more of all-large's quality, 0 < T <= 1
    range:LO:HI               load-elastic: K = HI when the sketchers are idle, down to LO (its floor) as the
                              jobs waiting for their sketch grow (serve/priority.py; 1 <= LO <= HI <= N)
    floor:T                   load-elastic over the calibration: idle, the best-quality schedule measured; under
                              load cheaper ones, down to quality:T's (the floor), 0 < T <= 1

`make_plan` turns a policy into the request's `Plan`: an ordered list of denoising segments, each a model role
("sketch": the large model, "render": the small one), a step range and a guidance scale. This module is the one
place that says how many steps each segment takes. Fixed policies know it as soon as the sampler's timesteps are
known (boundary needs them; step and ratio need only N); the adaptive policy decides the first switch while
sketching, through a per-request `SwitchTracker` (never shared between requests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from serve.calibration import Calibration
    from serve.request import GenerationParams

SWITCH_SYNTAX = ("step:K | step:A:B | ratio:R | ratio:RA:RB | adaptive:THR[:MIN:MAX] | boundary:R | quality:T | "
                 "range:LO:HI | floor:T")
ELASTIC = ("range", "floor")  # policies whose schedule the load picks within the request's floor
Role = Literal["sketch", "render"]


def _number(value: float) -> str:
    """Short form ("0.25", "1") where it is exact, else the shortest text that reads back to the same float."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


@dataclass(frozen=True)
class SwitchPolicy:
    kind: str  # "step" | "ratio" | "adaptive" | "boundary" | "quality" | "range" | "floor"
    value: float  # K, R, THR, R, T, LO or T
    min_step: int = 5
    max_step: int = 30
    back: float | None = None  # step:A:B's B or ratio:RA:RB's RB: where the large model takes over again; range's HI

    @property
    def elastic(self) -> bool:
        """Whether the load picks this request's schedule (within its floor) when its sketch is about to start."""
        return self.kind in ELASTIC

    def __str__(self) -> str:
        """The spec string; `parse_switch(str(policy)) == policy` (checkpoints store the policy this way)."""
        if self.kind == "adaptive":
            return f"adaptive:{_number(self.value)}:{self.min_step}:{self.max_step}"
        number = (lambda v: str(int(v))) if self.kind in ("step", "range") else _number
        back = "" if self.back is None else f":{number(self.back)}"
        return f"{self.kind}:{number(self.value)}{back}"

    def check_steps(self, num_steps: int) -> None:
        """Raise ValueError if this policy cannot run with `num_steps` denoising steps."""
        if self.kind in ("step", "range") and not 1 <= (self.back or self.value) <= num_steps:
            raise ValueError(
                f"`switch` {self} must lie in 1..num_inference_steps={num_steps} (K = N means no rendering)"
            )

    def tracker(self, num_steps: int) -> SwitchTracker:
        """The adaptive rule's per-request state, its MAX capped at N."""
        if self.kind != "adaptive":
            raise ValueError(f"`switch` {self} is decided before running; only adaptive policies track steps")
        return SwitchTracker(self.value, self.min_step, min(self.max_step, num_steps))


def parse_switch(spec: str) -> SwitchPolicy:
    """Parse a switch spec; raise ValueError naming the field and the syntax on anything malformed."""

    def bad(reason: str) -> ValueError:
        return ValueError(f"`switch` {spec!r} is invalid: {reason}; expected {SWITCH_SYNTAX}")

    kind, _, rest = spec.strip().partition(":")
    parts = rest.split(":") if rest else []
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise bad("values must be numbers") from None
    if not all(math.isfinite(n) for n in numbers):
        raise bad("values must be finite numbers")
    if kind == "step":
        if len(numbers) not in (1, 2) or any(n != int(n) or n < 1 for n in numbers):
            raise bad("K must be one integer >= 1" if len(numbers) < 2 else "A and B must be integers >= 1")
        if len(numbers) == 2 and not numbers[0] < numbers[1]:
            raise bad("A must be less than B")
        return SwitchPolicy("step", int(numbers[0]), back=int(numbers[1]) if len(numbers) == 2 else None)
    if kind == "ratio":
        if len(numbers) not in (1, 2) or not all(0.0 < n <= 1.0 for n in numbers):
            raise bad("R must be one number in (0, 1]" if len(numbers) < 2 else "RA and RB must be numbers in (0, 1]")
        if len(numbers) == 2 and not numbers[0] < numbers[1]:
            raise bad("RA must be less than RB")
        return SwitchPolicy("ratio", numbers[0], back=numbers[1] if len(numbers) == 2 else None)
    if kind in ("boundary", "quality", "floor"):
        if len(numbers) != 1 or not 0.0 < numbers[0] <= 1.0:
            raise bad(f"{'R' if kind == 'boundary' else 'T'} must be one number in (0, 1]")
        return SwitchPolicy(kind, numbers[0])
    if kind == "range":
        if len(numbers) != 2 or any(n != int(n) or n < 1 for n in numbers) or numbers[0] > numbers[1]:
            raise bad("give LO:HI, integers with 1 <= LO <= HI")
        return SwitchPolicy("range", int(numbers[0]), back=int(numbers[1]))
    if kind == "adaptive":
        if len(numbers) not in (1, 3):
            raise bad("give THR or THR:MIN:MAX")
        threshold = numbers[0]
        if not 0.0 < threshold < 1.0:
            raise bad("THR must be in (0, 1)")
        if len(numbers) == 1:
            return SwitchPolicy("adaptive", threshold)
        lo, hi = numbers[1], numbers[2]
        if lo != int(lo) or hi != int(hi) or not 1 <= lo <= hi:
            raise bad("MIN and MAX must be integers with 1 <= MIN <= MAX")
        return SwitchPolicy("adaptive", threshold, int(lo), int(hi))
    raise bad(f"unknown policy {kind!r}")


# ------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Segment:
    """Consecutive denoising steps of one model: steps start..stop-1 of N, at one guidance scale."""

    role: Role  # "sketch": the large model; "render": the small one
    start: int | None  # None: where the previous segment stopped (decided while running)
    stop: int | None  # one past the last step; None: decided while running (the adaptive policy)
    guidance: float


@dataclass(frozen=True)
class Plan:
    """A request's denoising segments in order, each switch between them a hand-off of the trajectory."""

    segments: tuple[Segment, ...]
    num_steps: int
    expected_switch: int  # the first switch step: exact where known, else a middle estimate (for load estimates)

    @property
    def switch_step(self) -> int | None:
        """K, the steps of the first segment, if known before running."""
        return self.segments[0].stop

    @property
    def names(self) -> tuple[str, ...]:
        """Each segment's name in a job: its role, with ".2", ".3" for a role's later segments (sketch, render,
        sketch.2)."""
        seen: dict[str, int] = {}
        names = []
        for segment in self.segments:
            seen[segment.role] = seen.get(segment.role, 0) + 1
            names.append(segment.role if seen[segment.role] == 1 else f"{segment.role}.{seen[segment.role]}")
        return tuple(names)

    def expected_span(self, index: int) -> tuple[int, int]:
        """(first step, one past the last) of segment `index`, with the expected switch where it is not known."""
        segment = self.segments[index]
        start = self.expected_switch if segment.start is None else segment.start
        stop = self.expected_switch if segment.stop is None else segment.stop
        return start, stop


def make_plan(params: GenerationParams, timesteps: torch.Tensor | None = None,
              calibration: Calibration | None = None) -> Plan:
    """The request's segments: sketch then render (the two-segment policies, either possibly empty: K = N or a
    boundary above t_0), and a third, sketch again, for step:A:B and ratio:RA:RB with B < N. `timesteps` are the
    sampler's (diffusers' `scheduler.timesteps`); without them a boundary switch stays open like an adaptive one.
    `quality:T` takes its schedule from the pair's `calibration` (ValueError naming the switch without one)."""
    policy, n = params.switch, params.num_inference_steps
    if policy.elastic:  # its idle choice: the Planner fixes the switch from the load before the sketch starts
        policy = ladder(policy, calibration)[0]
    if policy.kind == "quality":
        if calibration is None:
            raise ValueError(f"`switch` {policy} needs the model pair's calibration, and this pair has none "
                             "(`python -m bench.toy_quality --calibrate FILE` measures one)")
        policy = parse_switch(calibration.schedule_for(policy.value).switch)
    k: int | None
    back = None
    if policy.kind == "step":
        k = int(policy.value)
        back = None if policy.back is None else int(policy.back)
    elif policy.kind == "ratio":
        k = min(n, max(1, round(policy.value * n)))
        back = None if policy.back is None else max(k, round(policy.back * n))
    elif policy.kind == "boundary" and timesteps is not None:
        # As diffusers' WanPipeline: t >= boundary goes to the high-noise (sketch) model. Timesteps fall
        # monotonically, so the sketched steps are a prefix; it may be empty (K = 0).
        k = int((timesteps >= policy.value * 1000).sum())
    else:
        k = None
    sketch, render = params.guidance_scale, params.render_guidance
    segments = [Segment("sketch", 0, k, sketch), Segment("render", k, n if back is None else back, render)]
    if back is not None and back < n:
        segments.append(Segment("sketch", back, n, sketch))
    if k is not None:
        expected = k
    elif policy.kind == "adaptive":
        expected = (min(policy.min_step, n) + min(policy.max_step, n)) // 2
    else:
        expected = n // 2
    return Plan(tuple(segments), n, expected)


def ladder(policy: SwitchPolicy, calibration: Calibration | None = None) -> tuple[SwitchPolicy, ...]:
    """A load-elastic policy's schedules, from its idle choice (rung 0) down to its floor (the last rung), each
    cheaper in large-model steps than the one before: range:LO:HI gives step:HI .. step:LO; floor:T the
    calibration's schedules of quality >= T that no cheaper one matches (its quality-cost front), best first, down
    to quality:T's. A fixed policy is its own one-rung ladder."""
    if policy.kind == "range":
        return tuple(SwitchPolicy("step", k) for k in range(int(policy.back), int(policy.value) - 1, -1))
    if policy.kind == "floor":
        if calibration is None:
            raise ValueError(f"`switch` {policy} needs the model pair's calibration, and this pair has none "
                             "(`python -m bench.toy_quality --calibrate FILE` measures one)")
        return tuple(parse_switch(s.switch) for s in reversed(calibration.front(policy.value)))
    return (policy,)


class SwitchTracker:
    """The adaptive rule's per-request state. `after_step(i, output)` is called once the sketch model's output for
    step i (0-based) is known and returns True when steps i+1.. belong to the next segment.

    The rule (SRDiffusion; as in public ports of the paper's code): with o_i the guided model output,
    d_i = tanh(mean|o_i - o_{i-1}| / mean|o_{i-1}|); switch once 0 < d_{i-1} - d_i < threshold, but keep at least
    `min_step` sketch steps and at most `max_step`.
    """

    def __init__(self, threshold: float, min_step: int, max_step: int):
        self.threshold = threshold
        self.min_step = min_step
        self.max_step = max_step
        self.rates: list[float] = []
        self._previous_output: torch.Tensor | None = None
        self.switch_step: int | None = None  # K, once decided

    def after_step(self, step_index: int, model_output: torch.Tensor) -> bool:
        sketched = step_index + 1
        output = model_output.detach().float()
        if self._previous_output is not None:
            prev = self._previous_output
            rate = (output - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)
            self.rates.append(math.tanh(float(rate)))
        self._previous_output = output
        dropped_slightly = len(self.rates) >= 2 and 0.0 < self.rates[-2] - self.rates[-1] < self.threshold
        decided = sketched >= self.max_step or (sketched >= self.min_step and dropped_slightly)
        if decided:
            self.switch_step = sketched
            self._previous_output = None
        return decided
