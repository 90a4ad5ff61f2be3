"""The one-GPU serving benchmark (bench/serve_throughput.py): its (d) arithmetic on made-up timestamps, and the whole
script with --smoke (CPU, tiny random-init configs, a fake GPU shared by the four stage replicas) through the real
Serve app on a local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import serve_throughput as bench
from deployments.metrics import METRICS


def _job(t: float, durations: dict[str, float], gaps: list[float]) -> dict:
    """A finished request: submitted at t, then gap, stage, gap, stage, ... gap (5 gaps around 4 stages)."""
    stages, now = {}, t + gaps[0]
    for i, stage in enumerate(bench.STAGES):
        stages[stage] = {"start": now, "end": now + durations[stage], "batch_id": f"{stage}-{t}", "batch_size": 1}
        now += durations[stage] + gaps[i + 1]
    return {"t_submit": t, "t_done": now, "mp4_mb": 1.0,
            "job": {"id": f"video_{t}", "stages": stages, "switch_step": 1}}


def test_breakdown_splits_latency_into_stages_queueing_and_overhead():
    durations = {"encode": 1.0, "sketch": 10.0, "render": 5.0, "decode": 2.0}
    alone = _job(0.0, durations, [0.01, 0.02, 0.1, 0.03, 0.05])
    row = bench.breakdown(alone, [])
    assert row["latency_s"] == pytest.approx(18.21)
    assert row["stage_sum_s"] == pytest.approx(18.0) and row["queueing_s"] == 0
    assert row["overhead_s"] == pytest.approx(0.21) and row["handoff_s"] == pytest.approx(0.15)
    assert row["overhead_pct"] == pytest.approx(100 * 0.21 / 18.21)

    # a second job, submitted with the first, waits for the sketcher, busy with the first job from 1.03 to 11.03 s:
    # 10 s of its 10.03 s gap are queueing, the rest is overhead
    second = _job(0.0, durations, [0.01, 10.03, 0.1, 0.03, 0.05])
    row = bench.breakdown(second, [alone])
    assert row["queued_s"]["encode->sketch"] == pytest.approx(10.0) and row["queueing_s"] == pytest.approx(10.0)
    assert row["overhead_s"] == pytest.approx(0.22) and row["handoff_s"] == pytest.approx(0.16)


def test_covered_merges_overlapping_spans():
    assert bench._covered((0, 10), [(2, 4), (3, 5), (8, 20), (-5, -1)]) == pytest.approx(5.0)


def test_smoke_runs_every_part_through_the_app(tmp_path):
    """In its own process: the script starts and stops a Ray of its own (one fake GPU), which must not meet the
    session's shared one (tests/conftest.py `ray_cluster`)."""
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, "-m", "bench.serve_throughput", "--smoke", "--requests", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    for name in ("setup", "warmup", "single", "sr", "all14b", "mp4", "metrics"):
        assert "error" not in parts[name], (name, parts[name].get("traceback"))
        assert "skipped" not in parts[name], (name, parts[name]["skipped"])
    assert result["meta"]["label"] == "random-init weights, real architecture"

    # every stage replica reserved the planner's share of the same (fake) GPU
    assert {tuple(ids) for ids in parts["setup"]["stage_gpu_ids"].values()} == {("0",)}
    shares = {role: parts["setup"]["app_config"][role]["resources"]["num_gpus"]
              for role in ("encoder", "sketcher", "renderer", "decoder")}
    assert shares == parts["setup"]["placement"]["gpu_share"] and sum(shares.values()) == 1
    # the metrics endpoint carried every series but NVML's, which stays quiet without a real GPU, and the LoRA
    # counters, which have no series until a request names an adapter (this run names none)
    metrics = parts["metrics"]
    assert set(metrics["series_missing"]) == {name for name in METRICS if name.startswith(("srd_gpu_", "srd_lora_"))}
    assert "srd_stage_step_seconds" in metrics["series_found"] and not metrics["gpu_samples"]
    single = parts["single"]
    assert single["switch_step"] == 1 and single["queueing_s"] == 0
    assert single["latency_s"] == pytest.approx(single["stage_sum_s"] + single["overhead_s"])
    sr, full = parts["sr"], parts["all14b"]
    assert sr["M"] == full["M"] == 2 and sr["videos_per_hour"] > 0 and full["videos_per_hour"] > 0
    assert [r["switch_step"] for r in full["requests"]] == [full["N"]] * 2  # all-14B: the renderer ran no steps
    assert [r["switch_step"] for r in sr["requests"]] == [1, 1]
    assert all(r["batch_sizes"]["sketch"] == 1 for r in sr["requests"])
