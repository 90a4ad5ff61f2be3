"""Parts of the app that hold logic of their own, in-process (no Ray cluster): the stages' progress reporter against
a real SQLite job store. The deployments working together are tested on a real local Ray in test_app*.py."""

from __future__ import annotations

import sqlite3
import time

from deployments.batching import ProgressReporter
from serve.jobs import state as jobs
from serve.jobs.store import JobStore
from serve.pipeline.stage import Step


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def running_job(store: JobStore) -> jobs.JobRecord:
    job = store.create(jobs.new_job({"prompt": "x", "num_inference_steps": 10}, "tiny"))
    return store.update(job.id, lambda j: jobs.start_step(j, Step("sketch", "sketch", (), (), "denoise", 0),
                                                            time.time()))


def test_steps_never_wait_on_the_store_and_cancel_reaches_them(tmp_path):
    """A step records its count in memory and answers from memory, even while another process holds the database
    locked; the reporter's thread writes the counts later and brings the cancel flag back."""
    path = tmp_path / "jobs.db"
    store = JobStore(f"sqlite:///{path}")
    job = running_job(store)
    reporter = ProgressReporter(JobStore(store.url), interval_s=0.05)
    assert reporter.watch([job.id]) == set()

    lock = sqlite3.connect(path, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")  # nobody else can read or write the store now
    started = time.perf_counter()
    for step in range(1, 6):
        assert reporter.step(job.id, step) is True
    assert time.perf_counter() - started < 0.5  # five steps, no store round trip among them
    lock.rollback()
    lock.close()

    wait_until(lambda: store.get(job.id).steps_done == 5)
    assert store.get(job.id).progress == jobs.progress_after_steps(5, 10)
    store.update(job.id, jobs.request_cancel)
    wait_until(lambda: reporter.step(job.id, 6) is False)
    reporter.done([job.id])  # the last count is written before the stage reports the cancel
    assert store.get(job.id).steps_done == 6


def test_a_batch_skips_jobs_cancelled_before_it_starts(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    live, cancelled = running_job(store), running_job(store)
    store.update(cancelled.id, jobs.request_cancel)
    reporter = ProgressReporter(JobStore(store.url), interval_s=60)  # no help from the thread: watch() reads
    assert reporter.watch([live.id, cancelled.id]) == {cancelled.id}
