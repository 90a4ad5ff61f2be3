"""Latency classes (serve/priority.py): the ordering, aging and preemption rules, the load-elastic switch, and
preemption at a step boundary through the app's own stage deployments and drive loop in this process (real
`@serve.batch` queues, a real job store and results directory). A preempted job's final latents equal the
uninterrupted engine's, for the sketch and for the render stage preempted mid-way. A kill of the stage replica while
a preempted job waits is in test_app_faults.py (Ray).
"""

from __future__ import annotations

import threading
import time

import pytest

from serve.calibration import load_calibration
from serve.jobs import state
from serve.jobs.config import JobsConfig
from serve.jobs.store import JobStore
from serve.pipeline.artifacts import LATENTS
from serve.priority import Waiting, elastic_rung, level, order, should_yield
from serve.switch import ladder, make_plan, parse_switch

EXACT = 1e-6
TOY_CALIBRATION = "serve/presets/toy/calibration.json"


# -- the rules --------------------------------------------------------------------------------------------------

def test_a_waiting_class_rises_one_level_per_aging_period_down_to_interactive():
    assert [level("batch", w, 10.0) for w in (0, 9.9, 10, 19.9, 20, 1000)] == [2, 2, 1, 1, 0, 0]
    assert [level("interactive", w, 10.0) for w in (0, 1000)] == [0, 0]


def test_work_is_served_by_level_then_age():
    old_batch, standard, new_interactive = Waiting("batch", 0.0), Waiting("standard", 5.0), Waiting("interactive", 9.0)
    assert order([old_batch, standard, new_interactive], now=10.0, aging_s=60.0) == [new_interactive, standard,
                                                                                     old_batch]
    # after two aging periods the batch job is interactive too, and older: it goes first (no starvation)
    assert order([new_interactive, old_batch], now=130.0, aging_s=60.0) == [old_batch, new_interactive]


def test_a_running_batch_yields_only_to_a_strictly_lower_level():
    batch, interactive = Waiting("batch", 0.0), Waiting("interactive", 5.0)
    assert should_yield([batch], [interactive], now=5.0, aging_s=60.0)
    assert not should_yield([interactive], [Waiting("interactive", 6.0)], now=6.0, aging_s=60.0)
    assert not should_yield([batch], [], now=5.0, aging_s=60.0)
    # a mixed batch counts as its most urgent job; a batch job that waited 2 aging periods is no longer preempted
    assert not should_yield([batch, Waiting("interactive", 1.0)], [interactive], now=5.0, aging_s=60.0)
    assert not should_yield([batch], [interactive], now=121.0, aging_s=60.0)


def test_the_elastic_rung_follows_the_backlog_and_stops_at_the_floor():
    assert [elastic_rung(b, rungs=4, backlog_per_shift=2) for b in (0, 1, 2, 5, 6, 100)] == [0, 0, 1, 2, 3, 3]


def test_elastic_switch_specs_parse_and_their_ladders_run_from_idle_to_floor():
    policy = parse_switch("range:3:6")
    assert policy.elastic and str(policy) == "range:3:6" and parse_switch(str(policy)) == policy
    assert [str(p) for p in ladder(policy)] == ["step:6", "step:5", "step:4", "step:3"]
    calibration = load_calibration(TOY_CALIBRATION)
    rungs = ladder(parse_switch("floor:0.9"), calibration)
    qualities = [calibration.quality_of(str(p)) for p in rungs]
    assert qualities == sorted(qualities, reverse=True) and min(qualities) >= 0.9
    assert str(rungs[-1]) == calibration.schedule_for(0.9).switch  # the floor is what quality:0.9 would take
    assert str(rungs[0]) == max(calibration.schedules, key=lambda s: s.quality).switch
    for spec, reason in (("range:5:3", "LO <= HI"), ("range:0:3", "LO <= HI"), ("range:3", "LO:HI"),
                         ("floor:0", "(0, 1]"), ("floor:1.5", "(0, 1]")):
        with pytest.raises(ValueError, match="`switch`"):
            parse_switch(spec)


def test_an_elastic_request_is_planned_at_its_idle_choice_and_fixed_from_the_backlog(tiny_config, make_params):
    from serve.pipeline.registry import PIPELINE
    from serve.pipeline.stage import Planner
    from serve.request import InvalidRequest

    params = make_params(num_inference_steps=8, switch="range:2:6")
    assert make_plan(params).switch_step == 6
    backlog = [0]
    planner = Planner(tiny_config, PIPELINE, backlog=lambda: backlog[0], backlog_per_shift=2)
    assert [(str(p.switch), shift) for p, shift in [planner.fix(params)]] == [("step:6", 0)]
    backlog[0] = 5
    fixed, shift = planner.fix(params)
    assert (str(fixed.switch), shift) == ("step:4", 2) and planner.plan(fixed).switch_step == 4
    backlog[0] = 50
    assert str(planner.fix(params)[0].switch) == "step:2"  # never below the floor
    assert planner.fix(make_params(switch="step:2")) == (make_params(switch="step:2"), 0)
    with pytest.raises(InvalidRequest, match="switch"):
        make_params(num_inference_steps=4, switch="range:2:6")


