"""The stage, declared once, and the pipeline of stages every runner iterates.

A `Stage` is one kind of work with its own models: its name, the Serve deployment that hosts it, the artifacts it
reads and writes (serve/pipeline/artifacts.py), `load` (its own models, levers and ranks, nothing else) and a batched
`run`. The `Pipeline` orders them: prepare stages (encode), the denoising segments of the request's plan (each on the
stage of its model role: sketch or render, any number of segments, serve/switch.py), finish stages (decode), and side
stages that run beside the others once their input exists (the sketch's preview).

A job's work is the pipeline's `steps` for its plan: one `Step` per stage call, named uniquely in the job (encode,
sketch, render, sketch.2, decode, preview). Everything iterates these steps: the in-process Engine (serve/engine.py),
the job state machine (serve/jobs/state.py: which step is next, progress), the drive loop (serve/jobs/drive.py), the
app builder (one deployment per name in `Pipeline.deployments`), the generic stage deployment (deployments/stage.py:
batching, checkpoint I/O through the declared artifacts) and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from serve.denoise import Cancelled, StepCallback
from serve.pipeline.artifacts import Artifact, handoff, resume
from serve.request import GenerationParams
from serve.priority import elastic_rung
from serve.switch import Plan, ladder, make_plan

if TYPE_CHECKING:
    from serve.config import EngineConfig
    from serve.models import ModelCache

Phase = Literal["prepare", "denoise", "finish", "side"]


@dataclass(frozen=True)
class Step:
    """One stage call for one job."""

    name: str  # unique in the job: the stage's name, or a segment's (sketch, render, sketch.2)
    stage: str  # the stage that runs it
    reads: tuple[Artifact, ...]
    writes: tuple[Artifact, ...]
    phase: Phase  # side steps run beside the others; their failure fails nothing
    segment: int | None = None  # denoising steps: the index of their segment in the plan
    span: tuple[int, int] = (0, 1)  # denoising steps: (first step, one past the last), expected where not known

    @property
    def resume(self) -> Artifact | None:
        """A denoising step's mid-segment checkpoint, written when it is preempted (None for other steps)."""
        return None if self.segment is None else resume(self.segment)

    def resumed(self) -> Step:
        """This step continuing from its mid-segment checkpoint instead of its first input."""
        if self.resume is None:
            raise ValueError(f"step {self.name!r} is not a denoising step: it has no mid-segment checkpoint")
        return dataclasses.replace(self, reads=(self.resume,))


@dataclass
class Task:
    """A step of one job, with its inputs, as a stage's `run` receives it."""

    params: GenerationParams
    step: Step
    inputs: dict[Artifact, Any]


@dataclass
class Output:
    """What a step produced for one job: a value per artifact it writes and, for a denoising step, the denoising
    steps done once it ended (its segment's stop, or where it yielded) and how many of its steps reused a cached
    output."""

    values: dict[Artifact, Any]
    steps_done: int | None = None
    cached_steps: int = 0
    preempted: bool = False  # it yielded mid-segment: `values` holds the step's `resume` checkpoint alone


