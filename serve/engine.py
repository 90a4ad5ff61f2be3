"""The in-process engine: every stage of the pipeline loaded in one process, a request's steps run in order, the
artifacts kept as values. What `srd generate` runs, and what the tests and benchmarks hold the Serve app against.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from serve.config import EngineConfig
from serve.denoise import Cancelled
from serve.models import ModelCache
from serve.pipeline.artifacts import LATENTS, PREVIEW, VIDEO, Artifact
from serve.pipeline.registry import PIPELINE
from serve.pipeline.stage import Pipeline, Planner, Stage, Task
from serve.request import GenerationParams
from serve.switch import Plan


@dataclass
class GenerationResult:
    params: GenerationParams
    plan: Plan
    segments: list[tuple[str, int, int]] = field(default_factory=list)  # each denoising step: name, first step,
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step              one past its last
    artifacts: dict[Artifact, Any] = field(default_factory=dict)  # every step's outputs
    cached_steps: int = 0  # denoising steps that reused a cached transformer output (render step caching)

    @property
    def latents(self) -> torch.Tensor:
        """float32 [1, C, F', H', W'], before VAE decode."""
        return self.artifacts[LATENTS]

    @property
    def frames(self) -> np.ndarray | None:
        """uint8 [F, H, W, 3]; None when not decoded."""
        clip = self.artifacts.get(VIDEO)
        return None if clip is None else clip.frames

    @property
    def preview(self) -> np.ndarray | None:
        """The sketch's estimate of the first frame, uint8 [H, W, 3] (with `side_steps`)."""
        return self.artifacts.get(PREVIEW)

    @property
    def switch_step(self) -> int:
        """K: the steps the first segment (the sketch) took."""
        return self.segments[0][2]


class Engine:
    """All stages in one process, running each request's steps (serve/pipeline/stage.py) in order. `backlog`, the
    load signal of load-elastic requests (`range:LO:HI`, `floor:T`: jobs whose sketch is still to be done, however
    the caller counts them), fixes their switch before their sketch; without it they run their idle choice."""

    def __init__(self, config: EngineConfig, pipeline: Pipeline = PIPELINE, backlog: Callable[[], int] | None = None):
        family = config.family()
        family.check_compatible(config.models())  # a wrong model pair fails before any weights load
        config.check_loras()  # so does a registered LoRA adapter that does not fit its stage's model
        for role in ("sketch", "render"):
            config.kernels_for(role, family)  # so do levers given that the family cannot take
        self.config = config
        self.pipeline = pipeline
        self.planner = Planner(config, pipeline, backlog)
        models = ModelCache()
        self.stages: dict[str, Stage] = {stage.name: stage.load(config, models) for stage in pipeline.stages}

    def plan(self, params: GenerationParams) -> Plan:
        return self.planner.plan(params)

    def generate(self, params: GenerationParams, decode: bool = True, side_steps: bool = False,
                 on_step: Callable[[str, int, int], bool] | None = None) -> GenerationResult:
        """Run the request's steps; with `decode` False only up to the final latents, with `side_steps` also those
        a served job runs beside the others (the preview). `on_step(step name, steps done, N)` sees every
        denoising step."""
        step_callback = on_step and (lambda _, name, done, n: on_step(name, done, n))
        return self.generate_batch([params], decode, side_steps, step_callback)[0]

    def generate_batch(self, requests: list[GenerationParams], decode: bool = True, side_steps: bool = False,
                       on_step: Callable[[int, str, int, int], bool] | None = None,
                       around: Callable[[str, Callable[[], Any]], Any] | None = None) -> list[GenerationResult]:
        """Run several requests, each step of theirs batched with the others' at the same stage (and batch key),
        as a stage deployment batches them. `on_step(request index, step name, steps done, N)`; `around(step
        name, call)` wraps each stage call (the benchmarks time it and take its memory peak)."""
        phases = {"prepare", "denoise"} | ({"finish"} if decode else set()) | ({"side"} if side_steps else set())
        requests = [self.planner.fix(params)[0] for params in requests]  # a load-elastic switch, fixed once
        results = [GenerationResult(params, self.plan(params)) for params in requests]
        steps = [[step for step in self.pipeline.steps(r.plan) if step.phase in phases] for r in results]
        done = [0] * len(requests)
        while any(done[i] < len(steps[i]) for i in range(len(requests))):
            batches: dict[tuple, list[int]] = {}
            for i, params in enumerate(requests):
                if done[i] < len(steps[i]):
                    stage = steps[i][done[i]].stage
                    batches.setdefault((stage, self.stages[stage].batch_key(params)), []).append(i)
            for (stage, _), members in batches.items():
                tasks = [Task(requests[i], steps[i][done[i]], {a: results[i].artifacts[a]
                                                               for a in steps[i][done[i]].reads}) for i in members]
                callback = on_step and (lambda j, n_done, n, members=members, tasks=tasks: on_step(
                    members[j], tasks[j].step.name, n_done, n))
                call = functools.partial(self.stages[stage].run, tasks, callback)
                start = time.perf_counter()
                outputs = around(tasks[0].step.name, call) if around else call()
                seconds = time.perf_counter() - start
                for i, task, output in zip(members, tasks, outputs):
                    if isinstance(output, Cancelled):
                        raise RuntimeError(f"{task.step.name} was cancelled after {output.step_index} steps")
                    result = results[i]
                    result.artifacts.update(output.values)
                    result.timings[task.step.name] = seconds
                    result.cached_steps += output.cached_steps
                    if output.steps_done is not None:
                        first = result.segments[-1][2] if result.segments else 0
                        result.segments.append((task.step.name, first, output.steps_done))
                    done[i] += 1
        return results
