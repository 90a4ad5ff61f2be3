"""The disaggregated Serve app for real, on a local Ray with two fake GPUs: one app for the whole module.

Sketcher and renderer each reserve one (fake) GPU, so they land on different ones, as on a GPU node. Every result
is checked against the in-process engine (same seed and switch): relative error <= 1e-5.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest

import httpx
import ray

from ray import serve

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
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_models):
    """Local Ray (fake GPUs), the app over HTTP on a free port, its handle; torn down after the module."""
    from deployments.app import build_app
    from deployments.config import AppConfig

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        # 4 CPUs for this app's stages (0.5 each) and the rest; more for the second app that `srd generate
        # --via-serve` deploys beside it (a quarter of this machine's cores per stage).
        ray.init(num_cpus=4 + len(os.sched_getaffinity(0)), num_gpus=2, object_store_memory=100 * 1024**2,
                 include_dashboard=False)
        try:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            handle = serve.run(build_app(AppConfig.model_validate(TEST_CONFIG)), name=APP, route_prefix="/")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                yield SimpleNamespace(handle=handle, http=http, port=port)
        finally:
            serve.shutdown()
            ray.shutdown()


def stats(stage: str) -> dict:
    return serve.get_deployment_handle(stage, APP).stats.remote().result()


def wait_for(http, job_id: str, until=lambda job: job["status"] in ("completed", "failed", "cancelled"),
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
        time.sleep(0.02)
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


def test_http_end_to_end(app, engine, rel_err):
    from serve.video import read_mp4

    request = {"prompt": "a red fox in the snow", "seed": 7, "num_inference_steps": 8, "switch": "step:3"}
    created = app.http.post("/v1/videos", json=request)
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["object"] == "video" and job["status"] == "queued" and job["progress"] == 0
    assert job["id"].startswith("video_") and isinstance(job["created_at"], int)

    job, _ = wait_for(app.http, job["id"])
    assert job["status"] == "completed", job
    assert job["progress"] == 100 and job["switch_step"] == 3 and job["error"] is None
    assert set(job["timings"]) == {"encode", "sketch", "render", "decode"}
    assert job["request"]["seed"] == 7 and job["request"]["switch"] == "step:3"

    content = app.http.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert read_mp4(content.content).shape == (17, 64, 64, 3)  # the tiny preset's default size
    assert rel_err(latents_over_http(app.http, job["id"]), reference_latents(engine, request)) <= TOLERANCE


def test_openapi_schema_lists_the_job_api(app):
    schema = app.http.get("/openapi.json").json()
    for path in ("/v1/videos", "/v1/videos/{job_id}", "/v1/videos/{job_id}/content", "/v1/videos/{job_id}/events",
                 "/v1/videos/{job_id}/preview", "/healthz"):
        assert path in schema["paths"], path
    assert "delete" in schema["paths"]["/v1/videos/{job_id}"]


def test_handle_generate_end_to_end(app, engine, rel_err):
    from PIL import Image

    from serve.video import read_mp4

    request = {"prompt": "a lighthouse at dusk", "seed": 11, "num_inference_steps": 6, "switch": "step:2",
               **SMALL_SHAPE}
    result = app.handle.generate.remote(request).result()
    assert result.job.status == "completed" and result.job.switch_step == 2
    assert read_mp4(result.video).shape == (9, 32, 32, 3)
    assert Image.open(io.BytesIO(result.preview)).size == (32, 32)
    assert rel_err(result.latents, reference_latents(engine, request)) <= TOLERANCE
    # the same job is visible to HTTP clients
    assert app.http.get(f"/v1/videos/{result.job.id}").json()["status"] == "completed"


def test_sketch_and_render_get_their_own_gpus(app):
    sketch_gpus, render_gpus = stats("Sketcher")["gpu_ids"], stats("Renderer")["gpu_ids"]
    assert len(sketch_gpus) == 1 and len(render_gpus) == 1 and sketch_gpus != render_gpus
    strategies = {pg["strategy"] for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"}
    assert "STRICT_PACK" in strategies


def test_concurrent_jobs_batch_by_shape_and_pipeline(app, engine, rel_err):
    """Six jobs of two shapes: all complete, equal to unbatched runs; batches hold one shape and some hold >= 2;
    a render of one job overlaps (in wall time) the sketch of another."""
    requests = [
        {"prompt": f"scene {i}", "seed": 100 + i, "num_inference_steps": 16, "switch": "step:8",
         **(BIG if i % 2 == 0 else SMALL_SHAPE)}
        for i in range(6)
    ]
    ids = [app.http.post("/v1/videos", json=r).json()["id"] for r in requests]
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

    request = {"prompt": "a slow sunrise", "seed": 3, "num_inference_steps": 40, "switch": "step:4", **SMALL_SHAPE}
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
    assert len(set(progress)) >= 10, progress  # it moved step by step, not 0 then 100
    versions = [e["version"] for e in events]
    assert versions == sorted(set(versions))

    response, status = preview_while_running
    assert status == "in_progress"  # the preview was there while rendering was still going on
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    stages = final["stages"]
    assert stages["sketch"]["end"] <= final["preview_at"] <= stages["decode"]["start"]


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
                         ("GET", "/events"), ("DELETE", "")]:
        response = app.http.request(method, f"/v1/videos/video_unknown{path}")
        assert response.status_code == 404 and "video_unknown" in response.json()["detail"], (method, path)

    with pytest.raises(Exception, match="height"):
        app.handle.submit.remote({"prompt": "x", "height": 20}).result()
    assert app.http.get("/healthz").json() == {"status": "ok"}


def test_cancel_during_sketching(app, engine, rel_err):
    """The cancelled job stops at the next step boundary and frees the sketcher; a job sketched beside it (same
    shape, so possibly in the same batch) completes with the unbatched result."""
    long = {"prompt": "a very long sketch", "seed": 5, "num_inference_steps": 400, "switch": "step:399",
            **SMALL_SHAPE}
    other = {"prompt": "a short one", "seed": 6, "num_inference_steps": 6, "switch": "step:3", **SMALL_SHAPE}
    long_id = app.http.post("/v1/videos", json=long).json()["id"]
    other_id = app.http.post("/v1/videos", json=other).json()["id"]

    running, _ = wait_for(app.http, long_id, until=lambda j: j["stage"] == "sketch" and j["steps_done"] >= 2)
    content = app.http.get(f"/v1/videos/{long_id}/content")
    assert content.status_code == 409 and "in_progress" in content.json()["detail"]
    assert app.http.get(f"/v1/videos/{long_id}/preview").status_code == 409

    deleted = app.http.delete(f"/v1/videos/{long_id}")
    assert deleted.status_code == 200 and deleted.json()["cancel_requested"]
    cancelled, _ = wait_for(app.http, long_id)
    assert cancelled["status"] == "cancelled"
    # the sketch stage saw the flag at the first step boundary after the DELETE
    assert cancelled["cancelled_at_step"] == deleted.json()["steps_done"] + 1 < 399
    assert cancelled["stages"]["sketch"]["end"] is not None and "render" not in cancelled["stages"]
    assert not cancelled["preview_ready"] and cancelled["switch_step"] is None
    assert long_id not in stats("Sketcher")["in_flight"]
    assert app.http.delete(f"/v1/videos/{long_id}").status_code == 200  # cancelling twice is harmless

    done, _ = wait_for(app.http, other_id)
    assert done["status"] == "completed"
    assert rel_err(latents_over_http(app.http, other_id), reference_latents(engine, other)) <= TOLERANCE
    assert app.http.delete(f"/v1/videos/{other_id}").status_code == 409  # completed: nothing to cancel


def test_srd_generate_via_serve(app, engine, rel_err, tmp_path):
    """The README's first command: `srd generate --via-serve` runs the job through the app's deployments (on its
    own, it starts and stops a local Ray; here it joins the module's) and writes the same video and latents."""
    import torch

    from serve.cli import main
    from serve.video import read_mp4

    out, latents = tmp_path / "demo.mp4", tmp_path / "final_latents.pt"
    argv = ["generate", "--via-serve", "--preset", "tiny", "--prompt", "a red ball bouncing", "--height", "32",
            "--width", "32", "--frames", "9", "--steps", "4", "--seed", "9", "--out", str(out),
            "--save-latents", str(latents)]
    assert main(argv) == 0
    assert read_mp4(out.read_bytes()).shape == (9, 32, 32, 3)
    request = {"prompt": "a red ball bouncing", "height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 4,
               "seed": 9}
    assert rel_err(torch.load(latents), reference_latents(engine, request)) <= TOLERANCE
    assert set(serve.status().applications) == {APP}  # it removed the app it deployed


def test_ingress_restart_loses_nothing(app):
    """Kill the ingress replica mid-job: the finished job and the running one are both still there afterwards."""
    finished = app.http.post("/v1/videos", json={"prompt": "before", "seed": 1, **SMALL_SHAPE}).json()["id"]
    wait_for(app.http, finished)
    video = app.http.get(f"/v1/videos/{finished}/content").content
    running = app.http.post("/v1/videos", json={"prompt": "during", "seed": 2, "num_inference_steps": 60,
                                                 "switch": "step:30", **SMALL_SHAPE}).json()["id"]
    wait_for(app.http, running, until=lambda j: j["status"] == "in_progress")

    (ingress,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#Ingress#")]
    ray.kill(ray.get_actor(ingress["name"], namespace=ingress["namespace"]), no_restart=True)

    deadline = time.monotonic() + 120
    while True:  # Serve replaces the replica; until then the proxy has nowhere to send requests
        try:
            if app.http.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the ingress never came back"
        time.sleep(0.2)
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == ingress["name"]]

    assert app.http.get(f"/v1/videos/{finished}").json()["status"] == "completed"
    assert app.http.get(f"/v1/videos/{finished}/content").content == video
    job, _ = wait_for(app.http, running)
    assert job["status"] == "completed", job
