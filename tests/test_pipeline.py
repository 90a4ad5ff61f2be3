"""The declared pipeline (serve/pipeline/): a job's steps for its plan, the checks on a misdeclared pipeline, the
encode stage's embedding cache, and a stage added in one module plus one registry line, which the Engine, the job
state machine, the drive loop, the generic stage deployment and the app builder then run without another change."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve.engine import Engine
from serve.models import PRESETS
from serve.pipeline.artifacts import EMBEDS, HANDOFF, LATENTS, PREVIEW, THUMBNAIL, VIDEO, Artifact, handoff
from serve.pipeline.encode import EncodeStage, cache_key
from serve.pipeline.registry import PIPELINE
from serve.pipeline.stage import Output, Pipeline, Stage
from serve.request import VideoRequest
from serve.switch import make_plan
from serve.video import encode_png, read_png


def steps_for(switch: str, steps: int = 8):
    params = VideoRequest(prompt="x", num_inference_steps=steps, switch=switch).resolve(PRESETS["tiny"].defaults)
    return PIPELINE.steps(make_plan(params))


def test_two_segments_read_and_write_the_artifacts_of_today():
    steps = steps_for("step:3")
    assert [(s.name, s.stage, s.phase) for s in steps] == [
        ("encode", "encode", "prepare"), ("sketch", "sketch", "denoise"), ("preview", "preview", "side"),
        ("render", "render", "denoise"), ("decode", "decode", "finish")]
    by_name = {s.name: s for s in steps}
    assert by_name["encode"].writes == (EMBEDS,)
    sketch, render = by_name["sketch"], by_name["render"]
    assert (sketch.reads, sketch.writes, sketch.span) == ((EMBEDS,), (HANDOFF,), (0, 3))
    assert (render.reads, render.writes, render.span) == ((HANDOFF,), (LATENTS,), (3, 8))
    assert by_name["preview"].reads == (HANDOFF,) and by_name["preview"].writes == (PREVIEW,)
    assert by_name["decode"].reads == (LATENTS,) and set(by_name["decode"].writes) == {VIDEO, THUMBNAIL}
    assert [a.file for a in (EMBEDS, HANDOFF, LATENTS, VIDEO, THUMBNAIL, PREVIEW)] == [
        "embeds.safetensors", "handoff.safetensors", "latents.safetensors", "video.mp4", "thumbnail.png",
        "preview.png"]  # the results layout clients and earlier releases see


def test_a_third_segment_is_one_more_hand_off():
    steps = [s for s in steps_for("step:2:6") if s.phase == "denoise"]
    assert [(s.name, s.stage, s.segment, s.span) for s in steps] == [
        ("sketch", "sketch", 0, (0, 2)), ("render", "render", 1, (2, 6)), ("sketch.2", "sketch", 2, (6, 8))]
    assert [(s.reads, s.writes) for s in steps] == [
        ((EMBEDS,), (handoff(0),)), ((handoff(0),), (handoff(1),)), ((handoff(1),), (LATENTS,))]
    assert handoff(1).file == "handoff.2.safetensors"


def test_adaptive_spans_are_estimates_until_the_sketch_decides():
    sketch, render = [s for s in steps_for("adaptive:0.01:2:6", 10) if s.phase == "denoise"]
    assert sketch.span == (0, 4) and render.span == (4, 10)


class Unwritten(Stage):
    name = "reads_nothing_written"
    deployment = "Decoder"
    reads = (Artifact("nowhere.bin", "image", bytes, bytes),)


def test_a_misdeclared_pipeline_is_refused_naming_the_step():
    with pytest.raises(ValueError, match=r"step 'reads_nothing_written' reads nowhere.bin, which no earlier step"):
        Pipeline(PIPELINE.prepare, PIPELINE.denoise, (*PIPELINE.finish, Unwritten)).steps(
            make_plan(VideoRequest(prompt="x", switch="step:1").resolve(PRESETS["tiny"].defaults)))
    with pytest.raises(ValueError, match="stage names must be unique"):
        Pipeline(PIPELINE.prepare, PIPELINE.denoise, (*PIPELINE.finish, *PIPELINE.finish))


def test_the_encode_stage_caches_repeated_prompts_and_evicts_the_least_recent(tiny_config, make_params, rel_err):
    encoder = EncodeStage.load(tiny_config, cache_size=2)
    cat, dog, owl = (make_params(prompt=p) for p in ("a cat", "a dog", "an owl"))
    first = encoder([cat, dog])
    assert encoder.cache.misses == 2 and encoder.cache.hits == 0
    again = encoder([cat, cat])  # cached, and one lookup per distinct prompt
    assert encoder.cache.hits == 1 and again[0] is first[0] and again[1] is first[0]
    encoder([owl])  # evicts "a dog", the least recently used
    misses = encoder.cache.misses
    encoder([dog])
    assert encoder.cache.misses == misses + 1 and encoder.stats()["cache"]["misses"] == misses + 1
    fresh = encoder.family.encode(encoder.pipe, [cat], "cpu")[0]
    assert rel_err(first[0].prompt, fresh.prompt) <= 1e-5 and rel_err(first[0].negative, fresh.negative) <= 1e-5
    # without guidance the negative prompt is not encoded, so it does not split the cache
    unguided = make_params(prompt="a cat", guidance_scale=1.0)
    assert cache_key(unguided) == cache_key(make_params(prompt="a cat", guidance_scale=1.0, negative_prompt="blur"))
    assert cache_key(unguided) != cache_key(cat)


# -- a stage added in one module (this one) and one registry line ------------------------------------------------

SMALL_THUMBNAIL = Artifact("thumbnail-small.png", "image", encode_png, read_png)


class SmallThumbnailStage(Stage):
    """After decode: the thumbnail at half its size, a second image of the video."""

    name = "small_thumbnail"
    deployment = "Thumbnailer"
    reads = (THUMBNAIL,)
    writes = (SMALL_THUMBNAIL,)

    @classmethod
    def load(cls, config, models=None) -> SmallThumbnailStage:
        return cls()

    def run(self, tasks, on_step=None):
        return [Output({SMALL_THUMBNAIL: task.inputs[THUMBNAIL][::2, ::2]}) for task in tasks]


WITH_SMALL_THUMBNAIL = Pipeline(PIPELINE.prepare, PIPELINE.denoise, (*PIPELINE.finish, SmallThumbnailStage),
                                PIPELINE.side)  # the registry line


def test_the_engine_runs_the_added_stage(tiny_config, make_params):
    engine = Engine(tiny_config, WITH_SMALL_THUMBNAIL)
    result = engine.generate(make_params(switch="step:2"))
    assert list(result.timings)[-1] == "small_thumbnail"
    small, frames = result.artifacts[SMALL_THUMBNAIL], result.frames
    assert small.shape == (frames.shape[1] // 2, frames.shape[2] // 2, 3)
    assert np.array_equal(small, frames[0, ::2, ::2])


def test_the_drive_loop_and_the_stage_deployment_run_the_added_stage(tiny_config, make_params, tmp_path, loop,
                                                                     in_process_app):
    from serve.jobs import state
    from serve.jobs.config import JobsConfig

    app = in_process_app(tiny_config, JobsConfig(data_dir=str(tmp_path), poll_interval_s=0.02), loop,
                         WITH_SMALL_THUMBNAIL)
    try:
        assert set(app.deployments) == {"Encoder", "Sketcher", "Renderer", "Decoder", "Thumbnailer"}
        job = app.store.create(state.new_job(make_params(switch="step:2").to_dict(), "tiny"))
        driver = app.driver()

        async def drive():
            assert await driver.claim() == [job.id]
            await asyncio.wait_for(asyncio.gather(*driver._driving.values()), 60)

        loop.run(drive())
    finally:
        app.close()
    done = app.store.get(job.id)
    assert done.status == "completed" and done.checkpoint == "small_thumbnail" and done.finished("small_thumbnail")
    thumbnail = read_png(app.results.get(job.id, THUMBNAIL.file))
    assert np.array_equal(read_png(app.results.get(job.id, SMALL_THUMBNAIL.file)), thumbnail[::2, ::2])


def test_the_app_builder_deploys_the_added_stage():
    from deployments.app import build_app
    from deployments.config import AppConfig

    def deployments(application, found=None):
        """Names of the deployments bound in the app graph (Serve resolves the nested applications the same
        way when it builds the app)."""
        found = {} if found is None else found
        bound = application._bound_deployment
        found[bound.name] = bound
        for arg in (*bound.init_args, *bound.init_kwargs.values()):
            for value in (arg.values() if isinstance(arg, dict) else [arg]):
                if hasattr(value, "_bound_deployment"):
                    deployments(value, found)
        return found

    found = deployments(build_app(AppConfig(), WITH_SMALL_THUMBNAIL))
    assert set(found) == {"Ingress", "Orchestrator", "Encoder", "Sketcher", "Renderer", "Decoder", "Thumbnailer"}
    thumbnailer = found["Thumbnailer"].init_args
    assert thumbnailer[0] == "Thumbnailer" and thumbnailer[-1] is WITH_SMALL_THUMBNAIL
