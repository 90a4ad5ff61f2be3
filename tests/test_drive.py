"""The drive loop (serve/jobs/drive.py) with the app's own stage deployments (deployments/stage.py), in this process:
no Ray cluster, a real SQLite job store and results directory. What the orchestrator decides is tested here: steps
in order, retry from the same checkpoint, a step that keeps failing, a side step (the preview) that fails, cancel at
a step boundary, and a second driver taking a job over from its checkpoint once the first one's lease expired. The
same deployments on a real Ray, with real kills, are test_app_faults.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.config import Batching, StageConfig
from deployments.stage import StageDeployment
from serve.jobs import state
from serve.jobs.config import JobsConfig
from serve.jobs.drive import Driver
from serve.pipeline.artifacts import LATENTS, PREVIEW, VIDEO
from serve.pipeline.registry import PIPELINE

TOLERANCE = 1e-5
MAX_ATTEMPTS = 3


@pytest.fixture(scope="module")
def app(tiny_config, tmp_path_factory, loop, in_process_app):
    """The stage deployments of the pipeline in this process, drivers over them; a store and results."""
    jobs = JobsConfig(data_dir=str(tmp_path_factory.mktemp("drive")), lease_s=1.0, poll_interval_s=0.02,
                      progress_interval_s=0.02, max_attempts=MAX_ATTEMPTS)
    app = in_process_app(tiny_config, jobs, loop)

    def submit(request: dict, make_params) -> str:
        return app.store.create(state.new_job(make_params(**request).to_dict(), "tiny")).id

    def drive(driver: Driver, job_id: str, timeout_s: float = 60.0) -> state.JobRecord:
        """Claim (the job is this driver's from now) and drive it to the end."""
        async def go():
            assert job_id in await driver.claim()
            await asyncio.wait_for(asyncio.gather(*driver._driving.values()), timeout_s)

        loop.run(go())
        return app.store.get(job_id)

    app.submit, app.drive = submit, drive
    yield app
    app.close()


def latents(app, job_id):
    return LATENTS.decode(app.results.get(job_id, LATENTS.file))


@pytest.mark.parametrize("switch", ["step:2", "step:1:3"])
def test_every_step_runs_once_in_order_and_the_job_equals_the_engine(app, engine, make_params, rel_err, switch):
    calls = []

    async def record(step, job_id, params, run):
        calls.append(step.name)
        return await run(step, job_id, params)

    job_id = app.submit({"switch": switch, "seed": 1}, make_params)
    job = app.drive(app.driver(call=record), job_id)
    expected = engine.generate(make_params(switch=switch, seed=1))
    names = [name for name, _, _ in expected.segments]
    assert job.status == "completed" and job.progress == 100 and job.checkpoint == "decode"
    assert [c for c in calls if c != "preview"] == ["encode", *names, "decode"] and calls.count("preview") == 1
    assert [(name, *job.stages[name].denoised) for name in names] == expected.segments
    assert all(record.attempts == 1 for record in job.stages.values()) and job.finished("preview")
    assert rel_err(latents(app, job_id), expected.latents) <= TOLERANCE
    assert app.results.exists(job_id, VIDEO.file) and app.results.exists(job_id, PREVIEW.file)


def test_a_failed_attempt_runs_the_same_step_again_from_its_checkpoint(app, engine, make_params, rel_err):
    calls = []

    async def render_fails_once(step, job_id, params, run):
        calls.append(step.name)
        if step.name == "render" and calls.count("render") == 1:
            raise RuntimeError("the renderer's replica died\nTraceback ...")
        return await run(step, job_id, params)

    job_id = app.submit({"seed": 2}, make_params)
    job = app.drive(app.driver(call=render_fails_once), job_id)
    assert job.status == "completed" and calls.count("sketch") == 1 and calls.count("render") == 2
    assert job.stages["render"].attempts == 2 and job.stages["sketch"].attempts == 1
    assert job.stages["render"].error == "RuntimeError: the renderer's replica died"
    assert rel_err(latents(app, job_id), engine.generate(make_params(seed=2), decode=False).latents) <= TOLERANCE


def test_a_step_that_keeps_failing_fails_the_job_naming_it(app, make_params):
    async def decode_fails(step, job_id, params, run):
        if step.name == "decode":
            raise OSError("disk full")
        return await run(step, job_id, params)

    job = app.drive(app.driver(call=decode_fails), app.submit({"seed": 3}, make_params))
    assert job.status == "failed" and job.failed_stage == "decode" and job.stages["decode"].attempts == MAX_ATTEMPTS
    assert job.error.code == "stage_failed"
    assert job.error.message == f"decode failed after {MAX_ATTEMPTS} attempt(s): OSError: disk full"


def test_a_failing_preview_leaves_the_job_without_one_and_nothing_else(app, make_params):
    async def no_preview(step, job_id, params, run):
        if step.name == "preview":
            raise RuntimeError("no VAE today")
        return await run(step, job_id, params)

    job_id = app.submit({"seed": 4}, make_params)
    job = app.drive(app.driver(call=no_preview), job_id)
    assert job.status == "completed" and not job.finished("preview")
    assert job.stages["preview"].error == "RuntimeError: no VAE today" and job.stages["preview"].attempts == 1
    assert not app.results.exists(job_id, PREVIEW.file)


def test_a_cancel_stops_the_job_at_a_step_boundary(app, make_params, loop):
    """The stage reads the cancel flag off the denoising thread and stops at the next step; the job ends cancelled
    at that step, with no later step run."""
    calls = []

    async def record(step, job_id, params, run):
        calls.append(step.name)
        return await run(step, job_id, params)

    job_id = app.submit({"seed": 5, "num_inference_steps": 100, "switch": "step:99", "height": 64, "width": 64,
                         "num_frames": 17}, make_params)
    driver = app.driver(call=record)

    async def cancel_while_sketching():
        await driver.claim()
        while app.store.get(job_id).steps_done < 2:
            await asyncio.sleep(0.01)
        app.store.update(job_id, state.request_cancel)
        await asyncio.wait_for(asyncio.gather(*driver._driving.values()), 60)

    loop.run(cancel_while_sketching())
    job = app.store.get(job_id)
    assert job.status == "cancelled" and job.error.code == "cancelled"
    assert 2 <= job.cancelled_at_step == job.steps_done < 99
    assert calls == ["encode", "sketch"] and job.switch_step is None


def test_another_driver_takes_a_job_over_from_its_checkpoint_once_the_lease_expires(app, engine, make_params,
                                                                                     rel_err, loop):
    """Driver A sketches, then stops renewing (its process died while rendering). B cannot claim the job while A's
    lease holds; once it expires B resumes at the render step: the sketch is not run again."""
    calls = {"a": [], "b": []}

    def recorder(name, hang_at=None):
        async def call(step, job_id, params, run):
            calls[name].append(step.name)
            if step.name == hang_at:
                await asyncio.Event().wait()  # the replica holding it died: no answer ever
            return await run(step, job_id, params)

        return call

    job_id = app.submit({"seed": 6, "switch": "step:3"}, make_params)
    a, b = app.driver("driver-a", recorder("a", hang_at="render")), app.driver("driver-b", recorder("b"))

    async def a_dies_while_rendering():
        assert await a.claim() == [job_id]
        while app.store.get(job_id).stage != "render":
            await asyncio.sleep(0.01)
        assert await b.claim() == []  # A's lease holds
        for task in a._driving.values():
            task.cancel()  # A's process is gone: no more steps, no more renewals

    loop.run(a_dies_while_rendering())
    held = app.store.get(job_id)
    assert held.lease_owner == "driver-a" and held.checkpoint == "sketch"
    time.sleep(max(0.0, held.lease_expires_at - time.time()) + 0.05)
    job = app.drive(b, job_id)
    assert job.status == "completed" and job.lease_owner == "driver-b"
    assert calls["a"][:2] == ["encode", "sketch"]
    assert [c for c in calls["b"] if c != "preview"] == ["render", "decode"] and job.finished("preview")
    assert job.stages["sketch"].attempts == 1 and job.stages["render"].attempts == 2
    expected = engine.generate(make_params(seed=6, switch="step:3"), decode=False).latents
    assert rel_err(latents(app, job_id), expected) <= TOLERANCE


def test_a_missing_input_fails_only_its_own_job_in_a_batch(app, engine, tiny_config, make_params, rel_err, loop):
    """Two jobs in one render batch, one without its hand-off: that job's call raises MissingArtifact (naming the
    job and the file), the other is rendered and stored."""
    from deployments.stage import MissingArtifact
    from serve.pipeline.artifacts import HANDOFF

    params = make_params(seed=7, switch="step:2")
    (embeds,) = engine.stages["encode"]([params])
    (handoff,) = engine.stages["sketch"]([(params, embeds)])
    with_input, without = app.submit({"seed": 7, "switch": "step:2"}, make_params), app.submit({"seed": 8}, make_params)
    app.results.put(with_input, HANDOFF.file, HANDOFF.encode(handoff))
    render = next(step for step in PIPELINE.steps(engine.plan(params)) if step.name == "render")

    async def both():
        renderer = StageDeployment("Renderer", tiny_config, StageConfig(batching=Batching(batch_wait_timeout_s=1.0)),
                                   app.jobs)
        calls = [asyncio.ensure_future(renderer.run(render, job_id, params)) for job_id in (with_input, without)]
        with pytest.raises(MissingArtifact, match=f"video job {without} has no handoff.safetensors"):
            await calls[1]
        return await calls[0]

    done = loop.run(both())
    assert done.batch_size == 2 and done.steps_done == params.num_inference_steps  # one batch of both
    expected = engine.generate(params, decode=False).latents
    assert rel_err(latents(app, with_input), expected) <= TOLERANCE and not app.results.exists(without, LATENTS.file)
