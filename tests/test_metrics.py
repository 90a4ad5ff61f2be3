"""The app's metrics on Ray's Prometheus endpoint after one job, and the Grafana dashboard built for their names.

The job runs through the real app on the session's local Ray; the test then scrapes the node's metrics export port
(the one Ray reports for the node) until Ray's exporter has published the stages' series (it reports every few
seconds).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

from deployments.metrics import METRICS, PROMETHEUS_PREFIX

DASHBOARD = Path(__file__).parent.parent / "deployments" / "grafana_dashboard.json"
APP = "srd-metrics"
STAGE = {"resources": {"num_cpus": 0.5}, "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def series(body: str, name: str) -> list[str]:
    """Sample lines of one metric (a histogram's `_count` lines stand for it), with their labels."""
    name = PROMETHEUS_PREFIX + name
    return [line for line in body.splitlines()
            if line.startswith((name + "{", name + "_count{", name + "_total{")) and not line.startswith("#")]


def label(line: str, key: str) -> str | None:
    match = re.search(rf'[{{,]{key}="([^"]*)"', line)
    return match.group(1) if match else None


def test_one_job_publishes_per_stage_series(serve_http, tiny_models, tmp_path, make_params):
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppConfig

    config = AppConfig.model_validate({
        "engine": {"preset": "tiny"}, "jobs": {"data_dir": str(tmp_path)},
        "encoder": STAGE, "sketcher": STAGE, "renderer": STAGE, "decoder": STAGE,
    })
    handle = serve.run(build_app(config), name=APP, route_prefix=None)
    try:
        result = handle.generate.remote({"prompt": "a red ball", "height": 32, "width": 32, "num_frames": 5,
                                         "num_inference_steps": 4, "switch": "step:1", "seed": 0}).result()
        assert result.job.status == "completed", result.job
        port = ray.nodes()[0]["MetricsExportPort"]
        wanted = {"srd_stage_queue_depth", "srd_stage_batch_size", "srd_stage_step_seconds", "srd_stage_seconds"}
        deadline, body = time.monotonic() + 90, ""
        while time.monotonic() < deadline:
            body = scrape(port)
            stages = {name: {label(line, "stage") for line in series(body, name)} for name in wanted}
            if all({"encode", "sketch", "render", "decode"} <= found for found in stages.values()) \
                    and series(body, "srd_jobs"):
                break
            time.sleep(1.0)
        for name in wanted:
            assert {"encode", "sketch", "render", "decode"} <= {label(line, "stage") for line in series(body, name)}, \
                (name, series(body, name))
        # one step per sketch (K=1) and three per render, each timed once: counts, not timings
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
        assert not series(body, "srd_gpu_utilization_percent")  # fake GPUs: NVML stays quiet
    finally:
        serve.delete(APP)


def test_dashboard_charts_every_metric_by_its_exported_name():
    """Every metric of deployments/metrics.py has a panel, and every name a panel queries is one of them (a
    histogram's _bucket/_count/_sum series stand for it)."""
    exprs = " ".join(target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
                     for target in panel.get("targets", []))
    charted, unknown = set(), set()
    for token in re.findall(rf"{PROMETHEUS_PREFIX}(srd_\w+)", exprs):
        base = next((token.removesuffix(s) for s in ("", "_bucket", "_count", "_sum", "_total")
                     if token.removesuffix(s) in METRICS), None)
        if base is None:
            unknown.add(token)
        else:
            charted.add(base)
    assert not unknown and charted == set(METRICS), (unknown, set(METRICS) - charted)