class Stage:
    """One kind of work with its own models. Subclasses declare the class attributes and implement `load` and
    `run`; a loaded instance serves concurrent batches (no per-request state on it)."""

    name: ClassVar[str]
    deployment: ClassVar[str]  # the Serve deployment that hosts it (several stages may share one and its models)
    reads: ClassVar[tuple[Artifact, ...]] = ()
    writes: ClassVar[tuple[Artifact, ...]] = ()
    role: ClassVar[str | None] = None  # denoising stages: the model role whose segments they run

    @classmethod
    def load(cls, config: EngineConfig, models: ModelCache | None = None, **options) -> Stage:
        """The stage with its models loaded (through `models`, so that stages of one process share them);
        `options` are its deployment's (the encoder's cache size, a parallel stage's worker group)."""
        raise NotImplementedError

    @staticmethod
    def batch_key(params: GenerationParams) -> Hashable:
        """Requests with equal keys may share a batched `run` (by default: equal latent shapes)."""
        return params.shape_key

    def run(self, tasks: list[Task], on_step: StepCallback | None = None) -> list[Output | Cancelled]:
        """One output per task, in order; `on_step(index, steps_done, N)` at every denoising step boundary may
        cancel a task by returning False (its output is then `Cancelled`), or ask it to yield with PREEMPT (a
        preemptible denoising task's output is then its step's `resume` checkpoint, `preempted` set)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """What the stage counts beyond the deployment's own figures (the encoder's cache hits, say)."""
        return {}


@dataclass(frozen=True)
class Pipeline:
    """encode -> denoising segments -> decode, and what runs beside them."""

    prepare: tuple[type[Stage], ...]
    denoise: tuple[type[Stage], ...]  # one per model role; the first segment reads what they declare to read, the
    finish: tuple[type[Stage], ...]  # last writes what they declare to write, hand-offs connect the others
    side: tuple[type[Stage], ...] = ()

    def __post_init__(self):
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique in a pipeline: {names}")
        if any(stage.role is None for stage in self.denoise):
            raise ValueError("every denoising stage declares the model role it runs")

    @property
    def stages(self) -> tuple[type[Stage], ...]:
        return (*self.prepare, *self.denoise, *self.finish, *self.side)

    def stage(self, name: str) -> type[Stage]:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in the pipeline")

    def deployments(self) -> dict[str, tuple[type[Stage], ...]]:
        """Each deployment name with the stages it hosts, in pipeline order."""
        hosts: dict[str, list[type[Stage]]] = {}
        for stage in self.stages:
            hosts.setdefault(stage.deployment, []).append(stage)
        return {name: tuple(stages) for name, stages in hosts.items()}

    def steps(self, plan: Plan) -> tuple[Step, ...]:
        """The job's steps for `plan`, in running order; each side step right after the step that writes its input.
        Raises ValueError if a step reads an artifact no earlier step writes (a misdeclared pipeline)."""
        by_role = {stage.role: stage for stage in self.denoise}
        main = [Step(s.name, s.name, s.reads, s.writes, "prepare") for s in self.prepare]
        last = len(plan.segments) - 1
        for i, (segment, name) in enumerate(zip(plan.segments, plan.names)):
            stage = by_role.get(segment.role)
            if stage is None:
                raise ValueError(f"the plan's segment {name!r} needs a {segment.role} stage; the pipeline has "
                                 f"{', '.join(by_role)}")
            reads = stage.reads if i == 0 else (handoff(i - 1),)
            writes = stage.writes if i == last else (handoff(i),)
            main.append(Step(name, stage.name, reads, writes, "denoise", i, plan.expected_span(i)))
        main += [Step(s.name, s.name, s.reads, s.writes, "finish") for s in self.finish]
        steps, written = [], set()
        for step in main:
            _check_inputs(step, written)
            steps.append(step)
            written.update(step.writes)
            for side in self.side:
                if side.reads and side.reads[0] in step.writes:
                    steps.append(Step(side.name, side.name, side.reads, side.writes, "side"))
                    _check_inputs(steps[-1], written)
        return tuple(steps)


def _check_inputs(step: Step, written: set[Artifact]) -> None:
    missing = [a.file for a in step.reads if a not in written]
    if missing:
        raise ValueError(f"step {step.name!r} reads {', '.join(missing)}, which no earlier step writes")


class Planner:
    """A request's plan and steps from configs alone (no weights), so that the orchestrator, the stage deployments
    and the Engine agree on them. Only the boundary policy needs the sampler's own timesteps; the family and its
    scheduler (diffusers, seconds to import) are loaded for the first such request, not before.

    A load-elastic request (`range:LO:HI`, `floor:T`) is planned at its idle choice until `fix` picks its rung from
    `backlog()`, the load signal its runner injects (the jobs whose sketch is still to be done; the engine knows no
    Ray); the runner fixes it once, before the sketch starts, and every later step runs the fixed schedule."""

    def __init__(self, config: EngineConfig, pipeline: Pipeline, backlog: Callable[[], int] | None = None,
                 backlog_per_shift: int = 2):
        self.pipeline = pipeline
        self._config = config
        self._sampler = None
        self._backlog = backlog
        self._backlog_per_shift = backlog_per_shift

    def fix(self, params: GenerationParams) -> tuple[GenerationParams, int]:
        """`params` with its switch fixed, and the rungs it moved from its idle choice: a load-elastic request's
        rung for the backlog now (serve/priority.py `elastic_rung`); any other request as it is, 0."""
        if not params.switch.elastic:
            return params, 0
        calibration = self._config.pair_calibration() if params.switch.kind == "floor" else None
        rungs = ladder(params.switch, calibration)
        rung = elastic_rung(self._backlog() if self._backlog else 0, len(rungs), self._backlog_per_shift)
        return dataclasses.replace(params, switch=rungs[rung]), rung

    def plan(self, params: GenerationParams) -> Plan:
        calibration = self._config.pair_calibration() if params.switch.kind in ("quality", "floor") else None
        if params.switch.kind != "boundary":
            return make_plan(params, calibration=calibration)
        if self._sampler is None:
            family = self._config.family()
            self._sampler = functools.partial(family.sampler.scheduler,
                                              family.scheduler_config(self._config.models().sketch))
        return make_plan(params, self._sampler(params, "cpu").timesteps)

    def steps(self, params: GenerationParams) -> tuple[Step, ...]:
        return self.pipeline.steps(self.plan(params))
