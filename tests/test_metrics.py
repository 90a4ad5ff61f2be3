"""The Grafana dashboard built for the app's metric names (tests/test_app.py scrapes the metrics themselves from
Ray's Prometheus endpoint after a job through its app)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deployments.metrics import METRICS, PROMETHEUS_PREFIX

DASHBOARD = Path(__file__).parent.parent / "deployments" / "grafana_dashboard.json"


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


RAY_EXPORT = """# HELP ray_srd_jobs_total Jobs that reached a final status, by status.
# TYPE ray_srd_jobs_total counter
ray_srd_jobs_total{NodeAddress="10.0.0.{node}",status="completed"} 2.0
# HELP ray_srd_stage_seconds Seconds of one batched engine call of a stage.
# TYPE ray_srd_stage_seconds histogram
ray_srd_stage_seconds_bucket{NodeAddress="10.0.0.{node}",le="0.05",stage="sketch"} 0.0
ray_srd_stage_seconds_count{NodeAddress="10.0.0.{node}",stage="sketch"} 1.0
ray_srd_stage_seconds_sum{NodeAddress="10.0.0.{node}",stage="sketch"} 0.7
# HELP ray_node_cpu_utilization Total CPU usage.
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{NodeAddress="10.0.0.{node}"} 12.5
"""


def test_get_metrics_merges_the_app_families_of_every_node():
    """GET /metrics (deployments/metrics.py `app_exposition`) keeps the srd families of each node's export, each
    family's HELP and TYPE once with every node's samples, and says when no GPU gauge is there."""
    from deployments.metrics import NO_GPU_NOTE, merge_app_families

    text = merge_app_families([RAY_EXPORT.replace("{node}", "1"), RAY_EXPORT.replace("{node}", "2")])
    lines = text.splitlines()
    assert "ray_node_cpu_utilization" not in text  # Ray's own series stay on Ray's port
    assert lines.count("# TYPE ray_srd_stage_seconds histogram") == 1
    assert [line.split("{")[0] for line in lines if not line.startswith("#")] == \
        ["ray_srd_jobs_total"] * 2 + ["ray_srd_stage_seconds_bucket", "ray_srd_stage_seconds_count",
                                      "ray_srd_stage_seconds_sum"] * 2
    # samples follow their own family's TYPE line (Prometheus rejects a family split in two)
    assert lines.index("# TYPE ray_srd_stage_seconds histogram") < lines.index(
        'ray_srd_stage_seconds_bucket{NodeAddress="10.0.0.1",le="0.05",stage="sketch"} 0.0')
    assert text.endswith(NO_GPU_NOTE)
    gpu = '# TYPE ray_srd_gpu_utilization_percent gauge\nray_srd_gpu_utilization_percent{gpu_id="0"} 97.0\n'
    assert NO_GPU_NOTE not in merge_app_families([gpu])
