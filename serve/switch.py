"""Switch policies: when the sketch model hands the latent to the render model.

A policy is parsed from a short spec string (the CLI flag, the HTTP field):

    step:K                    the first K steps are sketched (K = N: no rendering)
    ratio:R                   K = round(R * N), at least 1
    adaptive:THR[:MIN:MAX]    SRDiffusion's rate-of-change rule (defaults 0.01, 5, 30)
    boundary:R                Wan 2.2 style: steps with t >= R * 1000 are sketched (none if R * 1000 > t_0,
                              as in diffusers: then the render model runs every step)

Fixed policies know K as soon as the timesteps are known; the adaptive one decides while sketching, so every
policy is used through a per-request `SwitchTracker` (never shared between requests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SWITCH_SYNTAX = "step:K | ratio:R | adaptive:THR[:MIN:MAX] | boundary:R"


def _number(value: float) -> str:
    """Short form ("0.25", "1") where it is exact, else the shortest text that reads back to the same float."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


@dataclass(frozen=True)
class SwitchPolicy:
    kind: str  # "step" | "ratio" | "adaptive" | "boundary"
    value: float  # K, R, THR or R
    min_step: int = 5
    max_step: int = 30

    def __str__(self) -> str:
        """The spec string; `parse_switch(str(policy)) == policy` (checkpoints store the policy this way)."""
        if self.kind == "step":
            return f"step:{int(self.value)}"
        if self.kind == "adaptive":
            return f"adaptive:{_number(self.value)}:{self.min_step}:{self.max_step}"
        return f"{self.kind}:{_number(self.value)}"

    def check_steps(self, num_steps: int) -> None:
        """Raise ValueError if this policy cannot run with `num_steps` denoising steps."""
        if self.kind == "step" and not 1 <= self.value <= num_steps:
            raise ValueError(
                f"`switch` step:{int(self.value)} must lie in 1..num_inference_steps={num_steps} "
                f"(K = N means no rendering)"
            )

    def tracker(self, timesteps: torch.Tensor) -> SwitchTracker:
        num_steps = len(timesteps)
        if self.kind == "step":
            return SwitchTracker(num_steps, fixed_step=int(self.value))
        if self.kind == "ratio":
            return SwitchTracker(num_steps, fixed_step=min(num_steps, max(1, round(self.value * num_steps))))
        if self.kind == "boundary":
            # Same rule as diffusers' WanPipeline: t >= boundary goes to the high-noise (sketch) model. Timesteps
            # fall monotonically, so the sketched steps are a prefix; it may be empty (K = 0) as in diffusers.
            boundary = self.value * 1000
            return SwitchTracker(num_steps, fixed_step=int((timesteps >= boundary).sum()))
        return SwitchTracker(
            num_steps, threshold=self.value, min_step=self.min_step, max_step=min(self.max_step, num_steps)
        )


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
        if len(numbers) != 1 or numbers[0] != int(numbers[0]) or numbers[0] < 1:
            raise bad("K must be one integer >= 1")
        return SwitchPolicy("step", int(numbers[0]))
    if kind in ("ratio", "boundary"):
        if len(numbers) != 1 or not 0.0 < numbers[0] <= 1.0:
            raise bad("R must be one number in (0, 1]")
        return SwitchPolicy(kind, numbers[0])
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


class SwitchTracker:
    """Per-request switch state. `after_step(i, output)` is called once the sketch model's output for step i
    (0-based) is known and returns True when steps i+1.. belong to the render model.

    The adaptive rule (SRDiffusion; as in public ports of the paper's code): with o_i the guided model output,
    d_i = tanh(mean|o_i - o_{i-1}| / mean|o_{i-1}|); switch once 0 < d_{i-1} - d_i < threshold, but keep at least
    `min_step` sketch steps and at most `max_step`.
    """

    def __init__(
        self,
        num_steps: int,
        fixed_step: int | None = None,
        threshold: float = 0.0,
        min_step: int = 1,
        max_step: int | None = None,
    ):
        self.num_steps = num_steps
        self.fixed_step = fixed_step
        self.threshold = threshold
        self.min_step = min_step
        self.max_step = num_steps if max_step is None else max_step
        self.rates: list[float] = []
        self._previous_output: torch.Tensor | None = None
        self.switch_step: int | None = fixed_step  # K, once known

    def after_step(self, step_index: int, model_output: torch.Tensor) -> bool:
        sketched = step_index + 1
        if self.fixed_step is not None:
            return sketched >= self.fixed_step
        output = model_output.detach().float()
        if self._previous_output is not None:
            prev = self._previous_output
            rate = (output - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)
            self.rates.append(math.tanh(float(rate)))
        self._previous_output = output
        decided = sketched >= self.max_step or (
            sketched >= self.min_step and len(self.rates) >= 2 and 0.0 < self.rates[-2] - self.rates[-1] < self.threshold
        )
        if decided:
            self.switch_step = sketched
            self._previous_output = None
        return decided
