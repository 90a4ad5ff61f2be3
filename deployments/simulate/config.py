"""Typed configuration of one simulated run: the cluster, the app's layout and policy, the costs, the workload, the
faults. Every figure that was measured comes in here (a scenario file names its source), never from the code."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEPLOYMENTS = ("Encoder", "Sketcher", "Renderer", "Decoder")  # the stage deployments of serve/pipeline/registry.py


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClusterConfig(_Config):
    """The devices the replicas are packed on."""

    gpus: int = Field(1, ge=1, description="Devices in the cluster (GPUs; or CPU boxes for a CPU run).")
    card: str = Field("h200", description="The cost table's card (serve/placement_costs.json) the layout and the "
                                         "costs are taken from.")
    device_capacity: float = Field(
        1.0, gt=0, description="Batches one device runs at full speed at once: 1 for a GPU (concurrent batches "
        "time-slice it), the core count for a CPU box (each batch runs one thread).")
    background_load: float = Field(
        0.0, ge=0, description="Runnable work on each device from outside the app (a shared CPU box's load "
        "average): it takes its share of the device like one more batch per unit.")
    price_per_gpu_hour: float = Field(1.0, ge=0, description="Price of one device-hour, for the cost per video.")


class ExplicitCosts(_Config):
    """Per-call seconds measured for one request shape, for runs the cost table does not cover (the tiny preset on
    a CPU). Exclusive device seconds of one call of batch size 1."""

    source: str = Field(description="Where and when these were measured.")
    encode_s: float = Field(ge=0, description="One prompt pair through the text encoder.")
    sketch_step_s: float = Field(ge=0, description="One denoising step (with guidance) of the large model.")
    render_step_s: float = Field(ge=0, description="One denoising step (with guidance) of the small model.")
    decode_s: float = Field(ge=0, description="The decode stage: VAE decode and the video file.")
    preview_s: float = Field(ge=0, description="The preview stage: the first frame of the hand-off.")
    call_s: float = Field(0.0, ge=0, description="Fixed seconds of every stage call beyond its compute (reading "
                                                 "and writing its artifacts), on the device.")


class CostsConfig(_Config):
    """What a call costs on its device."""

    measured: ExplicitCosts | None = Field(
        None, description="Explicit per-call seconds; unset: the cost table's `cluster.card` entry, through "
        "serve.placement.video_cost (the planner's own cost model) at each request's size and steps.")
    decode_extra_s: float = Field(
        0.0, ge=0, description="Seconds the served decode stage takes beyond the cost table's decode (writing the "
        "mp4), added to every decode.")
    batch_scaling: float = Field(
        1.0, ge=0, le=1, description="What each request beyond the first adds to a batch, as a fraction of its own "
        "cost: 1 for compute-bound models (a batch of B costs B single calls), 0 for launch-bound ones.")


class OverheadConfig(_Config):
    """Fixed seconds outside the stages (measured per gap in bench/RESULTS.md, run 4 (d))."""

    admission_s: float = Field(0.0, ge=0, description="Request accepted -> job in the store (ingress).")
    gap_s: dict[str, float] = Field(
        default_factory=dict, description="Seconds between the previous step's end and a step's start, by the "
        "step's stage (encode, sketch, render, decode, preview): hand-off and orchestration.")
    completion_s: float = Field(0.0, ge=0, description="Last step done -> the client has the result.")


class StartupConfig(_Config):
    """How long a replica takes from being asked for to serving (the first replicas are up at t=0)."""

    replica_start_s: dict[str, float] = Field(
        default_factory=dict, description="Seconds from a replica's start to ready, by deployment (process, "
        "imports, weights); missing: 0.")
    compile_cold_s: dict[str, float] = Field(
        default_factory=dict, description="Added to a replica's start while the compile cache holds nothing for "
        "its deployment (the first replica started after t=0), by deployment.")
    compile_warm_s: dict[str, float] = Field(
        default_factory=dict, description="Added to a replica's start once the cache is warm, by deployment.")
    initial_cold: bool = Field(False, description="The initial replicas start at t=0 too (else they are up).")


class LayoutConfig(_Config):
    """The app's replicas, GPU shares, batching and autoscaling: the Serve config the planner writes, or a file."""

    kind: Literal["plan", "all-sketch", "serve-config"] = Field(
        "plan", description="plan: serve.placement.plan + serve_config for `cluster.gpus` at the planning request "
        "below; all-sketch: every GPU a sketcher (encoder, decoder and a pass-through renderer beside them), for "
        "switch step:N requests; serve-config: the Serve config file `serve_config`.")
    serve_config: str | None = Field(None, description="A Serve config YAML (`srd plan --write-config`).")
    plan_request: dict = Field(
        default_factory=dict, description="The request the planner sizes the split for (VideoRequest fields: "
        "size/height/width, num_frames, num_inference_steps, switch); the preset's defaults fill the rest.")
    policy: Literal["app", "ray-default", "fixed"] = Field(
        "app", description="app: the Serve config's application-level policy (CostAwarePolicy); ray-default: Ray "
        "Serve's per-deployment default (replica_queue_length_autoscaling_policy); fixed: every autoscaled stage "
        "at its max_replicas.")
    policy_kwargs: dict = Field(default_factory=dict, description="Overrides of the policy's kwargs.")
    max_replicas: dict[str, int] = Field(
        default_factory=dict, description="Overrides of a stage's autoscaling max_replicas, by deployment.")
    min_replicas: dict[str, int] = Field(
        default_factory=dict, description="Overrides of a stage's autoscaling min_replicas, by deployment.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Override of every stage's target_ongoing_requests (Ray's default policy).")
    batching: dict[str, dict] = Field(
        default_factory=dict, description="Overrides of a stage's batching (max_batch_size, "
        "batch_wait_timeout_s), by deployment.")
    max_ongoing_requests: dict[str, int] = Field(default_factory=dict, description="Overrides, by deployment.")
    orchestrators: int = Field(1, ge=1, description="Orchestrator replicas (each drives max_running_jobs).")
    max_running_jobs: int | None = Field(None, ge=1, description="Override of the orchestrator's max_running_jobs.")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="A replica scaled down drains its calls this long, then is killed (Serve's "
        "default); its unfinished calls fail an attempt.")
    control_period_s: float = Field(1.0, gt=0, description="How often the autoscaling policy is called (Serve's "
                                                           "controller calls it every 0.1 s; coarser is cheaper).")

    @model_validator(mode="after")
    def _file(self) -> LayoutConfig:
        if self.kind == "serve-config" and not self.serve_config:
            raise ValueError("`layout.serve_config` must name a Serve config file when `layout.kind` is serve-config")
        return self


