"""The denoising stages: the large model's (sketch) and the small model's (render), each running the segments of a
request's plan that belong to its model.

A segment starts from the prompt embeddings (the plan's first) or from the previous segment's hand-off, denoises
its steps (serve/denoise.py) and ends in a hand-off for the next segment or, for the plan's last, in the final
latents, [1, C, F', H', W'] whatever the family's own layout. Its steps come from the plan (serve/switch.py), made
here from the request and the sampler's own timesteps, so a boundary switch is exact; an adaptive first segment
ends where the rule decides. Render segments may cache steps (`render_cache`). A batch's LoRA adapters of the
stage's model (the request's `sketch_loras` or `render_loras`, one set per batch: `batch_key`) are active around
its forwards, and every adapter is off for a batch without one (serve/lora.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable

import torch

from serve.calibration import Calibration
from serve.denoise import Cancelled, LatentSpec, StepCallback, Trajectory, run
from serve.handoff import Handoff, PromptEmbeds, move_scheduler
from serve.lora import LoadedAdapters
from serve.pipeline.artifacts import EMBEDS, LATENTS
from serve.pipeline.stage import Output, Stage, Task
from serve.request import GenerationParams
from serve.switch import make_plan
from srd_kernels.apply import KernelReport, apply_kernels
from srd_kernels.step_cache import StepCache

Start = tuple[GenerationParams, PromptEmbeds] | Handoff  # a plan's first segment, or a later one


class DenoiseStage(Stage):
    reads = (EMBEDS,)  # the plan's first segment; later ones read the hand-off before them
    writes = (LATENTS,)  # the plan's last segment; earlier ones write a hand-off

    def __init__(self, family, denoiser, scheduler_config: dict, spec: LatentSpec, device: str = "cpu",
                 kernels: KernelReport | None = None, calibration: Calibration | None = None,
                 adapters: LoadedAdapters | None = None):
        self.family = family
        self.denoiser = denoiser
        self.scheduler_config = scheduler_config
        self.spec = spec
        self.device = device
        self.kernels = kernels or KernelReport(self.role)
        self.calibration = calibration  # the pair's, for `switch: quality:T`
        self.adapters = adapters  # the LoRA adapters loaded into its transformer (None: none are registered)

    @classmethod
    def batch_key(cls, params: GenerationParams) -> Hashable:
        """Equal latent shapes and the same adapters (and scales) on this stage's model: a batch applies one set."""
        return (params.shape_key, params.loras(cls.role))

    @classmethod
    def load(cls, config, models=None, denoiser=None) -> DenoiseStage:
        """The role's transformer on this process's device, with its speed levers; or `denoiser`, a parallel
        stage's worker group (serve/parallel/), taken as it is."""
        family = config.family()
        pair = config.models()
        family.check_compatible(pair)  # a wrong pair fails here, before any weights load
        config.check_loras((cls.role,))  # so does an adapter that does not fit this stage's model
        levers, dropped = config.kernels_for(cls.role, family)
        from_profile = getattr(config, f"{cls.role}_kernels") is None  # the report then names the profile
        kernels = KernelReport(cls.role, speed=config.speed_name if from_profile else None,
                               notes=[dropped] if dropped else [])
        if denoiser is None:
            source, subfolder = pair.transformer(cls.role)
            transformer = family.load_transformer(source, cls.role, config.device, config.torch_dtype,
                                                  config.weights, subfolder=subfolder)
            denoiser = family.denoiser(transformer, config.max_tokens_per_forward)
            if levers.any:
                kernels = apply_kernels(transformer, levers, cls.role)
                kernels.speed = config.speed_name if from_profile else None
        elif levers.any:  # the ranks load their own transformers (serve/parallel/worker.py) without levers
            kernels.notes.append("levers not applied: a parallel stage's ranks run without them")
        adapters = None
        if config.stage_loras(cls.role):
            if not isinstance(getattr(denoiser, "transformer", None), torch.nn.Module):
                raise ValueError(f"`loras` registers {cls.role} adapters, but the {cls.role} stage runs on parallel "
                                 "ranks, which do not load adapters; serve them from a one-rank stage")
            adapters = LoadedAdapters(denoiser.transformer, config.stage_loras(cls.role), family.pipeline_class,
                                      config.max_loaded_loras)
        return cls(family, denoiser, family.scheduler_config(pair.sketch), family.latent_spec(pair.sketch),
                   config.device, kernels, config.pair_calibration(), adapters)

    def __call__(self, inputs: list[Start], on_step: StepCallback | None = None,
                 report: dict | None = None) -> list[Handoff | object]:
        """Run the segment each input starts: a hand-off for the next segment, the final latents (float32, on the
        CPU) after the plan's last, or `Cancelled`. `report`, if given, receives per input index the steps that
        render caching skipped."""
        trajectories = [self._start(x) for x in inputs]
        with self._adapters_of(trajectories):
            run(self.denoiser, trajectories, self.family.sampler, on_step)
        if report is not None:
            report.update({i: tr.cache.skipped if tr.cache else 0 for i, tr in enumerate(trajectories)})
        return [self._end(tr, x) for tr, x in zip(trajectories, inputs)]

    def _adapters_of(self, trajectories: list[Trajectory]):
        """The batch's LoRA set applied around its forwards (and every adapter off for a batch without one)."""
        sets = {tr.params.loras(self.role) for tr in trajectories}
        if len(sets) > 1:
            raise ValueError(f"a {self.role} batch mixes LoRA sets {sorted(sets)}; batch by `batch_key`")
        choices = sets.pop() if sets else ()
        if self.adapters is None:
            if choices:
                raise ValueError(f"the {self.role} stage has no adapters registered; requested {choices}")
            return contextlib.nullcontext()
        return self.adapters.applied(choices)

    def _start(self, start: Start) -> Trajectory:
        sampler, device = self.family.sampler, self.device
        if isinstance(start, Handoff):
            params, index, step = start.params, start.segment, start.step_index
            scheduler = move_scheduler(start.scheduler, device)
            latents, embeds = start.latents.to(device), start.embeds.to(device)
            extra = {k: v.to(device) for k, v in start.sampler_extra.items()}
        else:
            params, embeds = start
            self.family.check_request(params)
            index, step, extra, embeds = 0, 0, {}, embeds.to(device)
            scheduler = sampler.scheduler(self.scheduler_config, params, device)
            latents = sampler.initial_latents(params, self.spec, device, scheduler, extra)
        plan = make_plan(params, scheduler.timesteps, self.calibration)
        if not 0 <= index < len(plan.segments) or plan.segments[index].role != self.role:
            raise ValueError(f"the {self.role} stage cannot run segment {index} of switch {params.switch} "
                             f"({', '.join(plan.names)})")
        segment = plan.segments[index]
        tracker = params.switch.tracker(plan.num_steps) if segment.stop is None else None
        return Trajectory(
            params=params, embeds=embeds, latents=latents, scheduler=scheduler, step=step,
            stop=tracker.max_step if tracker else segment.stop, guidance=segment.guidance, extra=extra,
            tracker=tracker, plan=plan, segment=index,
            cache=StepCache(params.render_cache) if self.role == "render" and params.render_cache > 0 else None,
        )

    def _end(self, tr: Trajectory, start: Start) -> Handoff | object:
        if tr.cancelled:
            return Cancelled(tr.step)
        if tr.segment == len(tr.plan.segments) - 1 and not tr.preempted:
            return self.spec.canonical(tr.latents.float().cpu())
        before = start if isinstance(start, Handoff) else None
        return Handoff(  # a preempted trajectory's hand-off continues its own segment
            params=tr.params, embeds=tr.embeds, latents=tr.latents, step_index=tr.step, scheduler=tr.scheduler,
            segment=tr.segment + (0 if tr.preempted else 1),
            rates=list(tr.tracker.rates if tr.tracker else before.rates if before else []),
            timings={**(before.timings if before else {}), tr.plan.names[tr.segment]: tr.seconds},
            sampler_extra=tr.extra,
        ).cpu()

    def run(self, tasks: list[Task], on_step: StepCallback | None = None) -> list[Output | Cancelled]:
        starts = []
        for task in tasks:
            value = task.inputs[task.step.reads[0]]  # the embeddings, a hand-off, or a preempted call's checkpoint
            if not isinstance(value, Handoff):
                starts.append((task.params, value))
            elif value.segment != task.step.segment:
                raise ValueError(f"step {task.step.name} runs segment {task.step.segment} but its input hand-off "
                                 f"continues segment {value.segment}")
            else:
                starts.append(value)
        outputs, cached = [], {}
        for i, (task, result) in enumerate(zip(tasks, self(starts, on_step, report=cached))):
            if isinstance(result, Cancelled):
                outputs.append(result)
            elif isinstance(result, Handoff) and result.segment == task.step.segment:  # it yielded mid-segment
                outputs.append(Output({task.step.resume: result}, steps_done=result.step_index,
                                      cached_steps=cached[i], preempted=True))
            else:
                done = result.step_index if isinstance(result, Handoff) else task.params.num_inference_steps
                outputs.append(Output({task.step.writes[0]: result}, steps_done=done, cached_steps=cached[i]))
        return outputs

    def stats(self) -> dict:
        """The LoRA adapters loaded in this replica's transformer, and its LRU's loads, hits and evictions."""
        return {} if self.adapters is None else {"loras": self.adapters.stats()}


class SketchStage(DenoiseStage):
    name = "sketch"
    deployment = "Sketcher"
    role = "sketch"


class RenderStage(DenoiseStage):
    name = "render"
    deployment = "Renderer"
    role = "render"
