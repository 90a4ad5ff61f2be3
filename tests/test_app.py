"""The disaggregated Serve app for real, on the session's local Ray with two fake GPUs: one app for the module.

Sketcher and renderer each reserve one (fake) GPU, so they land on different ones, as on a GPU node. Every result
is checked against the in-process engine (same seed and switch): relative error <= 1e-5; after a job, the stages'
metrics are on Ray's Prometheus endpoint. Faults, restarts, limits, auth and the OpenAI SDK have modules of their
own (test_app_faults.py, test_app_api.py).
"""

from __future__ import annotations

import io
import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

import httpx
import ray
from ray import serve

from deployments.metrics import PROMETHEUS_PREFIX

TOLERANCE = 1e-5
APP = "srd-test"
BIG = {"height": 64, "width": 64, "num_frames": 17}  # the two shapes of the concurrency test
SMALL_SHAPE = {"height": 32, "width": 32, "num_frames": 9}
STAGE = {"resources": {"num_cpus": 0.5}}
# Sketch batches wait long enough to gather jobs submitted together; render batches start at once, so that a
# render can begin while the next shape's sketch batch still runs.
TEST_CONFIG = {
    "engine": {"preset": "tiny"},
    "encoder": {**STAGE, "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.2}},
    "sketcher": {"resources": {"num_cpus": 0.5, "num_gpus": 1},
                 "batching": {"max_batch_size": 3, "batch_wait_timeout_s": 0.3}},
    "renderer": {"resources": {"num_cpus": 0.5, "num_gpus": 1},
                 "batching": {"max_batch_size": 3, "batch_wait_timeout_s": 0.05}},
    "decoder": {**STAGE, "batching": {"max_batch_size": 3, "batch_wait_timeout_s": 0.05}},
    "limits": {"max_steps": 600},  # the progress test's long render (the tiny preset accepts 100)
}


@pytest.fixture(scope="module")
def app(serve_http, tiny_models, tmp_path_factory):
    """The app on the session's local Ray (fake GPUs) over HTTP, its handle and its data directory; deleted after
    the module."""
    from deployments.app import build_app
    from deployments.config import AppConfig

    data_dir = tmp_path_factory.mktemp("srd-data")
    config = AppConfig.model_validate({**TEST_CONFIG, "jobs": {"data_dir": str(data_dir)}})
    handle = serve.run(build_app(config), name=APP, route_prefix="/")
    try:
        with httpx.Client(base_url=serve_http, timeout=60) as http:
            yield SimpleNamespace(handle=handle, http=http, data_dir=data_dir)
    finally:
        serve.delete(APP)


def stats(stage: str) -> dict:
    return serve.get_deployment_handle(stage, APP).stats.remote().result()


def wait_for(http, job_id: str, until=lambda job: job["status"] in ("completed", "failed"),
             timeout_s: float = 120.0) -> tuple[dict, list[dict]]:
    """Poll a job until `until(record)`; returns the last record and every record seen."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = http.get(f"/v1/videos/{job_id}")
        assert response.status_code == 200, response.text
        seen.append(response.json())
        if until(seen[-1]):
            return seen[-1], seen
        time.sleep(0.1)  # a poll costs the app CPU that the job needs
    raise AssertionError(f"job {job_id} never got there; last record: {seen[-1] if seen else None}")


def reference_latents(engine, request: dict):
    """The in-process engine's final latents for the same request (unbatched, same seed and switch)."""
    from serve.request import VideoRequest

    return engine.generate(VideoRequest(**request).resolve(engine.config.defaults), decode=False).latents


def latents_over_http(http, job_id: str):
    import torch

    response = http.get(f"/v1/videos/{job_id}/latents")
    assert response.status_code == 200, response.text
    return torch.from_numpy(np.load(io.BytesIO(response.content)))


@pytest.mark.parametrize(("switch", "segments"), [
    ("step:3", [("sketch", 0, 3), ("render", 3, 8)]),
    ("step:2:6", [("sketch", 0, 2), ("render", 2, 6), ("sketch.2", 6, 8)]),  # large, small, large again
])
def test_http_end_to_end(app, engine, rel_err, switch, segments):
    from serve.video import read_mp4

    request = {"prompt": "a red fox in the snow", "seed": 7, "num_inference_steps": 8, "switch": switch}
    created = app.http.post("/v1/videos", json=request)
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["object"] == "video" and job["status"] == "queued" and job["progress"] == 0
    assert job["id"].startswith("video_") and isinstance(job["created_at"], int)

    job, _ = wait_for(app.http, job["id"])
    assert job["status"] == "completed", job
    assert job["progress"] == 100 and job["switch_step"] == segments[0][2] and job["error"] is None
    assert [(s["stage"], s["start"], s["stop"]) for s in job["segments"]] == segments
    assert job["completed_at"] >= job["created_at"] and job["model"] == "tiny"
    assert job["size"] == "64x64" and job["seconds"] == "1"  # 17 frames at 16 fps
    assert set(job["timings"]) == {"encode", *(name for name, _, _ in segments), "decode", "preview"}
    assert {stage: s["attempts"] for stage, s in job["stages"].items()} == dict.fromkeys(job["timings"], 1)
    assert job["request"]["seed"] == 7 and job["request"]["switch"] == switch and job["preview_ready"]

    content = app.http.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert read_mp4(content.content).shape == (17, 64, 64, 3)  # the tiny preset's default size
    assert rel_err(latents_over_http(app.http, job["id"]), reference_latents(engine, request)) <= TOLERANCE


def test_openapi_schema_lists_the_job_api(app):
    schema = app.http.get("/openapi.json").json()
    for path in ("/v1/videos", "/v1/videos/{job_id}", "/v1/videos/{job_id}/content", "/v1/videos/{job_id}/events",
                 "/v1/videos/{job_id}/preview", "/v1/videos/{job_id}/cancel", "/healthz"):
        assert path in schema["paths"], path
    assert "delete" in schema["paths"]["/v1/videos/{job_id}"] and "get" in schema["paths"]["/v1/videos"]
    body = schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    for content_type in ("application/json", "multipart/form-data"):
        fields = body[content_type]["schema"]["properties"]
        assert {"prompt", "model", "size", "seconds", "num_frames", "switch"} <= set(fields), content_type
    assert "4n+1" in fields["seconds"]["description"]
    video = schema["components"]["schemas"]["Video"]["properties"]
    assert {"id", "object", "model", "status", "progress", "created_at", "completed_at", "expires_at", "size",
            "seconds", "error", "switch_step", "stages"} <= set(video)


def test_handle_generate_end_to_end(app, engine, rel_err):
    from PIL import Image

    from serve.video import read_mp4

    request = {"prompt": "a lighthouse at dusk", "seed": 11, "num_inference_steps": 6, "switch": "step:2",
               **SMALL_SHAPE}
    result = app.handle.generate.remote(request).result()
    assert result.job.status == "completed" and result.job.switch_step == 2
    assert read_mp4(result.video).shape == (9, 32, 32, 3)
    assert Image.open(io.BytesIO(result.preview)).size == (32, 32)
    assert Image.open(io.BytesIO(result.thumbnail)).size == (32, 32)
    assert rel_err(result.latents, reference_latents(engine, request)) <= TOLERANCE
    # the same job is visible to HTTP clients
    assert app.http.get(f"/v1/videos/{result.job.id}").json()["status"] == "completed"


def test_sketch_and_render_get_their_own_gpus(app):
    sketch_gpus, render_gpus = stats("Sketcher")["gpu_ids"], stats("Renderer")["gpu_ids"]
    assert len(sketch_gpus) == 1 and len(render_gpus) == 1 and sketch_gpus != render_gpus
    strategies = {pg["strategy"] for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"}
    assert "STRICT_PACK" in strategies


def test_concurrent_jobs_batch_by_shape_and_pipeline(app, engine, rel_err):
    """A long job first, then five jobs of two shapes: all complete, equal to unbatched runs; batches hold one shape,
    and the same-shape jobs that queued while the long one held the sketcher ran as one batch after it (a stage runs
    one batch at a time per shape, so this needs no timing luck); a render overlaps (in wall time) another sketch."""
    long = {"prompt": "scene 0", "seed": 100, "num_inference_steps": 100, "switch": "step:80", **BIG}
    requests = [long] + [
        {"prompt": f"scene {i}", "seed": 100 + i, "num_inference_steps": 16, "switch": "step:8",
         **(BIG if i <= 3 else SMALL_SHAPE)}
        for i in range(1, 6)
    ]
    ids = [app.http.post("/v1/videos", json=requests[0]).json()["id"]]
    wait_for(app.http, ids[0], until=lambda j: j["stage"] == "sketch")
    ids += [app.http.post("/v1/videos", json=r).json()["id"] for r in requests[1:]]
    jobs = [wait_for(app.http, job_id)[0] for job_id in ids]
    assert [j["status"] for j in jobs] == ["completed"] * 6, [j["error"] for j in jobs]

    for job, request in zip(jobs, requests):
        assert rel_err(latents_over_http(app.http, job["id"]), reference_latents(engine, request)) <= TOLERANCE

    def shape(job):
        return tuple(job["request"][k] for k in ("num_frames", "height", "width"))

    biggest = 0
    for stage in ("sketch", "render", "decode"):
        batches: dict[str, list[dict]] = {}
        for job in jobs:
            batches.setdefault(job["stages"][stage]["batch_id"], []).append(job)
        for members in batches.values():
            assert len({shape(j) for j in members}) == 1, f"{stage} batch mixes shapes"
            assert all(j["stages"][stage]["batch_size"] == len(members) for j in members)
            biggest = max(biggest, len(members))
    assert biggest >= 2, "no stage ever ran two same-shape requests together"
    assert len({j["stages"]["sketch"]["batch_id"] for j in jobs[1:4]}) < 3  # they queued behind the long one
    ran = {tuple(b["jobs"]) for b in stats("Sketcher")["batches"]}
    assert any(len(b) >= 2 and set(b) <= set(ids) for b in ran)  # the replica's own account agrees

    def overlap(a: dict, b: dict) -> bool:
        return a["start"] < b["end"] and b["start"] < a["end"]

    assert any(
        overlap(render["stages"]["render"], sketch["stages"]["sketch"])
        for render in jobs for sketch in jobs if render["id"] != sketch["id"]
    ), "no render ever ran while another job was being sketched"


def test_progress_is_monotonic_and_preview_precedes_completion(app):
    from PIL import Image

    # The events stream samples the store every 0.25 s (ingress SSE_POLL_S) and stages write their step counts every
    # 0.1 s: 600 render steps last about 1.5 s even on an idle machine (about 2.5 ms a step), so that several
    # samples fall inside the render. (100 steps rendered within one sample when the machine was idle.)
    request = {"prompt": "a slow sunrise", "seed": 3, "num_inference_steps": 600, "switch": "step:4", **BIG}
    job_id = app.http.post("/v1/videos", json=request).json()["id"]
    events, preview_while_running = [], None
    with httpx.Client(base_url=str(app.http.base_url), timeout=60) as side:
        with app.http.stream("GET", f"/v1/videos/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(json.loads(line.removeprefix("data: ")))
                if preview_while_running is None and events[-1]["preview_ready"]:
                    response = side.get(f"/v1/videos/{job_id}/preview")
                    status = side.get(f"/v1/videos/{job_id}").json()["status"]
                    preview_while_running = (response, status)
    final = events[-1]
    assert final["status"] == "completed"
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 100
    # it moved during denoising, not 0 then 100 (stages write step counts every `jobs.progress_interval_s`)
    assert len({p for p in progress if 5 < p < 95}) >= 2, progress
    versions = [e["version"] for e in events]
    assert versions == sorted(set(versions))

    response, status = preview_while_running
    assert status == "in_progress"  # the preview was there while rendering was still going on
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)


def test_bad_input_names_the_field_and_the_server_keeps_serving(app):
    cases = {
        "width": {"prompt": "x", "width": 30},
        "num_frames": {"prompt": "x", "num_frames": 8},
        "switch": {"prompt": "x", "num_inference_steps": 4, "switch": "step:9"},  # K > N: resolve() refuses
        "prompt": {"prompt": "   "},
        "colour": {"prompt": "x", "colour": "red"},
    }
    for field, body in cases.items():
        response = app.http.post("/v1/videos", json=body)
        assert response.status_code == 422, (field, response.text)
        detail = response.json()["detail"][0]
        assert detail["loc"][-1] == field, (field, detail)
    missing = app.http.post("/v1/videos", json={"seed": 1})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert "`height` must be a positive multiple of 16" in app.http.post(
        "/v1/videos", json={"prompt": "x", "height": 20}).text

    for method, path in [("GET", ""), ("GET", "/content"), ("GET", "/preview"), ("GET", "/latents"),
                         ("GET", "/events"), ("DELETE", ""), ("POST", "/cancel")]:
        response = app.http.request(method, f"/v1/videos/video_unknown{path}")
        assert response.status_code == 404 and "video_unknown" in response.json()["error"]["message"], (method, path)

    with pytest.raises(Exception, match="height"):
        app.handle.submit.remote({"prompt": "x", "height": 20}).result()
    assert app.http.get("/healthz").json() == {"status": "ok"}


def test_cancel_during_sketching(app, engine, rel_err):
    """The cancelled job stops at a step boundary soon after the cancel (the stage reads cancel flags every
    `jobs.progress_interval_s`, off the denoising thread) and frees the sketcher; a job sketched beside it (same
    shape, so possibly in the same batch) completes with the unbatched result."""
    long = {"prompt": "a very long sketch", "seed": 5, "num_inference_steps": 100, "switch": "step:99",
            "height": 64, "width": 64, "num_frames": 17}
    other = {"prompt": "a short one", "seed": 6, "num_inference_steps": 6, "switch": "step:3",
             "height": 64, "width": 64, "num_frames": 17}
    long_id = app.http.post("/v1/videos", json=long).json()["id"]
    other_id = app.http.post("/v1/videos", json=other).json()["id"]

    running, _ = wait_for(app.http, long_id, until=lambda j: j["stage"] == "sketch" and j["steps_done"] >= 2)
    content = app.http.get(f"/v1/videos/{long_id}/content")
    assert content.status_code == 409 and "in_progress" in content.json()["error"]["message"]
    assert app.http.get(f"/v1/videos/{long_id}/preview").status_code == 409
    assert app.http.delete(f"/v1/videos/{long_id}").status_code == 409  # running: cancel first

    asked = time.monotonic()
    cancel = app.http.post(f"/v1/videos/{long_id}/cancel")
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"]
    cancelled, _ = wait_for(app.http, long_id)
    stopped_after_s = time.monotonic() - asked
    assert cancelled["status"] == "failed" and cancelled["cancelled"] and cancelled["error"]["code"] == "cancelled"
    assert cancelled["cancelled_at_step"] == cancelled["steps_done"] < 99
    assert cancelled["cancelled_at_step"] >= cancel.json()["steps_done"]
    assert stopped_after_s < 10, stopped_after_s  # a poll interval and a step, not the remaining 97 steps
    assert "render" not in cancelled["stages"] and not cancelled["preview_ready"]
    assert cancelled["switch_step"] is None
    assert long_id not in stats("Sketcher")["running"]
    assert app.http.post(f"/v1/videos/{long_id}/cancel").status_code == 409  # already finished

    done, _ = wait_for(app.http, other_id)
    assert done["status"] == "completed"
    assert rel_err(latents_over_http(app.http, other_id), reference_latents(engine, other)) <= TOLERANCE

    # a finished job is deleted with its files, as OpenAI's DELETE does
    files = app.data_dir / "results" / long_id
    deleted = app.http.delete(f"/v1/videos/{long_id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": long_id, "object": "video.deleted", "deleted": True}
    assert app.http.get(f"/v1/videos/{long_id}").status_code == 404 and not files.exists()


def test_srd_generate_via_serve_on_a_cluster(app, engine, rel_err, tmp_path):
    """The README's first command, `srd generate --via-serve`, as a process of its own that joins a running cluster
    (RAY_ADDRESS: here the module's Ray; alone, it starts and stops a local Ray, as .ci/run and
    test_frontdoor_serve.py run it): the job runs through the app's deployments and writes the same video and
    latents, and the command leaves its app behind on neither the cluster's Serve nor its Ray."""
    import os
    import subprocess
    import sys

    import torch

    from serve.video import read_mp4

    out, latents = tmp_path / "demo.mp4", tmp_path / "final_latents.pt"
    argv = ["generate", "--via-serve", "--preset", "tiny", "--prompt", "a red ball bouncing", "--height", "32",
            "--width", "32", "--frames", "9", "--steps", "4", "--seed", "9", "--out", str(out),
            "--save-latents", str(latents)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "serve.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_mp4(out.read_bytes()).shape == (9, 32, 32, 3)
    request = {"prompt": "a red ball bouncing", "height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 4,
               "seed": 9}
    assert rel_err(torch.load(latents), reference_latents(engine, request)) <= TOLERANCE
    assert set(serve.status().applications) == {APP}  # it removed its app, and left the module's
    assert app.http.get("/healthz").status_code == 200


def scrape(http) -> str:
    """GET /metrics on the API port (the app's series, read from Ray's metrics export), as Prometheus scrapes it."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text
    return response.text


def series(body: str, name: str) -> list[str]:
    """Sample lines of one metric (a histogram's `_count` lines stand for it), with their labels."""
    name = PROMETHEUS_PREFIX + name
    return [line for line in body.splitlines()
            if line.startswith((name + "{", name + "_count{", name + "_total{")) and not line.startswith("#")]


def label(line: str, key: str) -> str | None:
    match = re.search(rf'[{{,]{key}="([^"]*)"', line)
    return match.group(1) if match else None


def test_a_job_publishes_per_stage_metrics(app):
    """After a job, `GET /metrics` on the API port carries the stages' series (read from Ray's Prometheus export,
    which publishes every few seconds, so the scrape is repeated until they are there, bounded)."""
    result = app.handle.generate.remote({"prompt": "a red ball", "height": 32, "width": 32, "num_frames": 5,
                                         "num_inference_steps": 4, "switch": "step:1", "seed": 0}).result()
    assert result.job.status == "completed", result.job
    wanted = {"srd_stage_queue_depth", "srd_stage_batch_size", "srd_stage_step_seconds", "srd_stage_seconds"}
    deadline, body = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        body = scrape(app.http)
        stages = {name: {label(line, "stage") for line in series(body, name)} for name in wanted}
        if all({"encode", "sketch", "render", "decode"} <= found for found in stages.values()) \
                and series(body, "srd_jobs"):
            break
        time.sleep(1.0)
    for name in wanted:
        assert {"encode", "sketch", "render", "decode"} <= {label(line, "stage") for line in series(body, name)}, \
            (name, series(body, name))
    # at least this job's one sketch step (K=1) and three render steps, each timed once: counts, not timings
    steps = {label(line, "stage"): float(line.rsplit(" ", 1)[1])
             for line in series(body, "srd_stage_step_seconds") if "_count{" in line}
    assert steps["sketch"] >= 1 and steps["render"] >= 3
    assert any(label(line, "deployment") == "Sketcher" for line in series(body, "srd_stage_step_seconds"))
    switch = [line for line in series(body, "srd_switch_step") if "_count{" in line]
    assert switch and float(switch[0].rsplit(" ", 1)[1]) >= 1
    assert {label(line, "direction") for line in series(body, "srd_handoff_bytes")} >= {"write", "read"}
    completed = [line for line in series(body, "srd_jobs") if label(line, "status") == "completed"]
    assert completed and float(completed[0].rsplit(" ", 1)[1]) >= 1
    assert series(body, "srd_job_queue_wait_seconds") and series(body, "srd_job_compute_seconds")
    assert not series(body, "srd_gpu_utilization_percent")  # fake GPUs: NVML stays quiet, and the text says so
    assert "# srd_gpu_* absent: no replica reports a GPU" in body
    assert not [line for line in body.splitlines() if line.startswith("ray_") and "srd_" not in line]
