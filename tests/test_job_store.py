"""The job state machine (serve/jobs/state.py) and the job store (serve/jobs/store.py) on both real backends: an
SQLite file and the PostgreSQL server on loopback (each test in its own table, dropped afterwards)."""

from __future__ import annotations

import multiprocessing
import time
import uuid

import pytest

from serve.jobs import state as jobs
from serve.jobs.store import JobStore
from serve.models import PRESETS
from serve.pipeline.registry import PIPELINE
from serve.request import VideoRequest
from serve.switch import make_plan

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REQUEST = {"prompt": "a red circle", "num_inference_steps": 10}


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return POSTGRES_URL


@pytest.fixture
def store(store_url):
    table = f"test_jobs_{uuid.uuid4().hex[:12]}"
    s = JobStore(store_url, table=table)
    yield s
    s.drop()
    s.close()


def test_postgres_is_reachable():
    """The server backend is tested for real: a missing server fails the suite instead of skipping it."""
    store = JobStore(POSTGRES_URL, table=f"test_jobs_{uuid.uuid4().hex[:12]}")
    try:
        assert store.count_unfinished() == 0
    finally:
        store.drop()
        store.close()


# -- state machine --------------------------------------------------------------------------------------------


def job_steps(switch: str):
    """The pipeline's steps for a 10-step request with this switch (serve/pipeline/stage.py)."""
    params = VideoRequest(prompt="a red circle", num_inference_steps=10, switch=switch).resolve(
        PRESETS["tiny"].defaults)
    return PIPELINE.steps(make_plan(params))


def named(steps, name):
    return next(step for step in steps if step.name == name)


@pytest.mark.parametrize(("switch", "segments"), [
    ("step:3", {"sketch": (0, 3), "render": (3, 10)}),
    ("step:3:8", {"sketch": (0, 3), "render": (3, 8), "sketch.2": (8, 10)}),
])
def test_steps_in_order_then_complete(switch, segments):
    steps = job_steps(switch)
    main = [step for step in steps if step.phase != "side"]
    assert [step.name for step in main] == ["encode", *segments, "decode"]
    job = jobs.new_job(REQUEST, "toy")
    assert job.next_step(steps).name == "encode" and job.status == "queued"
    for step in main:
        assert job.next_step(steps) == step
        job = jobs.start_step(job, step, time.time())
        assert job.status == "in_progress" and job.stage == step.name
        job = jobs.finish_step(job, step, time.time(), steps_done=segments.get(step.name, (0, None))[1])
        assert job.checkpoint == step.name
        if step.name == "sketch":
            assert job.switch_step == 3 and job.progress == jobs.progress_after_steps(3, 10)
    assert job.next_step(steps) is None and job.switch_step == 3 and job.steps_done == 10
    assert {name: record.denoised for name, record in job.stages.items() if record.denoised} == segments
    job = jobs.complete(job)
    assert job.status == "completed" and job.progress == 100 and job.completed_at is not None
    with pytest.raises(jobs.InvalidTransition):
        jobs.cancelled(job, 3)


def test_a_side_step_is_recorded_but_moves_no_checkpoint_and_fails_nothing():
    steps = job_steps("step:3")
    preview = named(steps, "preview")
    assert preview.phase == "side" and steps[steps.index(preview) - 1].name == "sketch"  # right after its input
    job = jobs.start_step(jobs.new_job(REQUEST, "toy"), named(steps, "render"), 1.0)
    for _ in range(5):
        job = jobs.fail_attempt(jobs.start_step(job, preview, 2.0), preview, "OSError: disk full", 3)
    assert job.status == "in_progress" and job.stage == "render" and job.stages["preview"].attempts == 5
    job = jobs.finish_step(jobs.start_step(job, preview, 3.0), preview, 4.0)
    assert job.finished("preview") and job.checkpoint is None and job.stage == "render"


def test_progress_never_decreases():
    job = jobs.start_step(jobs.new_job(REQUEST, "toy"), named(job_steps("step:3"), "sketch"), time.time())
    job = jobs.with_progress(job, 6)
    assert job.progress == jobs.progress_after_steps(6, 10) and job.steps_done == 6
    retried = jobs.with_progress(job, 1)  # a retried step counts its steps again
    assert retried.progress == job.progress and retried.steps_done == 1


def test_attempts_are_bounded_and_name_the_step():
    steps = job_steps("step:3")
    job = jobs.new_job(REQUEST, "toy")
    for name, done in (("encode", None), ("sketch", 3)):
        job = jobs.finish_step(jobs.start_step(job, named(steps, name), 0.0), named(steps, name), 1.0, steps_done=done)
    render = named(steps, "render")
    for attempt in (1, 2):
        job = jobs.fail_attempt(jobs.start_step(job, render, 2.0), render, "ActorDiedError: killed", 3)
        assert job.status == "in_progress" and job.stages["render"].attempts == attempt
        assert job.next_step(steps) == render  # resumes from the sketch checkpoint
    job = jobs.fail_attempt(jobs.start_step(job, render, 3.0), render, "ActorDiedError: killed", 3)
    assert job.status == "failed" and job.failed_stage == "render" and job.error.code == "stage_failed"
    assert job.error.message == "render failed after 3 attempt(s): ActorDiedError: killed"


