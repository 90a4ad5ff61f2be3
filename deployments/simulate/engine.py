"""The discrete-event simulation of the app on N devices: arrivals, the store's claims, the drive loop's steps, the
stage deployments' handles, batches and replicas, the devices they share, faults and autoscaling.

Why a small event loop of its own rather than SimPy: the one contended resource is a device that the batches on it
time-slice (several replicas on one GPU, as the one-GPU app runs), so a batch's end moves whenever another batch on
its device starts or ends. SimPy's resources are FIFO servers; processor sharing would need the same re-timing code
on top of it, plus a dependency. A heap of (time, sequence, callback) and a version stamp per device do it here.

What is the app's own code, called, not copied: the job's steps and batch keys (serve/pipeline), the plan
(serve/switch.make_plan), the drive loop's retry wait (serve/jobs/drive.retry_delay_s), the layout
(serve/placement through layout.py), the autoscaling policies (policy.py). What is modelled: the timings (costs.py),
the queues (FIFO, or the config's priority rule), the routing (the least-loaded replica with room, where Ray's
router samples two), the lease and poll periods.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from deployments.simulate.config import SimConfig
from deployments.simulate.costs import CallCosts
from deployments.simulate.layout import Layout, stage_deployment
from deployments.simulate.policy import Autoscaler, StageView
from deployments.simulate.rules import Waiting
from deployments.simulate.workload import Arrival
from serve.jobs.drive import retry_delay_s
from serve.pipeline.registry import PIPELINE
from serve.pipeline.stage import Step
from serve.switch import make_plan

_EPS = 1e-9


class Loop:
    """Events in time order; equal times in the order they were scheduled (so a seed gives one run)."""

    def __init__(self):
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn, args))

    def after(self, dt: float, fn: Callable, *args) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self, until: float, done: Callable[[], bool]) -> None:
        while self._heap and self._heap[0][0] <= until and not done():
            self.now, _, fn, args = heapq.heappop(self._heap)
            fn(*args)


@dataclass(eq=False)
class Job:
    id: int
    arrival: Arrival
    steps: tuple[Step, ...]
    next: int = 0  # index into steps: the checkpoint is everything before it
    attempts: dict[str, int] = field(default_factory=dict)
    orchestrator: Orchestrator | None = None
    waiting: Call | None = None
    status: str = "arriving"  # arriving, queued, running, completed, failed
    done_at: float | None = None


@dataclass(eq=False)
class Call:
    job: Job
    step: Step
    deployment: str
    key: tuple
    steps: int  # denoising steps it takes (1 for a call that is one step)
    unit_s: float  # exclusive device seconds alone
    queued: float = 0.0  # when it joined its current queue
    sort_key: tuple = ()


@dataclass(eq=False)
class Device:
    index: int
    capacity: float
    background: float
    free: float = 1.0  # unallocated share
    running: dict = field(default_factory=dict)  # Batch -> exclusive seconds left
    updated: float = 0.0
    version: int = 0
    busy_s: float = 0.0

    def rate(self) -> float:
        """Speed of each running batch: the device's capacity shared by its batches and the outside load."""
        n = len(self.running)
        return min(1.0, self.capacity / (n + self.background)) if n else 0.0

    def advance(self, now: float) -> None:
        if self.running:
            done = (now - self.updated) * self.rate()
            for batch in self.running:
                self.running[batch] -= done
            self.busy_s += now - self.updated
        self.updated = now


@dataclass(eq=False)
class Replica:
    id: int
    deployment: str
    device: Device
    share: float
    born: float
    state: str = "starting"  # starting, ready, draining, dead
    queue: list[Call] = field(default_factory=list)
    batch: Batch | None = None
    step_s: float | None = None  # smoothed seconds per job-step, as StageRunner measures it
    busy_s: float = 0.0
    died: float | None = None

    def ongoing(self) -> int:
        return len(self.queue) + (len(self.batch.calls) if self.batch else 0)


@dataclass(eq=False)
class Batch:
    calls: list[Call]
    replica: Replica
    started: float
    work_s: float
    steps: int


@dataclass(eq=False)
class Orchestrator:
    id: int
    alive: bool = True
    jobs: set = field(default_factory=set)


