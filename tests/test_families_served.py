"""The other model families through the app's parts, end to end over the HTTP API: Wan2.2's two experts (high-noise
sketches, low-noise renders, boundary switch, two guidance scales) and CogVideoX (the 5B-like model sketches, the
2B-like one renders), each on its tiny preset. The routes, the drive loop and the stage deployments run in this
process (tests/conftest.py `InProcessApp`; what Serve adds is the same for every family, test_app.py); the
hand-off goes through the results location as for Wan2.1, and the final latents equal the in-process engine's
(float32, relative error <= 1e-5)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

TOLERANCE = 1e-5
CASES = {
    "tiny-wan2.2": {"prompt": "a red ball", "seed": 3, "height": 32, "width": 32, "num_frames": 5,
                    "num_inference_steps": 6, "guidance_scale": 4.0, "guidance_scale_2": 2.0},
    "tiny-cogvideox": {"prompt": "a red ball", "seed": 4, "height": 32, "width": 32, "num_frames": 9,
                       "num_inference_steps": 6, "switch": "step:2"},
}


def wait_for(http, job_id: str, timeout_s: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/v1/videos/{job_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.mark.parametrize("preset", sorted(CASES))
def test_family_served_end_to_end(preset, tmp_path, loop, in_process_app):
    from deployments.config import AppConfig
    from deployments.ingress import VideoService, make_api
    from serve.engine import Engine, EngineConfig
    from serve.models import PRESETS
    from serve.pipeline.artifacts import HANDOFF
    from serve.request import VideoRequest
    from serve.video import read_mp4

    config = AppConfig.model_validate({"engine": {"preset": preset}, "jobs": {"data_dir": str(tmp_path),
                                                                              "poll_interval_s": 0.05}})
    app = in_process_app(config.engine, config.jobs, loop)
    app.start()
    try:
        with TestClient(make_api(VideoService(config))) as http:
            request = CASES[preset]
            created = http.post("/v1/videos", json=request)
            assert created.status_code == 200, created.text
            job = wait_for(http, created.json()["id"])
            assert job["status"] == "completed", job["error"]
            assert job["model"] == preset and job["switch_step"] is not None
            assert {s: r["attempts"] for s, r in job["stages"].items()} == dict.fromkeys(
                ("encode", "sketch", "preview", "render", "decode"), 1)
            assert (tmp_path / "results" / job["id"] / HANDOFF.file).is_file()  # the hand-off went through the store
            video = read_mp4(http.get(f"/v1/videos/{job['id']}/content").content)
            assert video.shape == (request["num_frames"], 32, 32, 3)
            latents = torch.from_numpy(np.load(io.BytesIO(http.get(f"/v1/videos/{job['id']}/latents").content)))
            assert latents.shape[:3] == (1, 16 if preset == "tiny-wan2.2" else 4, (request["num_frames"] - 1) // 4 + 1)
            if preset == "tiny-cogvideox":  # the family's own limits are a 422 naming the field, before admission
                refused = http.post("/v1/videos", json={**request, "num_frames": 5})
                assert refused.status_code == 422 and refused.json()["error"]["param"] == "num_frames", refused.text
    finally:
        app.close()

    engine = Engine(EngineConfig(preset=preset))
    params = VideoRequest(**request).resolve(PRESETS[preset].defaults)
    reference = engine.generate(params, decode=False)
    assert reference.switch_step == job["switch_step"]
    error = float((latents.double() - reference.latents.double()).norm() / reference.latents.double().norm())
    assert error <= TOLERANCE, error
