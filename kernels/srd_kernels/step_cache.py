"""Step caching for the render stage: reuse the transformer's last output for a step whose input barely moved.

The rule (TeaCache-like, on the latents rather than the modulated first-block input): after each computed step the
cache holds that step's input latents and guided output. At the next step it adds the relative L1 change of the
input, mean|x_t - x_prev| / mean|x_prev|, to an accumulator; while the accumulator stays below `threshold` the step
reuses the held output (no forward), and a computed step resets it. `threshold` 0 never reuses, so the output equals
the uncached one exactly; larger values skip more steps and cost more quality (the per-request knob).

Why written here and not taken from cache-dit: cache-dit hooks the transformer object and keeps its cache state
there, one trajectory at a time; the render stage runs the rows of several requests through one shared transformer
forward, so the state must live with each request's trajectory (a `StepCache` per request, inside one stage call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepCache:
    """One trajectory's cache; never shared between requests, never outlives a stage call."""

    threshold: float
    accumulated: float = 0.0
    skipped: int = 0
    computed: int = 0
    _input: torch.Tensor | None = None
    _output: torch.Tensor | None = None

    def reuse(self, latents: torch.Tensor) -> torch.Tensor | None:
        """The held output if this step may skip the forward, else None (then call `store` with the new one)."""
        if self.threshold <= 0 or self._output is None:
            return None
        previous = self._input
        change = ((latents - previous).abs().mean() / previous.abs().mean().clamp(min=1e-12)).item()
        if self.accumulated + change >= self.threshold:
            return None
        self.accumulated += change
        self._input = latents
        self.skipped += 1
        return self._output

    def store(self, latents: torch.Tensor, output: torch.Tensor) -> None:
        self._input, self._output = latents, output
        self.accumulated = 0.0
        self.computed += 1