def test_claims_go_by_class_then_age(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    now = time.time()
    ids = {}
    for name, priority, age in (("old-batch", "batch", 30), ("standard", "standard", 20), ("new-interactive",
                                                                                            "interactive", 10)):
        ids[name] = store.create(state.new_job({"priority": priority, "num_inference_steps": 4}, "tiny",
                                               now=now - age)).id
    claimed = store.claim("w", lease_s=30, limit=2, now=now, aging_s=60.0)
    assert [job.id for job in claimed] == [ids["new-interactive"], ids["standard"]]
    # 130 s later the batch job has waited more than two aging periods: it comes first
    other = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    assert [j.id for j in other.claim("w2", 30, 1, now=now + 130, aging_s=60.0)] == [ids["old-batch"]]


def test_the_sketch_backlog_counts_the_other_jobs_still_to_sketch(tmp_path):
    from serve.jobs.drive import sketch_backlog
    from serve.pipeline.registry import PIPELINE
    from serve.switch import Plan, Segment

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    sketch = PIPELINE.steps(Plan((Segment("sketch", 0, 2, 5.0), Segment("render", 2, 4, 5.0)), 4, 2))[1]
    jobs = [store.create(state.new_job({"num_inference_steps": 4}, "tiny")).id for _ in range(4)]
    assert sketch_backlog(store) == 3  # four still to sketch: the asking one and three others
    store.update(jobs[0], lambda j: state.finish_step(state.start_step(j, sketch, 0.0), sketch, 1.0, steps_done=2))
    store.update(jobs[1], state.request_cancel)
    assert sketch_backlog(store) == 1


def test_the_device_goes_to_the_most_urgent_waiting_batch_not_the_first():
    import asyncio

    from deployments.batching import DeviceTurns

    async def scenario() -> list[str]:
        device, served = DeviceTurns(aging_s=60.0), []
        await device.acquire([Waiting("batch", time.monotonic())])  # a batch computes

        async def wait_turn(name: str, priority: str) -> None:
            await device.acquire([Waiting(priority, time.monotonic())])
            served.append(name)
            device.release()

        waiters = [asyncio.ensure_future(wait_turn("batch", "batch"))]
        await asyncio.sleep(0.01)
        waiters.append(asyncio.ensure_future(wait_turn("interactive", "interactive")))
        await asyncio.sleep(0.01)
        assert device.outranked([Waiting("batch", time.monotonic())])  # the computing batch is asked to yield
        assert not device.outranked([Waiting("interactive", time.monotonic())])
        device.release()
        await asyncio.gather(*waiters)
        return served

    assert asyncio.run(scenario()) == ["interactive", "batch"]


# -- preemption through the stage deployments and the drive loop ---------------------------------------------------

class GatedDenoiser:
    """The stage's denoiser, holding its `hold_at`-th call until `release` is set (so that a higher class arrives
    while a batch is mid-segment, without depending on timing)."""

    def __init__(self, inner, hold_at: int):
        self.inner, self.hold_at, self.calls = inner, hold_at, 0
        self.held, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.hold_at:
            self.held.set()
            self.release.wait(60)
        return self.inner(*args)


@pytest.fixture(scope="module")
def app(tiny_config, tmp_path_factory, loop, in_process_app):
    jobs = JobsConfig(data_dir=str(tmp_path_factory.mktemp("classes")), lease_s=5.0, poll_interval_s=0.02,
                      progress_interval_s=0.02)
    app = in_process_app(tiny_config, jobs, loop)
    app.start()
    yield app
    app.close()


def wait_for(condition, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("stage,deployment", [("sketch", "Sketcher"), ("render", "Renderer")])
def test_a_batch_job_yields_to_an_interactive_one_and_resumes_exactly(app, engine, make_params, rel_err, stage,
                                                                      deployment):
    request = dict(num_inference_steps=8, switch="step:4")
    host = app.deployments[deployment]
    denoiser = host.stages[stage].denoiser
    gate = host.stages[stage].denoiser = GatedDenoiser(denoiser, hold_at=2)  # the batch job, after its 1st step
    try:
        batch_params = make_params(seed=11, priority="batch", **request)
        batch = app.store.create(state.new_job(batch_params.to_dict(), "tiny")).id
        assert gate.held.wait(60)
        interactive = app.store.create(state.new_job(make_params(seed=12, priority="interactive",
                                                                 **request).to_dict(), "tiny")).id
        wait_for(lambda: host._runner._device._waiting)  # the interactive job waits for the device
        gate.release.set()
        wait_for(lambda: app.store.get(batch).terminal and app.store.get(interactive).terminal)
    finally:
        host.stages[stage].denoiser = denoiser
    done, first = app.store.get(batch), app.store.get(interactive)
    assert done.status == first.status == "completed"
    assert done.stages[stage].preemptions == 1 and done.stages[stage].resume_at is None
    assert done.stages[stage].attempts == 1  # a preemption is not a failed attempt
    assert first.stages[stage].end < done.stages[stage].end  # the interactive job went first
    assert done.stages[stage].denoised == ((0, 4) if stage == "sketch" else (4, 8))
    expected = engine.generate(batch_params, decode=False).latents
    assert rel_err(LATENTS.decode(app.results.get(batch, LATENTS.file)), expected) <= EXACT


def test_an_elastic_job_records_the_switch_it_took(app, tiny_config, make_params, loop):
    """The drive loop fixes a load-elastic request's schedule from the backlog before its sketch, records it, and
    the stages run exactly that schedule."""
    import asyncio

    from serve.pipeline.stage import Planner

    planner = Planner(tiny_config, app.pipeline, backlog=lambda: 3, backlog_per_shift=1)
    from serve.jobs.drive import Driver

    real = app.driver("elastic")
    driver = Driver(app.store, planner.steps, real._call, app.jobs, "elastic", fix_switch=planner.fix)
    params = make_params(seed=3, num_inference_steps=6, switch="range:2:5")
    job = state.new_job(params.to_dict(), "tiny")  # leased to this driver, not the module's orchestrator
    job_id = app.store.create(job.model_copy(update={"lease_owner": "elastic",
                                                     "lease_expires_at": time.time() + 60})).id

    async def drive():
        await asyncio.wait_for(driver.drive(job_id), 60)

    loop.run(drive())
    job = app.store.get(job_id)
    assert job.status == "completed", job.error
    assert (job.switch_fixed, job.switch_shift, job.switch_step) == ("step:2", 3, 2)


def test_a_request_takes_its_tokens_default_class_unless_it_names_one(tiny_models, tmp_path):
    """Over HTTP (no drive loop: the jobs stay queued): a token's default class, the server's default for another
    token, an explicit `priority` over either, and a bad one a 422 naming the field."""
    from fastapi.testclient import TestClient

    from deployments.config import AppConfig
    from deployments.ingress import VideoService, make_api

    config = AppConfig.model_validate({
        "engine": {"preset": "tiny"},
        "jobs": {"data_dir": str(tmp_path), "classes": {"default": "standard"}},
        "auth": {"tokens": ["tok-batch", "tok-other"], "tokens_env": None,
                 "token_priorities": [{"token": "tok-batch", "priority": "batch"}]},
    })
    body = {"prompt": "a red ball", "size": "32x32", "num_frames": 5, "num_inference_steps": 2}
    with TestClient(make_api(VideoService(config))) as http:
        def create(token: str, **fields):
            return http.post("/v1/videos", json={**body, **fields}, headers={"Authorization": f"Bearer {token}"})

        assert create("tok-batch").json()["priority"] == "batch"
        assert create("tok-other").json()["priority"] == "standard"
        video = create("tok-batch", priority="interactive").json()
        assert video["priority"] == "interactive" and video["request"]["priority"] == "interactive"
        bad = create("tok-batch", priority="urgent")
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "priority"
        elastic = create("tok-other", switch="range:1:3", num_inference_steps=2)
        assert elastic.status_code == 422 and elastic.json()["error"]["param"] == "switch"


@pytest.mark.parametrize("switch,preempted", [("step:3", True), ("adaptive:0.5:2:3", False)])
def test_only_a_trajectory_whose_state_a_hand_off_holds_yields(engine, make_params, switch, preempted):
    """Asked to yield at its first step boundary, a fixed sketch stops there with a hand-off that continues its own
    segment; an adaptive one (its rule keeps past outputs) runs on to its switch."""
    from serve.denoise import PREEMPT
    from serve.handoff import Handoff
    from serve.pipeline.stage import Task

    params = make_params(switch=switch, num_inference_steps=4)
    encode, sketch = engine.pipeline.steps(engine.plan(params))[:2]
    embeds = engine.stages["encode"].run([Task(params, encode, {})])[0].values
    (out,) = engine.stages["sketch"].run([Task(params, sketch, embeds)], lambda i, done, n: PREEMPT)
    assert out.preempted == preempted
    if preempted:
        (handoff,) = out.values.values()
        assert out.steps_done == 1 and isinstance(handoff, Handoff) and handoff.segment == 0
        assert list(out.values) == [sketch.resume]
    else:
        assert out.steps_done >= 2 and list(out.values) == [sketch.writes[0]]
