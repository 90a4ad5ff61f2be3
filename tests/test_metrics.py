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