class Simulation:
    """One run of `config` over `arrivals` with `layout`; `run()` returns the raw record report.py summarises."""

    def __init__(self, config: SimConfig, layout: Layout, arrivals: list[Arrival], priority: Callable,
                 autoscaler: Autoscaler | None = None):
        self.config, self.layout, self.priority = config, layout, priority
        self.loop = Loop()
        self.costs = CallCosts(config.costs, config.cluster.card)
        self.autoscaler = autoscaler or Autoscaler(config.layout.policy, layout.policy_kwargs)
        cluster = config.cluster
        self.devices = [Device(i, cluster.device_capacity, cluster.background_load) for i in range(cluster.gpus)]
        self.replicas: dict[str, list[Replica]] = {name: [] for name in layout.deployments}
        self.handles: dict[str, list] = {name: [] for name in layout.deployments}  # heaps of (key, seq, call)
        self.targets: dict[str, int] = {}
        self.warm: set[str] = set()
        self.store: list = []  # heap of (key, seq, job): queued jobs
        self.orchestrators = [Orchestrator(i) for i in range(config.layout.orchestrators)]
        self.active: dict[tuple[int, str], tuple[Call, Replica]] = {}  # (job, step name) -> call at a replica
        self.jobs = [Job(i, a, self._steps(a)) for i, a in enumerate(arrivals)]
        self.finished = 0
        self.unfinished = 0  # accepted, not yet completed or failed
        self.work_done: dict[str, float] = dict.fromkeys(layout.deployments, 0.0)  # exclusive device seconds
        self.calls_started: dict[str, int] = {}  # by step name (reruns show as more than one per job)
        self.reruns_after_checkpoint = 0
        self.timeline: list[dict] = []
        self.faults_done: list[dict] = []
        self.pending_faults = list(config.faults)
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._claim_pending = False

    # --- set-up --------------------------------------------------------------------------------------------------
    def _steps(self, arrival: Arrival) -> tuple[Step, ...]:
        return PIPELINE.steps(make_plan(arrival.params))

    def _start_replicas(self) -> None:
        initial = []
        for name, spec in self.layout.deployments.items():
            count = spec.autoscaling.max_replicas if spec.autoscaling and self.autoscaler.kind == "fixed" \
                else spec.replicas
            self.targets[name] = count
            initial += [name] * count
        initial.sort(key=lambda name: -self.layout.deployments[name].num_gpus)  # big first: best-fit decreasing
        for name in initial:
            replica = self._place(name)
            if replica is None:
                raise ValueError(f"`cluster.gpus` ({self.config.cluster.gpus}) cannot hold the layout's initial "
                                 f"replicas: no room for a {name} ({self.layout.deployments[name].num_gpus} GPU)")
            if self.config.startup.initial_cold:
                self._boot(replica)
            else:
                replica.state = "ready"

    def _place(self, name: str) -> Replica | None:
        """A replica of `name` on the device with the least room that fits its share (best fit), or None."""
        share = self.layout.deployments[name].num_gpus
        fits = [d for d in self.devices if d.free + _EPS >= share]
        if not fits:
            return None
        device = min(fits, key=lambda d: (d.free, d.index))
        device.free -= share
        replica = Replica(next(self._ids), name, device, share, self.loop.now)
        self.replicas[name].append(replica)
        return replica

    def _boot(self, replica: Replica) -> None:
        startup, name = self.config.startup, replica.deployment
        cold = name not in self.warm
        compile_s = (startup.compile_cold_s if cold else startup.compile_warm_s).get(name, 0.0)
        self.loop.after(startup.replica_start_s.get(name, 0.0) + compile_s, self._ready, replica)

    def _ready(self, replica: Replica) -> None:
        if replica.state != "starting":
            return
        replica.state = "ready"
        self.warm.add(replica.deployment)
        self._dispatch(replica.deployment)

    # --- arrivals, claims, the drive loop ---------------------------------------------------------------------
    def _arrive(self, job: Job) -> None:
        if self.unfinished >= self.config.jobs.max_unfinished_jobs:  # the ingress answers 429
            job.status, job.done_at = "refused", self.loop.now
            self.finished += 1
            return
        self.unfinished += 1
        self.loop.after(self.config.overheads.admission_s, self._stored, job)

    def _stored(self, job: Job) -> None:
        job.status = "queued"
        self._enqueue_job(job)

    def _enqueue_job(self, job: Job) -> None:
        a = job.arrival
        key = self.priority(Waiting(job.id, a.priority, a.klass, a.t, a.t))  # the store orders by created_at
        heapq.heappush(self.store, (key, next(self._seq), job))
        self._schedule_claim()

    def _schedule_claim(self) -> None:
        if self._claim_pending:
            return
        self._claim_pending = True
        poll = self.config.jobs.poll_interval_s
        self.loop.at((math.floor(self.loop.now / poll) + 1) * poll, self._claim)

    def _claim(self) -> None:
        self._claim_pending = False
        limit = self.layout.max_running_jobs
        while self.store:
            free = [o for o in self.orchestrators if o.alive and len(o.jobs) < limit]
            if not free:
                return
            orchestrator = min(free, key=lambda o: (len(o.jobs), o.id))
            _, _, job = heapq.heappop(self.store)
            job.orchestrator, job.status = orchestrator, "running"
            orchestrator.jobs.add(job)
            self._issue(job)

    def _issue(self, job: Job, delay: float = 0.0) -> None:
        """Run the job's next step (side steps are started and not waited for), or complete it."""
        while job.next < len(job.steps) and job.steps[job.next].phase == "side":
            self._call(job, job.steps[job.next], wait=False)
            job.next += 1
        if job.next == len(job.steps):
            self.loop.after(delay + self.config.overheads.completion_s, self._complete, job, job.orchestrator)
            return
        step = job.steps[job.next]
        job.attempts[step.name] = job.attempts.get(step.name, 0) + 1
        gap = self.config.overheads.gap_s.get(step.stage, 0.0)
        self.loop.after(delay + gap, self._send, job, step, job.orchestrator)

    def _send(self, job: Job, step: Step, orchestrator: Orchestrator) -> None:
        if job.orchestrator is orchestrator and orchestrator.alive and job.status == "running":
            job.waiting = self._call(job, step, wait=True)

    def _call(self, job: Job, step: Step, wait: bool) -> Call:
        held = self.active.get((job.id, step.name))
        if held is not None:  # a takeover asks again for a step a replica still runs: it joins that call
            return held[0]
        params = job.arrival.params
        steps = step.span[1] - step.span[0] if step.phase == "denoise" else 1
        deployment = stage_deployment(step.stage)
        call = Call(job, step, deployment, (step.stage, PIPELINE.stage(step.stage).batch_key(params)), steps,
                    self.costs.unit(step.stage, params, steps))
        self._to_handle(call)
        return call

    def _to_handle(self, call: Call) -> None:
        a = call.job.arrival
        call.queued = self.loop.now
        call.sort_key = self.priority(Waiting(call.job.id, a.priority, a.klass, a.t, call.queued))
        heapq.heappush(self.handles[call.deployment], (call.sort_key, next(self._seq), call))
        self._dispatch(call.deployment)

    def _done(self, call: Call, ok: bool) -> None:
        """A stage call ended; its job's driver, if it still waits for it, records the step or retries it."""
        job = call.job
        if job.waiting is not call or job.orchestrator is None or not job.orchestrator.alive:
            return  # a side step, or a call whose driver died: the takeover runs the step again
        job.waiting = None
        if ok:
            job.next += 1
            self._issue(job)
            return
        step = call.step
        if job.attempts[step.name] >= self.config.jobs.max_attempts:
            self._finish(job, "failed")
            return
        self._issue(job, delay=retry_delay_s(job.attempts[step.name]))

    def _complete(self, job: Job, orchestrator: Orchestrator) -> None:
        if job.orchestrator is orchestrator and orchestrator.alive and job.status == "running":
            self._finish(job, "completed")

    def _finish(self, job: Job, status: str) -> None:
        job.status, job.done_at = status, self.loop.now
        if job.orchestrator is not None:
            job.orchestrator.jobs.discard(job)
        job.orchestrator = None
        self.finished += 1
        self.unfinished -= 1
        self._schedule_claim()
        self._check_faults()

    # --- stage deployments ------------------------------------------------------------------------------------
    def _dispatch(self, name: str) -> None:
        """Move calls from the handle to ready replicas with room (Serve's max_ongoing_requests)."""
        handle, limit = self.handles[name], self.layout.deployments[name].max_ongoing_requests
        while handle:
            room = [r for r in self.replicas[name] if r.state == "ready" and r.ongoing() < limit]
            if not room:
                return
            replica = min(room, key=lambda r: (r.ongoing(), r.id))
            _, _, call = heapq.heappop(handle)
            call.queued = self.loop.now
            replica.queue.append(call)
            self.active[(call.job.id, call.step.name)] = (call, replica)
            self._try_batch(replica)

    def _try_batch(self, replica: Replica) -> None:
        """Start the replica's next batch: the first call in the queue's order and up to max_batch_size - 1 more of
        its batch key, once the batch is full or its first call has waited batch_wait_timeout_s."""
        if replica.batch is not None or not replica.queue or replica.state not in ("ready", "draining"):
            return
        batching = self.layout.deployments[replica.deployment].batching
        ordered = sorted(replica.queue, key=lambda c: c.sort_key)
        head = ordered[0]
        calls = [c for c in ordered if c.key == head.key][:batching.max_batch_size]
        ready_at = head.queued + batching.batch_wait_timeout_s
        if len(calls) < batching.max_batch_size and self.loop.now + _EPS < ready_at:
            self.loop.at(ready_at, self._try_batch, replica)
            return
        for call in calls:
            replica.queue.remove(call)
            self.calls_started[call.step.name] = self.calls_started.get(call.step.name, 0) + 1
            if call.step.phase != "side" and call.job.next > call.job.steps.index(call.step):
                self.reruns_after_checkpoint += 1
        work = self.costs.batch([c.unit_s for c in calls])
        batch = Batch(calls, replica, self.loop.now, work, max(c.steps for c in calls))
        replica.batch = batch
        self._device_change(replica.device, add=(batch, work))

    def _device_change(self, device: Device, add: tuple | None = None, remove: Batch | None = None) -> None:
        device.advance(self.loop.now)
        if add is not None:
            device.running[add[0]] = add[1]
        if remove is not None:
            device.running.pop(remove, None)
        device.version += 1
        if device.running:
            first = min(device.running.values())
            self.loop.after(max(0.0, first) / device.rate(), self._device_tick, device, device.version)

    def _device_tick(self, device: Device, version: int) -> None:
        if version != device.version:
            return
        device.advance(self.loop.now)
        ended = [b for b, left in device.running.items() if left <= 1e-7]
        for batch in ended:
            device.running.pop(batch)
        self._device_change(device)
        for batch in ended:
            self._batch_done(batch)

    def _batch_done(self, batch: Batch) -> None:
        replica = batch.replica
        replica.batch = None
        wall = self.loop.now - batch.started
        replica.busy_s += wall
        self.work_done[replica.deployment] += batch.work_s
        sample = wall / max(batch.steps, 1) / len(batch.calls)  # StageRunner._measured: a step over its jobs
        replica.step_s = sample if replica.step_s is None else 0.7 * replica.step_s + 0.3 * sample
        for call in batch.calls:
            self.active.pop((call.job.id, call.step.name), None)
            self._done(call, ok=True)
        self._after_call(replica)

    def _after_call(self, replica: Replica) -> None:
        if replica.state == "draining" and replica.ongoing() == 0:
            self._remove(replica)
            return
        self._try_batch(replica)
        self._dispatch(replica.deployment)

    def _kill(self, replica: Replica) -> None:
        """The replica dies: its running and queued calls fail (each an attempt of its job's step)."""
        if replica.state == "dead":
            return
        calls = list(replica.queue) + (list(replica.batch.calls) if replica.batch else [])
        if replica.batch is not None:
            replica.busy_s += self.loop.now - replica.batch.started
            self._device_change(replica.device, remove=replica.batch)
        replica.queue, replica.batch = [], None
        self._remove(replica)
        for call in calls:
            self.active.pop((call.job.id, call.step.name), None)
            self._done(call, ok=False)

    def _remove(self, replica: Replica) -> None:
        replica.state, replica.died = "dead", self.loop.now
        replica.device.free += replica.share

    # --- faults -------------------------------------------------------------------------------------------------
    def _check_faults(self) -> None:
        for fault in list(self.pending_faults):
            if fault.at_fraction is None:
                continue
            if self.finished < fault.at_fraction * len(self.jobs):
                continue
            if fault.deployment != "Orchestrator" and not any(
                    call.deployment == fault.deployment for call, _ in self.active.values()):
                continue
            self.pending_faults.remove(fault)
            self._fault(fault)

    def _fault(self, fault) -> None:
        record = {"deployment": fault.deployment, "killed_at_s": self.loop.now, "jobs_finished_then": self.finished,
                  "back_at_s": self.loop.now + fault.restart_s}
        self.faults_done.append(record)
        if fault.deployment == "Orchestrator":
            victim = next(o for o in self.orchestrators if o.alive)
            victim.alive = False
            for job in list(victim.jobs):  # held by a lease the dead driver no longer renews
                self.loop.after(self.config.jobs.lease_s, self._lease_lapsed, job, victim)
            self.loop.after(fault.restart_s, self._orchestrator_back)
            return
        live = [r for r in self.replicas[fault.deployment] if r.state == "ready"]
        if not live:
            return
        victim = next((r for r in live if r.ongoing()), live[0])
        device = victim.device
        self._kill(victim)
        replacement = Replica(next(self._ids), fault.deployment, device, victim.share, self.loop.now)
        device.free -= victim.share
        self.replicas[fault.deployment].append(replacement)
        self.loop.after(fault.restart_s, self._ready, replacement)

    def _lease_lapsed(self, job: Job, holder: Orchestrator) -> None:
        if job.orchestrator is not holder or job.status != "running":
            return
        holder.jobs.discard(job)
        job.orchestrator, job.waiting, job.status = None, None, "queued"
        step = job.steps[job.next] if job.next < len(job.steps) else None
        if step is not None and job.attempts.get(step.name, 0) >= self.config.jobs.max_attempts:
            self._finish(job, "failed")
            return
        self._enqueue_job(job)

    def _orchestrator_back(self) -> None:
        """Serve's replacement: a new replica, holding no job until it claims some."""
        self.orchestrators.append(Orchestrator(len(self.orchestrators)))
        self._schedule_claim()

    # --- autoscaling ------------------------------------------------------------------------------------------
    def _views(self) -> list[StageView]:
        views = []
        for name, spec in self.layout.deployments.items():
            if spec.autoscaling is None:
                continue
            running = [r for r in self.replicas[name] if r.state == "ready"]
            metrics: dict[str, dict[int, float]] = {"queued_work_s": {}, "jobs": {}, "step_s": {}, "queued_steps": {}}
            for r in running:
                steps = sum(c.steps for c in r.queue)
                if r.batch is not None:
                    left = r.device.running.get(r.batch, 0.0) / r.batch.work_s if r.batch.work_s else 0.0
                    steps += sum(c.steps for c in r.batch.calls) * max(0.0, left)
                step_s = r.step_s or 0.0
                for metric, value in (("queued_work_s", steps * step_s), ("jobs", float(r.ongoing())),
                                      ("step_s", step_s), ("queued_steps", steps)):
                    metrics[metric][r.id] = value
            ongoing = sum(r.ongoing() for r in running)
            queued = len(self.handles[name])
            views.append(StageView(name, self.targets[name], [r.id for r in running], ongoing + queued, queued,
                                   metrics, spec.autoscaling))
        return views

    def _control(self) -> None:
        if self._all_done():
            return
        for device in self.devices:
            device.advance(self.loop.now)
        self._check_faults()  # as bench/load_faults.py watches: a kill waits for a job in the stage
        views = self._views()
        if views and self.autoscaler.kind != "fixed":
            self.targets.update(self.autoscaler.decide(views, self.loop.now))
        for name in self.targets:
            self._reconcile(name)
        placed = all(sum(1 for r in self.replicas[name] if r.state in ("starting", "ready")) >= count
                     for name, count in self.targets.items())
        if self.autoscaler.kind == "fixed" and placed and not any(f.at_fraction is not None
                                                                  for f in self.pending_faults):
            return  # nothing left for the controller to do
        self.loop.after(self.config.layout.control_period_s, self._control)

    def _reconcile(self, name: str) -> None:
        live = [r for r in self.replicas[name] if r.state in ("starting", "ready")]
        target = self.targets[name]
        for _ in range(target - len(live)):
            replica = self._place(name)
            if replica is None:
                break  # pending until a device has room, as Ray keeps it
            self._boot(replica)
        surplus = len(live) - target
        if surplus > 0:
            victims = sorted(live, key=lambda r: (r.state != "starting", r.ongoing(), -r.id))[:surplus]
            for replica in victims:
                if replica.state == "starting" or replica.ongoing() == 0:
                    self._remove(replica)
                    continue
                replica.state = "draining"
                self.loop.after(self.config.layout.graceful_shutdown_timeout_s, self._kill, replica)

    # --- the run ------------------------------------------------------------------------------------------------
    def _all_done(self) -> bool:
        return self.finished == len(self.jobs)

    def _sample(self) -> None:
        row = {"t": self.loop.now, "queued_jobs": len(self.store),
               "running_jobs": sum(len(o.jobs) for o in self.orchestrators), "finished": self.finished}
        for name in self.layout.deployments:
            row[f"{name}.ready"] = sum(1 for r in self.replicas[name] if r.state in ("ready", "draining"))
            row[f"{name}.target"] = self.targets[name]
            row[f"{name}.waiting"] = len(self.handles[name]) + sum(len(r.queue) for r in self.replicas[name])
        self.timeline.append(row)
        if not self._all_done():
            self.loop.after(self.config.timeline_step_s, self._sample)

    def run(self) -> Simulation:
        self._start_replicas()
        for job in self.jobs:
            self.loop.at(job.arrival.t, self._arrive, job)
        for fault in self.config.faults:
            if fault.at_s is not None:
                self.pending_faults.remove(fault)
                self.loop.at(fault.at_s, self._fault, fault)
        self.loop.at(0.0, self._control)
        self.loop.at(0.0, self._sample)
        self.loop.run(self.config.max_time_s, self._all_done)
        end = self.loop.now
        for device in self.devices:
            device.advance(end)
        self._sample()
        return self
