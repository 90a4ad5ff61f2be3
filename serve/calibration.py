"""A model pair's calibration: what its schedules cost and what they keep of the large model's quality, measured once
(`python -m bench.toy_quality --calibrate FILE`) and shipped beside the preset, so that a request can ask for a
quality instead of a schedule (`switch: quality:T`, serve/switch.py).

    schedules    each measured schedule (a switch spec relative to N: ratio:R, ratio:RA:RB, ratio:1 for
                 all-large, boundary:1 for all-small), its cost in large-model step equivalents per step of N
                 (large steps + c x small steps, over N), its quality proxy's score and that score relative to
                 all-large's
    step_cost_ratio  c: a small-model step's time over a large-model step's, measured on the calibration's device

A pair needs a quality proxy to be calibrated (the toy pair has its detector; Wan's would need VBench or a reward
model and the weights): without one, `quality:T` is refused for it, and the fixed schedules stay.

`quality:T` takes the cheapest schedule whose quality is at least T (all-large's is 1 by definition, so every T in
(0, 1] has one).
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ScheduleQuality(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    switch: str = Field(description="The schedule, as a switch spec that scales with N (ratio:R, ratio:RA:RB, "
                                    "ratio:1 for all-large, boundary:1 for all-small).")
    cost: float = Field(ge=0, description="Large-model step equivalents per step: (large + c x small steps) / N.")
    score: float = Field(description="The quality proxy's score (the toy pair: % of videos whose colour, shape and "
                                     "direction the detector reads as the prompt says).")
    quality: float = Field(ge=0, description="score / all-large's score.")


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pair: str = Field(description="The model pair it was measured on.")
    measured: str = Field(description="Where, when and with which command.")
    steps: int = Field(ge=1, description="N of the measured requests.")
    step_cost_ratio: float = Field(gt=0, description="c: a small-model step's time over a large-model step's.")
    proxy: str = Field(description="The quality proxy that scored the schedules.")
    schedules: list[ScheduleQuality] = Field(min_length=1, description="Measured schedules.")

    def schedule_for(self, target: float) -> ScheduleQuality:
        """The cheapest measured schedule of quality >= `target`; ValueError naming the switch if none is."""
        fits = [s for s in self.schedules if s.quality >= target]
        if not fits:
            best = max((s.quality for s in self.schedules), default=None)
            raise ValueError(f"`switch` quality:{target:g}: the calibration of {self.pair} has no schedule of that "
                             f"quality (best measured: {best})")
        return min(fits, key=lambda s: (s.cost, -s.quality))

    def front(self, target: float) -> list[ScheduleQuality]:
        """The schedules of quality >= `target` that beat every cheaper one in quality, cheapest first: its first is
        `schedule_for(target)`, its last the best quality measured (load-elastic `floor:T`, serve/switch.py)."""
        front: list[ScheduleQuality] = []
        for schedule in sorted(self.schedules, key=lambda s: (s.cost, -s.quality)):
            if schedule.quality >= target and (not front or schedule.quality > front[-1].quality):
                front.append(schedule)
        if not front:
            self.schedule_for(target)  # raises, naming the switch and the best quality measured
        return front

    def quality_of(self, switch: str) -> float | None:
        """The measured quality of schedule `switch` (a spec as the calibration writes it), None if unmeasured."""
        return next((s.quality for s in self.schedules if s.switch == switch), None)


@functools.lru_cache(maxsize=8)
def load_calibration(path: str) -> Calibration:
    """A calibration file, read once per process (a file that changes is a new deployment)."""
    return Calibration.model_validate_json(Path(path).read_text())
