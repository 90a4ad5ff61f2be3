"""Parts of the app that hold logic of their own, in-process (no Ray cluster): the job store's bookkeeping and the
encoder's embedding cache. The deployments working together are tested on a real local Ray in test_app.py."""

from __future__ import annotations

import asyncio

from deployments.config import EncoderConfig
from deployments.encoder import Encoder, cache_key
from deployments.jobs import JobStore


def run(coroutine):
    return asyncio.run(coroutine)


def test_job_store_progress_never_goes_back_and_cancel_stops_steps(make_params):
    async def scenario():
        store = JobStore(max_finished_jobs=10)
        job = await store.create(make_params(num_inference_steps=10))
        assert job.status == "queued" and job.progress == 0
        assert await store.begin([job.id], "sketch", 1.0, "b0") == [True]
        assert await store.step(job.id, 6, 10)
        progress = (await store.get(job.id)).progress
        assert await store.step(job.id, 2, 10)  # a late, out-of-order report
        assert (await store.get(job.id)).progress == progress
        cancelled = await store.cancel(job.id)
        assert cancelled.cancel_requested and cancelled.status == "in_progress"
        assert await store.step(job.id, 7, 10) is False  # the stage learns it at its next step boundary
        assert await store.begin([job.id], "render", 2.0, "b1") == [False]  # and later stages skip it
        await store.end(job.id, "sketch", 1.5, cancelled_at_step=7)
        finished = await store.finish(job.id, "cancelled")
        assert finished.status == "cancelled" and finished.cancelled_at_step == 7 and finished.stage is None
        assert (await store.cancel(job.id)).status == "cancelled"  # terminal: unchanged

    run(scenario())


def test_job_store_keeps_running_jobs_and_evicts_the_oldest_finished(make_params):
    async def scenario():
        store = JobStore(max_finished_jobs=2)
        running = await store.create(make_params())
        done = []
        for _ in range(4):
            job = await store.create(make_params())
            await store.put_result(job.id, video=b"mp4")
            await store.finish(job.id, "completed")
            done.append(job.id)
        assert await store.get(running.id) is not None
        assert [await store.get(i) is not None for i in done] == [False, False, True, True]
        assert await store.result(done[-1], "video") == b"mp4"

    run(scenario())


def test_job_store_wait_returns_on_change_or_timeout(make_params):
    async def scenario():
        store = JobStore(max_finished_jobs=2)
        job = await store.create(make_params())
        unchanged = await store.wait(job.id, job.version, timeout_s=0.01)
        assert unchanged.version == job.version
        waiter = asyncio.create_task(store.wait(job.id, job.version, timeout_s=30))
        await asyncio.sleep(0)
        await store.begin([job.id], "encode", 1.0, "b0")
        assert (await waiter).stage == "encode"

    run(scenario())


def test_encoder_cache_serves_repeated_prompts_and_evicts_least_recent(tiny_config, make_params, rel_err):
    encoder = Encoder(tiny_config, EncoderConfig(cache_size=2), store=None)
    cat, dog, owl = (make_params(prompt=p) for p in ("a cat", "a dog", "an owl"))
    first = encoder._encode([cat, dog])
    assert encoder._cache.misses == 2 and encoder._cache.hits == 0
    again = encoder._encode([cat, cat])  # cached, and one lookup per distinct prompt
    assert encoder._cache.hits == 1 and again[0] is first[0] and again[1] is first[0]
    encoder._encode([owl])  # evicts "a dog", the least recently used
    misses = encoder._cache.misses
    encoder._encode([dog])
    assert encoder._cache.misses == misses + 1
    fresh = encoder._stage([cat])[0]
    assert rel_err(first[0].prompt, fresh.prompt) <= 1e-5 and rel_err(first[0].negative, fresh.negative) <= 1e-5
    # without guidance the negative prompt is not encoded, so it does not split the cache
    unguided = make_params(prompt="a cat", guidance_scale=1.0)
    assert cache_key(unguided) == cache_key(make_params(prompt="a cat", guidance_scale=1.0, negative_prompt="blur"))
    assert cache_key(unguided) != cache_key(cat)