def test_cancel_queued_at_once_running_at_a_step():
    queued = jobs.request_cancel(jobs.new_job(REQUEST, "toy"))
    assert queued.status == "cancelled" and queued.cancelled_at_step == 0
    sketch = named(job_steps("step:3"), "sketch")
    running = jobs.request_cancel(jobs.start_step(jobs.new_job(REQUEST, "toy"), sketch, 0.0))
    assert running.status == "in_progress" and running.cancel_requested
    done = jobs.cancelled(running, 4)
    assert done.status == "cancelled" and done.cancelled_at_step == done.steps_done == 4
    assert done.error.code == "cancelled"


# -- store ----------------------------------------------------------------------------------------------------


def test_create_get_update_delete(store):
    job = store.create(jobs.new_job(REQUEST, "toy"))
    assert store.get(job.id) == job
    updated = store.update(job.id, lambda j: jobs.start_step(j, named(job_steps("step:3"), "encode"), 1.0))
    assert updated.version == job.version + 1 and store.get(job.id) == updated
    assert store.update(job.id, lambda j: None) == updated  # no change, no new version
    assert store.count_unfinished() == 1
    assert store.delete(job.id) and store.get(job.id) is None and not store.delete(job.id)
    assert store.update("video_missing", lambda j: j) is None


def _increment(url: str, table: str, job_id: str, times: int) -> None:
    store = JobStore(url, table=table)
    for _ in range(times):
        store.update(job_id, lambda j: j.model_copy(update={"steps_done": j.steps_done + 1}))
    store.close()


def test_concurrent_updates_from_processes_lose_nothing(store):
    """Four processes increment one field 25 times each through compare-and-set: all 100 increments land."""
    job = store.create(jobs.new_job(REQUEST, "toy"))
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_increment, args=(store.url, store._jobs.name, job.id, 25)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    final = store.get(job.id)
    assert final.steps_done == 100 and final.version == 100


def test_claim_is_exclusive_until_the_lease_expires(store):
    first = store.create(jobs.new_job(REQUEST, "toy", now=1.0))
    second = store.create(jobs.new_job(REQUEST, "toy", now=2.0))
    now = time.time()
    assert [j.id for j in store.claim("a", lease_s=60, limit=1, now=now)] == [first.id]
    assert [j.id for j in store.claim("b", lease_s=60, limit=5, now=now)] == [second.id]  # a's job is leased
    assert store.claim("c", lease_s=60, limit=5, now=now) == []
    assert store.renew(first.id, "a", 60) and not store.renew(first.id, "b", 60)
    # a dies: once its lease has expired, another worker takes its job over, and a can no longer renew it
    taken = store.claim("c", lease_s=60, limit=5, now=now + 3600)
    assert {j.id for j in taken} == {first.id, second.id} and all(j.lease_owner == "c" for j in taken)
    assert not store.renew(first.id, "a", 60)
    store.update(first.id, lambda j: jobs.request_cancel(j))  # still queued: cancelled at once
    assert [j.id for j in store.claim("d", lease_s=60, limit=5, now=now + 7200)] == [second.id]


def test_list_pages_by_creation_time_and_owner(store):
    created = [store.create(jobs.new_job(REQUEST, "toy", owner="o1" if i % 2 else "o2", now=100.0 + i))
               for i in range(7)]
    page, more = store.list(limit=3, order="asc")
    assert [j.id for j in page] == [j.id for j in created[:3]] and more
    page, more = store.list(limit=3, order="asc", after=page[-1].id)
    assert [j.id for j in page] == [j.id for j in created[3:6]] and more
    page, more = store.list(limit=3, order="asc", after=page[-1].id)
    assert [j.id for j in page] == [created[6].id] and not more
    newest, _ = store.list(limit=2, order="desc")
    assert [j.id for j in newest] == [created[6].id, created[5].id]
    mine, _ = store.list(owner="o1", limit=10)
    assert [j.id for j in mine] == [j.id for j in reversed(created) if j.owner == "o1"]
    with pytest.raises(KeyError):
        store.list(after="video_missing")


def test_records_survive_a_new_connection(store):
    """What one process wrote, another process's store object reads (the embedded store is a file)."""
    job = store.create(jobs.new_job(REQUEST, "toy"))
    store.update(job.id, lambda j: jobs.start_step(j, named(job_steps("step:3"), "encode"), 1.0))
    other = JobStore(store.url, table=store._jobs.name)
    try:
        assert other.get(job.id).stages["encode"].attempts == 1
    finally:
        other.close()
