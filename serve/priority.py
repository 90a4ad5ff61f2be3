"""Latency classes: which waiting work goes first, when running work yields to it, and the switch a load-elastic
request takes. Pure rules over plain values (no clock, no Ray, no store): the drive loop's claim order
(serve/jobs/store.py), each stage replica's queue admission and preemption (deployments/batching.py) and the
Planner's elastic switch (serve/pipeline/stage.py) all call these, so they cannot disagree.

Classes, most urgent first: `interactive` (level 0), `standard` (1), `batch` (2). A request names its class in
`priority`; without one it gets its bearer token's default (`auth.token_priorities`), else `classes.default`.

The rules:

    level      work's level is its class's, less one for every `aging_s` it has waited, never below 0:
               level = max(0, LEVELS[class] - floor(waited_s / aging_s))
    order      waiting work is served lowest level first, then longest waiting first
    preempt    a running batch yields at its next denoising step boundary when some waiting work has a level strictly
               below the running batch's (the lowest of its jobs', which keep aging while they run)
    elastic    a request with a floor (`range:LO:HI`, `floor:T`) has a ladder of schedules from its idle choice down
               to its floor; it takes rung min(last, backlog // backlog_per_shift), backlog being the jobs whose sketch
               is still to be done when its own sketch is about to start

No class starves: batch work that has waited 2 x `aging_s` at a stage is at level 0, so it is served before any work
that arrives after it and, once running, is never preempted (preemption needs a strictly lower level). A batch
always takes at least one step per turn on the device, so a preempted job moves forward every time it runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

Priority = Literal["interactive", "standard", "batch"]
PRIORITIES: tuple[str, ...] = ("interactive", "standard", "batch")
LEVELS: dict[str, int] = {name: level for level, name in enumerate(PRIORITIES)}
DEFAULT_PRIORITY = "standard"


class ClassesConfig(BaseModel):
    """How latency classes take turns (the `jobs.classes` section of the app config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Priority = Field(DEFAULT_PRIORITY, description="The class of a request that names none and whose "
                                                            "bearer token has no default of its own.")
    aging_s: float = Field(60.0, gt=0, description="Waiting this long raises work one class (batch -> standard -> "
                                                   "interactive), so that no class starves.")
    preemption: bool = Field(True, description="Whether a running batch of a lower class yields, at its next "
                                               "denoising step boundary, to waiting work of a higher class.")
    backlog_per_shift: int = Field(2, ge=1, description="Load-elastic switching (`switch: range:LO:HI` or "
                                   "`floor:T`): every this many jobs whose sketch is still to be done move a "
                                   "starting request one rung down its ladder, towards its floor.")


def level(priority: str, waited_s: float, aging_s: float) -> int:
    """Work's level after waiting `waited_s` (0 is the most urgent); see the module docstring."""
    return max(0, LEVELS[priority] - math.floor(max(0.0, waited_s) / aging_s))


@dataclass(frozen=True)
class Waiting:
    """A piece of work that waits (or runs): its class and since when it waits, in the caller's clock."""

    priority: str
    since: float

    def level(self, now: float, aging_s: float) -> int:
        return level(self.priority, now - self.since, aging_s)


W = TypeVar("W", bound=Waiting)


def order(waiting: Iterable[W], now: float, aging_s: float) -> list[W]:
    """`waiting` in serving order: lowest level first, then longest waiting (Python's sort is stable, so equal
    keys keep their arrival order)."""
    return sorted(waiting, key=lambda w: (w.level(now, aging_s), w.since))


def batch_level(jobs: Iterable[Waiting], now: float, aging_s: float) -> int:
    """A batch's level: its most urgent job's."""
    return min((job.level(now, aging_s) for job in jobs), default=LEVELS["batch"])


def should_yield(running: Sequence[Waiting], waiting: Iterable[Waiting], now: float, aging_s: float) -> bool:
    """Whether the running batch `running` yields to the best of `waiting` (a strictly lower level)."""
    best = min((w.level(now, aging_s) for w in waiting), default=None)
    return best is not None and best < batch_level(running, now, aging_s)


def elastic_rung(backlog: int, rungs: int, backlog_per_shift: int) -> int:
    """The rung of a load-elastic request's ladder (0: its idle choice; rungs - 1: its floor) for `backlog` jobs
    whose sketch is still to be done."""
    if rungs < 1:
        raise ValueError("a ladder has at least one rung")
    return min(rungs - 1, max(0, backlog) // backlog_per_shift)
