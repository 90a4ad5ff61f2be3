"""Schedules served end to end on the toy preset over the HTTP API: a three-segment schedule (large, small, large
again) and a quality target that the toy pair's shipped calibration resolves. The routes, the drive loop and the
stage deployments run in this process (tests/conftest.py `InProcessApp`); every switch between models is a hand-off
through the results location, and the final latents equal the in-process engine's (float32)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

TOLERANCE = 1e-5
PROMPT = "a large red circle moving right slowly on a black background"


@pytest.fixture(scope="module")
def toy(tmp_path_factory, loop, in_process_app):
    from types import SimpleNamespace

    from deployments.config import AppConfig
    from deployments.ingress import VideoService, make_api
    from serve.engine import Engine, EngineConfig

    data_dir = tmp_path_factory.mktemp("srd-toy-schedules")
    config = AppConfig.model_validate({"engine": {"preset": "toy"}, "jobs": {
        "data_dir": str(data_dir), "poll_interval_s": 0.05, "progress_interval_s": 0.05}})
    app = in_process_app(config.engine, config.jobs, loop)
    app.start()
    try:
        with TestClient(make_api(VideoService(config))) as http:
            yield SimpleNamespace(http=http, data_dir=data_dir, engine=Engine(EngineConfig(preset="toy")))
    finally:
        app.close()


def run_job(http, request: dict) -> tuple[dict, list[int]]:
    """The finished job and the progress values seen while it ran."""
    created = http.post("/v1/videos", json=request)
    assert created.status_code == 200, created.text
    progress, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        job = http.get(f"/v1/videos/{created.json()['id']}").json()
        progress.append(job["progress"])
        if job["status"] in ("completed", "failed"):
            return job, progress
        time.sleep(0.05)
    raise AssertionError(f"job did not finish: {job}")


def check_served(toy, request: dict, segments: list[tuple[str, int, int]]) -> None:
    from serve.pipeline.artifacts import handoff
    from serve.request import VideoRequest
    from serve.video import read_mp4

    job, progress = run_job(toy.http, request)
    assert job["status"] == "completed", job["error"]
    assert [(s["stage"], s["start"], s["stop"]) for s in job["segments"]] == segments
    assert job["switch_step"] == segments[0][2] and job["steps_done"] == 20 and job["request"]["switch"] == \
        request["switch"]
    assert progress == sorted(progress) and progress[-1] == 100 and job["preview_ready"]
    assert {s: r["attempts"] for s, r in job["stages"].items()} == dict.fromkeys(
        ("encode", *(name for name, _, _ in segments), "preview", "decode"), 1)
    for index in range(len(segments) - 1):  # each switch of model went through the results location
        assert (toy.data_dir / "results" / job["id"] / handoff(index).file).is_file(), index
    assert read_mp4(toy.http.get(f"/v1/videos/{job['id']}/content").content).shape == (17, 64, 64, 3)
    assert toy.http.get(f"/v1/videos/{job['id']}/preview").status_code == 200

    latents = torch.from_numpy(np.load(io.BytesIO(toy.http.get(f"/v1/videos/{job['id']}/latents").content)))
    reference = toy.engine.generate(VideoRequest(**request).resolve(toy.engine.config.defaults), decode=False)
    error = float((latents.double() - reference.latents.double()).norm() / reference.latents.double().norm())
    assert error <= TOLERANCE, error


def test_three_segment_schedule_served(toy):
    check_served(toy, {"prompt": PROMPT, "seed": 5, "switch": "step:4:18"},
                 [("sketch", 0, 4), ("render", 4, 18), ("sketch.2", 18, 20)])


def test_quality_target_served_as_its_calibrated_schedule(toy):
    from serve.calibration import load_calibration
    from serve.models import PRESETS
    from serve.request import VideoRequest
    from serve.switch import make_plan

    request = {"prompt": PROMPT, "seed": 6, "switch": "quality:0.94"}
    chosen = load_calibration(PRESETS["toy"].calibration).schedule_for(0.94)
    plan = make_plan(VideoRequest(**{**request, "switch": chosen.switch}).resolve(PRESETS["toy"].defaults))
    segments = [(name, s.start, s.stop) for name, s in zip(plan.names, plan.segments)]
    assert 0 < segments[0][2] < 20  # the calibration chose a mixed schedule, not one model alone
    check_served(toy, request, segments)

