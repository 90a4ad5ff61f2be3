"""LoRA adapters through the Serve app, over HTTP, on the session's local Ray (tiny preset).

One test, one app: a sketch adapter and a render adapter (made here with PEFT, tests/test_lora.py's way); jobs
name them per stage. The Sketcher's LRU loads its adapter once and hits it afterwards, as its replica's
`srd_lora_*` series on `GET /metrics` say; the Renderer's replica is killed mid-render (test_app_faults.py's way)
and the job resumes from its hand-off with the same adapters, so its latents equal the in-process engine's with
those adapters (and differ from the same request's without them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).parent))  # pytest imports test modules by path (importlib): reuse by name
from test_app import label, scrape, series  # noqa: E402
from test_app_faults import (JOB_S, STAGE, TRIES, actor_names, app_config, in_stage,  # noqa: E402
                             latents_over_http, replaced, submit, wait_for)

APP = "srd-lora"
TOLERANCE = 1e-5
ADAPTERS = {"sketch_loras": [{"name": "motion", "scale": 0.9}], "render_loras": [{"name": "texture"}]}
SHORT = {"prompt": "a lora clip", "seed": 4, "height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 6,
         "switch": "step:3", **ADAPTERS}
RENDER_LONG = {"prompt": "a long lora clip", "seed": 5, "height": 64, "width": 64, "num_frames": 17,
               "num_inference_steps": 100, "switch": "step:5", **ADAPTERS}


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory) -> dict:
    from serve.lora import save_random_adapter
    from serve.tiny import tiny_transformer

    root = tmp_path_factory.mktemp("app-loras")
    return {
        "motion": {"path": save_random_adapter(tiny_transformer(4, 2, seed=0), root / "motion", seed=21, std=0.1),
                   "stage": "sketch"},
        "texture": {"path": save_random_adapter(tiny_transformer(2, 1, seed=0), root / "texture", seed=22, std=0.1),
                    "stage": "render"},
    }


@pytest.fixture(scope="module")
def app(serve_http, loras, tmp_path_factory):
    import httpx

    from deployments.app import build_app
    from deployments.config import AppConfig

    config = app_config({"data_dir": str(tmp_path_factory.mktemp("srd-lora-app"))})
    config["engine"] = {"preset": "tiny", "loras": loras}
    config["sketcher"] = config["renderer"] = {**STAGE, "batching": {"max_batch_size": 2, "batch_wait_timeout_s": 0.0}}
    serve.run(build_app(AppConfig.model_validate(config)), name=APP, route_prefix="/")
    try:
        with httpx.Client(base_url=serve_http, timeout=60) as http:
            yield http
    finally:
        serve.delete(APP)


def kill_renderer() -> tuple[str, str]:
    (actor,) = actor_names(f"SERVE_REPLICA::{APP}#Renderer#")
    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
    ray.kill(handle, no_restart=True)
    return actor["name"], handle._actor_id.hex()


def lora_counts(http, stage: str, timeout_s: float = 60.0, until=lambda counts: True) -> dict:
    """{(kind, adapter): count} of this app's `srd_lora_*` series for `stage`, scraped until `until(counts)`
    (Ray's export publishes every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = scrape(http)
        counts: dict = {}
        for kind in ("loads", "hits", "evictions"):
            for line in series(body, f"srd_lora_{kind}"):
                if label(line, "application") == APP and label(line, "stage") == stage:
                    key = (kind, label(line, "adapter"))
                    counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
        if until(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


def test_per_stage_adapters_their_lru_in_the_metrics_and_a_killed_renderer_resumes_with_them(app, loras, rel_err):
    from serve.engine import Engine, EngineConfig
    from serve.request import VideoRequest

    config = EngineConfig(preset="tiny", loras=loras)
    engine = Engine(config)

    def reference(request: dict):
        params = VideoRequest(**request).resolve(config.defaults, loras=config.loras)
        return engine.generate(params, decode=False).latents

    listed = app.get("/v1/models").json()["data"][0]["loras"]
    assert {(a["name"], a["stage"]) for a in listed} == {("motion", "sketch"), ("texture", "render")}
    refused = app.post("/v1/videos", json={**SHORT, "render_loras": [{"name": "motion"}]})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "render_loras.0.name"

    first = wait_for(app, submit(app, SHORT))  # loads both adapters
    assert first["status"] == "completed", first
    assert first["request"]["sketch_loras"] == [{"name": "motion", "scale": 0.9}]
    assert rel_err(latents_over_http(app, first["id"]), reference(SHORT)) <= TOLERANCE

    for _ in range(TRIES):  # the second job's sketch hits the loaded adapter; its render is killed mid-way
        job_id = submit(app, RENDER_LONG)
        job = wait_for(app, job_id, until=in_stage("render", min_steps=5))
        if job["status"] != "in_progress":
            continue
        killed = kill_renderer()
        job = wait_for(app, job_id, timeout_s=JOB_S)
        assert job["status"] == "completed", job
        assert replaced(killed)
        if job["stages"]["render"]["attempts"] >= 2:
            break
    else:
        raise AssertionError(f"in {TRIES} tries no kill of the Renderer landed inside the render stage")
    assert job["stages"]["sketch"]["attempts"] == 1  # resumed from the hand-off: the sketch did not run again
    expected = reference(RENDER_LONG)
    assert rel_err(latents_over_http(app, job_id), expected) <= TOLERANCE
    without = {k: v for k, v in RENDER_LONG.items() if k != "render_loras"}
    assert rel_err(expected, reference(without)) > 100 * TOLERANCE  # the render adapter shapes the result

    sketch = lora_counts(app, "sketch", until=lambda c: c.get(("hits", "motion"), 0) >= 1)
    assert sketch.get(("loads", "motion")) == 1 and sketch.get(("hits", "motion"), 0) >= 1, sketch
    render = lora_counts(app, "render", until=lambda c: c.get(("loads", "texture"), 0) >= 1)
    assert render.get(("loads", "texture"), 0) >= 1, render
    replacement = serve.get_deployment_handle("Renderer", APP).stats.remote().result()["loras"]
    assert replacement["loads"] == {"texture": 1} and replacement["loaded"] == ["texture"]  # loaded it again