class JobsSimConfig(_Config):
    """The job store's settings the drive loop uses (serve/jobs/config.py JobsConfig)."""

    lease_s: float = Field(30.0, gt=0, description="An orchestrator's hold on a job (renewed every third of it).")
    poll_interval_s: float = Field(0.2, gt=0, description="How often an orchestrator claims jobs.")
    max_attempts: int = Field(3, ge=1, description="Attempts per step before the job fails.")
    max_unfinished_jobs: int = Field(1000, ge=1, description="Queued plus running jobs; beyond it a request is "
                                                             "refused (429).")


class RequestKind(_Config):
    """One kind of request in a mix."""

    weight: float = Field(1.0, gt=0, description="Relative frequency in its mix.")
    request: dict = Field(default_factory=dict, description="VideoRequest fields (no prompt): size, num_frames, "
                          "num_inference_steps, switch...; the preset fills the rest.")
    klass: str = Field("default", alias="class", description="Latency class (reported apart, SLO per class).")
    priority: int = Field(0, description="Priority a priority rule may read (higher first); FIFO ignores it.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Phase(_Config):
    """A stretch of the generator's time with its own rate and mix (bursts are phases)."""

    duration_s: float = Field(gt=0, description="Length of the phase.")
    rate_per_hour: float = Field(ge=0, description="Mean arrivals per hour (Poisson) in this phase.")
    mix: list[RequestKind] | None = Field(None, description="The phase's mix; unset: the workload's.")


class WorkloadConfig(_Config):
    """Arrivals and what they ask for: a generator or a trace file."""

    kind: Literal["poisson", "phases", "diurnal", "at-once", "uniform", "trace"] = Field(
        "poisson", description="poisson: `rate_per_hour` for `duration_s`; phases: `phases` in turn, `repeat` "
        "times (bursty); diurnal: a sinusoidal rate over `period_s`; at-once: `count` at t=0; uniform: `count` "
        "evenly over `duration_s`; trace: the JSON-lines file `trace` (t, request, class, priority per line).")
    preset: str = Field("wan2.1-t2v", description="The preset whose defaults resolve the requests.")
    rate_per_hour: float = Field(0.0, ge=0, description="Mean arrivals per hour (poisson, diurnal).")
    duration_s: float = Field(0.0, ge=0, description="How long arrivals come (poisson, diurnal, uniform).")
    count: int = Field(0, ge=0, description="Requests (at-once, uniform).")
    phases: list[Phase] = Field(default_factory=list, description="The phases (kind phases).")
    repeat: int = Field(1, ge=1, description="How many times the phases run.")
    period_s: float = Field(86400.0, gt=0, description="The diurnal period.")
    amplitude: float = Field(0.5, ge=0, le=1, description="The diurnal swing, a fraction of the mean rate.")
    mix: list[RequestKind] = Field(default_factory=lambda: [RequestKind()], description="The request mix.")
    trace: str | None = Field(None, description="Trace file (kind trace); a relative path is from the config's "
                                                "directory.")

    @model_validator(mode="after")
    def _complete(self) -> WorkloadConfig:
        if self.kind == "trace" and not self.trace:
            raise ValueError("`workload.trace` must name a file when `workload.kind` is trace")
        if self.kind == "phases" and not self.phases:
            raise ValueError("`workload.phases` must not be empty when `workload.kind` is phases")
        if self.kind in ("poisson", "diurnal", "uniform") and self.duration_s <= 0:
            raise ValueError(f"`workload.duration_s` must be > 0 for kind {self.kind}")
        if self.kind in ("at-once", "uniform") and self.count <= 0:
            raise ValueError(f"`workload.count` must be > 0 for kind {self.kind}")
        return self


class Fault(_Config):
    """A replica killed; Serve replaces it after `restart_s`."""

    deployment: Literal["Encoder", "Sketcher", "Renderer", "Decoder", "Orchestrator"] = Field(
        description="Whose replica dies (the first live one).")
    at_s: float | None = Field(None, ge=0, description="When (seconds from the first arrival).")
    at_fraction: float | None = Field(
        None, ge=0, le=1, description="Instead: once this fraction of all jobs has finished and, for a stage, a job "
        "is in that stage (as bench/load_faults.py kills).")
    restart_s: float = Field(ge=0, description="Kill -> the replacement serves.")

    @model_validator(mode="after")
    def _when(self) -> Fault:
        if (self.at_s is None) == (self.at_fraction is None):
            raise ValueError("a fault needs exactly one of `at_s` and `at_fraction`")
        return self


class SimConfig(_Config):
    """One simulated run."""

    name: str = Field("run", description="Label of the run in reports and plots.")
    seed: int = Field(0, description="Seed of arrivals, mixes and routing: equal seeds give equal runs.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="The devices.")
    layout: LayoutConfig = Field(default_factory=LayoutConfig, description="The app's deployments and policy.")
    costs: CostsConfig = Field(default_factory=CostsConfig, description="What calls cost.")
    overheads: OverheadConfig = Field(default_factory=OverheadConfig, description="Fixed gaps.")
    startup: StartupConfig = Field(default_factory=StartupConfig, description="Replica start times.")
    jobs: JobsSimConfig = Field(default_factory=JobsSimConfig, description="Leases, polling, attempts.")
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig, description="Arrivals and requests.")
    faults: list[Fault] = Field(default_factory=list, description="Replicas killed during the run.")
    slo_s: dict[str, float] = Field(default_factory=dict, description="Latency objective by class; a class "
                                                                      "without one is not scored.")
    priority_rule: str = Field(
        "deployments.simulate.rules:fifo", description="module:function giving a queued call's sort key (lower "
        "first), applied to the handle queues, the batch queues and claims: the plug for latency classes.")
    max_time_s: float = Field(7 * 86400.0, gt=0, description="Stop the run here even if jobs remain.")
    timeline_step_s: float = Field(10.0, gt=0, description="Sampling step of the reported time series.")
