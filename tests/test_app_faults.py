"""Faults and restarts of the Serve app, for real, on the session's local Ray.

The app is deployed once per job-store backend: the embedded SQLite store (a file in a tmp `jobs.data_dir`) runs
every test; PostgreSQL (`jobs.store_url`, a table of its own per run, dropped afterwards; results still under a tmp
data_dir; a database that does not answer fails the tests) runs the orchestrator kill (see BOTH and SQLITE below).

For each of Encoder, Sketcher, Renderer, Decoder, Orchestrator, Ingress and the HTTP proxy, a job is caught in the
stage that deployment serves and the deployment's replica actor is killed (`ray.kill`, no restart: Serve replaces
it). The job still completes, with final latents equal to the in-process engine's (rel err <= 1e-5); the killed
stage shows a second attempt, and a stage after the hand-off never re-runs the sketch. A stage that keeps failing
fails the job after `jobs.max_attempts` with one line naming the stage. Deleting the app while a job renders and
deploying it again on the same data dir / store keeps every finished job (listed, same bytes) and finishes the
running one from its hand-off checkpoint. A batch-class job preempted by an interactive one survives the death of
the Sketcher while it waits, and resumes exactly from its mid-segment checkpoint.

How a kill is made to land inside a stage, without timing luck:
- encode and decode: their batches wait `WINDOW_S` for more requests, so a call sits in the replica that long;
  the kill comes once the stage started `KILL_AFTER_S` ago.
- sketch and render: a 100-step job (2.5 to 10 ms a step on 2 cores, idle or busy); the kill comes once the stage
  reported steps. Should the stage still finish first, the kill missed: the scenario runs again with a new job (at
  most `TRIES` times), so the assertions always hold for a job whose stage was really hit.
- the restart: its render must outlast `serve.delete`, so its step count is scaled from this machine's measured step
  time (`restart_render_job`).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import ray
from ray import serve

TOLERANCE = 1e-5
APP = "srd-faults"
POSTGRES_URL = os.environ.get("SRD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
LEASE_S = 4.0
MAX_ATTEMPTS = 3
WINDOW_S = 1.5  # encode and decode batches wait this long for company: the kill window of those stages
KILL_AFTER_S = 0.3  # ... and the kill comes this long after the stage started (its call reached the replica)
BACK_S = 120.0  # bound on waiting for Serve to replace a replica (and on a client retrying meanwhile)
JOB_S = 240.0  # bound on one job's completion after a fault
TRIES = 3
SHORT = {"prompt": "a short clip", "seed": 1, "height": 64, "width": 64, "num_frames": 17,
         "num_inference_steps": 6, "switch": "step:3"}


def long_job(switch: str, seed: int) -> dict:
    """100 steps (64x64, 17 frames): a second or more of sketching or rendering, per `switch`."""
    return {"prompt": f"a long clip {switch}", "seed": seed, "height": 64, "width": 64, "num_frames": 17,
            "num_inference_steps": 100, "switch": switch}


SKETCH_LONG = long_job("step:90", 21)
RENDER_LONG = long_job("step:5", 22)
THIRD_LONG = long_job("step:3:6", 23)  # large for steps 0-2, small for 3-5, large again for 6-99
RESTART_RENDER_S = 3.0  # the restart's serve.delete (graceful shutdowns of up to 0.5 s) must end inside the render

FAST_FAULTS = {"health_check_period_s": 1.0, "health_check_timeout_s": 10.0, "graceful_shutdown_timeout_s": 0.5,
               "graceful_shutdown_wait_loop_s": 0.25}
STAGE = {"resources": {"num_cpus": 0.5}, "serve_options": FAST_FAULTS}
WAITING_BATCH = {"max_batch_size": 4, "batch_wait_timeout_s": WINDOW_S}


def app_config(jobs: dict) -> dict:
    return {
        "engine": {"preset": "tiny"},
        "encoder": {**STAGE, "batching": WAITING_BATCH},
        "sketcher": {**STAGE, "batching": {"max_batch_size": 2, "batch_wait_timeout_s": 0.0}},
        "renderer": {**STAGE, "batching": {"max_batch_size": 2, "batch_wait_timeout_s": 0.0}},
        "decoder": {**STAGE, "batching": WAITING_BATCH},
        "orchestrator": {"serve_options": FAST_FAULTS},
        "ingress": {"serve_options": FAST_FAULTS},
        "jobs": {**jobs, "lease_s": LEASE_S, "max_attempts": MAX_ATTEMPTS, "poll_interval_s": 0.2},
        "limits": {"max_steps": 20_000},  # restart_render_job's steps (the tiny preset accepts 100)
    }


def postgres_reachable() -> str | None:
    """None if the test database answers, else why not."""
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(POSTGRES_URL)
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
        engine.dispose()
        return None
    except Exception as e:  # noqa: BLE001 - any reason means: no PostgreSQL here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# PostgreSQL runs what depends on the store's own protocol across processes: the orchestrator's takeover (its lease,
# a compare-and-set on the record, claimed by another replica once it expires). The stage kills, the stage that keeps
# failing and the restart read and write the store through the same calls, so they run on SQLite only, to keep the
# module's run time down; the retry logic itself, and both backends' compare-and-set and records across
# connections, are tested without Ray (test_drive.py, test_job_store.py).
BOTH = pytest.mark.parametrize("app", ["sqlite", "postgres"], indirect=True)
SQLITE = pytest.mark.parametrize("app", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def app(request, serve_http, tiny_models, tmp_path_factory):
    """The app on one job-store backend (the test's indirect parameter), its HTTP client, config and data dir, and
    `deploy()` to deploy it again (the restart test deletes it). Deleted after the module's tests of that backend; a
    PostgreSQL table is dropped."""
    from deployments.app import build_app
    from deployments.config import AppConfig
    from serve.jobs.store import JobStore

    backend = request.param
    data_dir = tmp_path_factory.mktemp(f"srd-faults-{backend}")
    jobs = {"data_dir": str(data_dir)}
    if backend == "postgres":
        problem = postgres_reachable()
        assert not problem, f"no PostgreSQL at {POSTGRES_URL}: {problem}"  # a server path is tested, never skipped
        jobs.update(store_url=POSTGRES_URL, store_table=f"srd_faults_{uuid.uuid4().hex[:12]}")
    config = AppConfig.model_validate(app_config(jobs))

    def deploy():
        return serve.run(build_app(config), name=APP, route_prefix="/")

    deploy()
    try:
        with httpx.Client(base_url=serve_http, timeout=60) as http:
            yield SimpleNamespace(backend=backend, config=config, deploy=deploy, http=http, data_dir=data_dir,
                                  store=JobStore(config.jobs.store, config.jobs.store_table))
    finally:
        serve.delete(APP)
        if backend == "postgres":
            JobStore(config.jobs.store, config.jobs.store_table).drop()


def reference_latents(engine, request: dict):
    """The in-process engine's final latents for the same request (as tests/test_app.py computes them)."""
    from serve.request import VideoRequest

    return engine.generate(VideoRequest(**request).resolve(engine.config.defaults), decode=False).latents


def latents_over_http(http, job_id: str):
    import io

    import torch

    response = get(http, f"/v1/videos/{job_id}/latents")
    assert response.status_code == 200, response.text
    return torch.from_numpy(np.load(io.BytesIO(response.content)))


@pytest.fixture(scope="module")
def reference(engine):
    """reference(request) -> the in-process engine's final latents, computed once per request."""
    cache: dict[str, object] = {}

    def get(request: dict):
        key = repr(sorted(request.items()))
        if key not in cache:
            cache[key] = reference_latents(engine, request)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def restart_render_job(engine) -> dict:
    """A job whose render lasts about RESTART_RENDER_S on this machine, however fast it is: its step count is scaled
    from a timed 40-step run of the same shape in-process (a replica steps at about the same speed)."""
    probe = {**long_job("step:1", 23), "num_inference_steps": 40}
    start = time.perf_counter()
    reference_latents(engine, probe)
    per_step = (time.perf_counter() - start) / 40
    return {**long_job("step:5", 23), "num_inference_steps": max(100, math.ceil(RESTART_RENDER_S / per_step))}


# -- a client that rides out a replaced ingress or proxy --------------------------------------------------------

def get(http, path: str, timeout_s: float = BACK_S) -> httpx.Response:
    """GET, retried while the proxy or the ingress is away (connection errors, 5xx), for at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = http.get(path)
            if response.status_code < 500:
                return response
            why = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as e:
            why = f"{type(e).__name__}: {e}"
        assert time.monotonic() < deadline, f"GET {path} kept failing for {timeout_s} s: {why}"
        time.sleep(0.2)


def submit(http, request: dict) -> str:
    response = http.post("/v1/videos", json=request)  # not retried: a lost answer could mean a second job
    assert response.status_code == 200, response.text
    return response.json()["id"]


def wait_for(http, job_id: str, until=lambda job: job["status"] in ("completed", "failed"),
             timeout_s: float = JOB_S) -> dict:
    """Poll a job (riding out a replaced ingress or proxy) until `until(record)`; returns that record."""
    deadline = time.monotonic() + timeout_s
    job = None
    while time.monotonic() < deadline:
        response = get(http, f"/v1/videos/{job_id}", timeout_s=max(deadline - time.monotonic(), 1.0))
        assert response.status_code == 200, response.text
        job = response.json()
        if until(job):
            return job
        time.sleep(0.1)  # a poll costs the app CPU that the job needs
    raise AssertionError(f"job {job_id} never got there in {timeout_s} s; last record: {job}")


def wait_healthy(http, timeout_s: float = BACK_S) -> None:
    """Until /healthz answers 200: the proxy routes, the ingress answers, every deployment is running."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the app was not healthy again within {timeout_s} s"
        time.sleep(0.2)


# -- killing ----------------------------------------------------------------------------------------------------

def actor_names(prefix: str) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def kill(target: str) -> tuple[str, str]:
    """Kill the one replica of deployment `target` of this app (or the HTTP proxy, target "proxy"), without
    restart: Serve must replace it. Returns the killed actor's name and id."""
    prefix = "SERVE_PROXY_ACTOR" if target == "proxy" else f"SERVE_REPLICA::{APP}#{target}#"
    (actor,) = actor_names(prefix)
    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
    ray.kill(handle, no_restart=True)
    return actor["name"], handle._actor_id.hex()


def replaced(killed: tuple[str, str]) -> bool:
    """The killed actor is gone: no actor has its name any more (a replica's replacement gets a new name), or one
    with a new id does (Serve restarts a node's proxy under the same name)."""
    name, actor_id = killed
    for actor in actor_names(name):
        if actor["name"] == name and ray.get_actor(name, namespace=actor["namespace"])._actor_id.hex() == actor_id:
            return False
    return True


def in_stage(stage: str, min_steps: int | None = None):
    """`until` for wait_for: the job is in `stage`, and its call is surely in the replica: a denoiser reported
    more than `min_steps` steps; a batching stage started KILL_AFTER_S ago. True also once the job is finished
    (the kill missed: the stage was too quick)."""
    def until(job: dict) -> bool:
        if job["status"] in ("completed", "failed"):
            return True
        if job["stage"] != stage:
            return False
        if min_steps is not None:
            return job["steps_done"] > min_steps
        return time.time() - job["stages"][stage]["start"] >= KILL_AFTER_S

    return until


def killed_mid_stage(app, target: str, stage: str, request: dict, min_steps: int | None = None) -> dict:
    """Submit `request`, kill `target`'s replica while the job is in `stage`, wait for the job to finish; returns
    its record. Retried with a new job (at most TRIES times) when the stage finished before the kill hit it."""
    for _ in range(TRIES):
        job_id = submit(app.http, request)
        job = wait_for(app.http, job_id, until=in_stage(stage, min_steps))
        if job["status"] in ("completed", "failed"):
            continue
        killed = kill(target)
        job = wait_for(app.http, job_id)
        assert job["status"] == "completed", job
        assert replaced(killed)
        if job["stages"][stage]["attempts"] >= 2:
            return job
    raise AssertionError(f"in {TRIES} tries no kill of {target} landed inside the {stage} stage")


def assert_reference(app, job: dict, request: dict, reference, rel_err) -> None:
    assert job["status"] == "completed", job
    assert rel_err(latents_over_http(app.http, job["id"]), reference(request)) <= TOLERANCE
    content = get(app.http, f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"


# -- must-show 1: kill each deployment mid-job ------------------------------------------------------------------

@SQLITE
def test_encoder_killed_mid_encode(app, reference, rel_err):
    job = killed_mid_stage(app, "Encoder", "encode", SHORT)
    assert_reference(app, job, SHORT, reference, rel_err)
    assert job["stages"]["encode"]["attempts"] >= 2 and job["stages"]["encode"]["error"]
    assert all(job["stages"][s]["attempts"] == 1 for s in ("sketch", "render", "decode"))


@SQLITE
def test_sketcher_killed_mid_sketch(app, reference, rel_err):
    job = killed_mid_stage(app, "Sketcher", "sketch", SKETCH_LONG, min_steps=0)
    assert_reference(app, job, SKETCH_LONG, reference, rel_err)
    assert job["stages"]["sketch"]["attempts"] >= 2 and job["stages"]["sketch"]["error"]
    assert job["stages"]["encode"]["attempts"] == 1 and job["switch_step"] == 90


@SQLITE
def test_renderer_killed_mid_render_keeps_the_sketch(app, reference, rel_err):
    job = killed_mid_stage(app, "Renderer", "render", RENDER_LONG, min_steps=5)
    assert_reference(app, job, RENDER_LONG, reference, rel_err)
    assert job["stages"]["render"]["attempts"] >= 2 and job["stages"]["render"]["error"]
    assert job["stages"]["sketch"]["attempts"] == 1  # resumed from the hand-off checkpoint, not re-sketched


@SQLITE
def test_sketcher_killed_in_the_third_segment_keeps_the_first_two(app, reference, rel_err):
    """A three-segment plan: the Sketcher's replica dies while it runs the third segment (the large model again);
    the job resumes from the second hand-off, so neither earlier segment runs again."""
    job = killed_mid_stage(app, "Sketcher", "sketch.2", THIRD_LONG, min_steps=10)
    assert_reference(app, job, THIRD_LONG, reference, rel_err)
    assert job["stages"]["sketch.2"]["attempts"] >= 2 and job["stages"]["sketch.2"]["error"]
    assert job["stages"]["sketch"]["attempts"] == 1 and job["stages"]["render"]["attempts"] == 1
    assert [(s["stage"], s["start"], s["stop"]) for s in job["segments"]] == [
        ("sketch", 0, 3), ("render", 3, 6), ("sketch.2", 6, 100)]


@SQLITE
def test_a_preempted_job_resumes_exactly_after_its_stage_replica_is_killed(app, reference, rel_err):
    """Latency classes (serve/priority.py): a batch-class job is sketching when an interactive one arrives; the
    Sketcher preempts it at a step boundary (its trajectory stored as the step's `resume` checkpoint) and, while it
    waits in its queue, the Sketcher's replica is killed. Both jobs complete; the preempted one resumes from its
    checkpoint on the new replica, with the uninterrupted run's final latents (rel err <= 1e-6)."""
    batch = {**long_job("step:396", 31), "num_inference_steps": 400, "priority": "batch"}  # seconds of sketching
    interactive = {**batch, "seed": 32, "priority": "interactive"}
    batch_id = submit(app.http, batch)
    wait_for(app.http, batch_id, until=in_stage("sketch", min_steps=2))
    interactive_id = submit(app.http, interactive)
    preempted = wait_for(app.http, batch_id, until=lambda j: j["stages"]["sketch"]["preemptions"] >= 1)
    assert preempted["stages"]["sketch"]["resume_at"] >= 3 and preempted["status"] == "in_progress"
    assert get(app.http, f"/v1/videos/{interactive_id}").json()["stage"] in ("encode", "sketch")

    killed = kill("Sketcher")
    jobs = {job_id: wait_for(app.http, job_id) for job_id in (batch_id, interactive_id)}
    assert replaced(killed)
    assert jobs[interactive_id]["status"] == "completed", jobs[interactive_id]
    assert_reference(app, jobs[batch_id], batch, reference, rel_err)
    assert rel_err(latents_over_http(app.http, batch_id), reference(batch)) <= 1e-6
    sketch = jobs[batch_id]["stages"]["sketch"]
    assert sketch["attempts"] == 2 and sketch["resume_at"] is None  # the killed call, then the resumed one
    assert jobs[batch_id]["priority"] == "batch" and jobs[batch_id]["switch_step"] == 396


@SQLITE
def test_decoder_killed_mid_decode_keeps_sketch_and_render(app, reference, rel_err):
    job = killed_mid_stage(app, "Decoder", "decode", SHORT)
    assert_reference(app, job, SHORT, reference, rel_err)
    assert job["stages"]["decode"]["attempts"] >= 2 and job["stages"]["decode"]["error"]
    assert job["stages"]["sketch"]["attempts"] == 1 and job["stages"]["render"]["attempts"] == 1


@BOTH
def test_orchestrator_killed_mid_job_another_takes_over(app, reference, rel_err):
    """The orchestrator holds no state: once its lease lapses, its replacement claims the job and resumes it (the
    sketch call still running in the Sketcher is joined, not computed twice)."""
    job_id = submit(app.http, SKETCH_LONG)
    wait_for(app.http, job_id, until=in_stage("sketch", min_steps=0))
    holder = app.store.get(job_id).lease_owner
    assert holder and holder.startswith("orchestrator-")
    kill("Orchestrator")
    job = wait_for(app.http, job_id)
    assert_reference(app, job, SKETCH_LONG, reference, rel_err)
    assert app.store.get(job_id).lease_owner not in (None, holder)  # another replica finished it
    assert all(s["attempts"] <= MAX_ATTEMPTS for s in job["stages"].values())


@SQLITE
@pytest.mark.parametrize("target", ["Ingress", "proxy"])
def test_front_door_killed_mid_job(app, reference, rel_err, target):
    """The ingress replica, or Serve's HTTP proxy, dies while a job runs: the client retries until Serve replaced
    it (bounded); the finished job and the running one are both there, the running one completes."""
    finished = submit(app.http, SHORT)
    assert wait_for(app.http, finished)["status"] == "completed"
    video = get(app.http, f"/v1/videos/{finished}/content").content
    running = submit(app.http, SKETCH_LONG)
    wait_for(app.http, running, until=in_stage("sketch", min_steps=0))

    killed = kill(target)
    wait_healthy(app.http)
    assert replaced(killed)

    assert get(app.http, f"/v1/videos/{finished}").json()["status"] == "completed"
    assert get(app.http, f"/v1/videos/{finished}/content").content == video
    job = wait_for(app.http, running)
    assert_reference(app, job, SKETCH_LONG, reference, rel_err)
    assert job["stages"]["sketch"]["attempts"] == 1  # the stages never noticed


@SQLITE
def test_a_stage_that_keeps_failing_fails_the_job_naming_it(app):
    """The Renderer is killed mid-render (attempt 1) after the job's hand-off checkpoint was deleted from the
    results dir, so attempts 2 and 3 fail for real (no checkpoint to render from): after `max_attempts` the job
    fails with `failed_stage` render, error code stage_failed and one line naming the stage and the cause."""
    for _ in range(TRIES):
        job_id = submit(app.http, RENDER_LONG)
        job = wait_for(app.http, job_id, until=in_stage("render", min_steps=5))
        if job["status"] != "in_progress":
            continue
        (app.data_dir / "results" / job_id / "handoff.safetensors").unlink()
        kill("Renderer")
        job = wait_for(app.http, job_id)
        if job["status"] == "completed" and job["stages"]["render"]["attempts"] == 1:
            continue  # the render had finished before the kill: no fault was made
        break
    else:
        raise AssertionError(f"in {TRIES} tries no kill of the Renderer landed inside the render stage")
    assert job["status"] == "failed" and job["failed_stage"] == "render", job
    assert job["error"]["code"] == "stage_failed"
    message = job["error"]["message"]
    assert "\n" not in message and message.startswith(f"render failed after {MAX_ATTEMPTS} attempt(s): ")
    assert "handoff" in message, message  # the cause: the missing hand-off checkpoint
    assert job["stages"]["render"]["attempts"] == MAX_ATTEMPTS and job["stages"]["sketch"]["attempts"] == 1
    assert "decode" not in job["stages"] and job["stage"] is None
    assert get(app.http, f"/v1/videos/{job_id}/content").status_code == 409
    wait_healthy(app.http)  # the app serves on


# -- must-show 2: delete the app mid-job, deploy it again on the same data --------------------------------------

@SQLITE
def test_restart_keeps_finished_jobs_and_resumes_the_running_one(app, reference, rel_err, restart_render_job):
    finished = submit(app.http, SHORT)
    assert wait_for(app.http, finished)["status"] == "completed"
    before = {name: get(app.http, f"/v1/videos/{finished}/content?variant={name}").content
              for name in ("video", "thumbnail")}
    running = submit(app.http, restart_render_job)
    job = wait_for(app.http, running, until=in_stage("render", min_steps=5))
    assert job["status"] == "in_progress", "the render finished before the restart"

    serve.delete(APP)
    assert APP not in serve.status().applications
    assert not app.store.get(running).terminal  # nothing drives it now; the store keeps it
    app.deploy()  # the same config: same data dir, same store and table

    listed = get(app.http, "/v1/videos?limit=100").json()["data"]
    assert {finished, running} <= {v["id"] for v in listed}
    assert next(v for v in listed if v["id"] == finished)["status"] == "completed"
    for name, content in before.items():
        assert get(app.http, f"/v1/videos/{finished}/content?variant={name}").content == content
    job = wait_for(app.http, running)
    assert_reference(app, job, restart_render_job, reference, rel_err)
    assert job["stages"]["sketch"]["attempts"] == 1  # resumed from the hand-off checkpoint
