"""The latency-class benchmark (bench/latency_classes.py): its arrival traces and quantiles, and the whole script with
--smoke (CPU, toy preset at 4 steps, seconds-long traces) through the stage deployments, the drive loop and the HTTP
API on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import latency_classes as bench


def test_traces_are_seeded_and_quantiles_take_the_nearest_rank():
    args = bench.parse_args(["--smoke"])
    first = bench.trace(args, 2.0, 30.0, seed=1, share=0.2)
    assert first == bench.trace(args, 2.0, 30.0, seed=1, share=0.2) != bench.trace(args, 2.0, 30.0, 2, 0.2)
    assert all(0 < t < 30 for t, _ in first) and [t for t, _ in first] == sorted(t for t, _ in first)
    assert 0 < sum(1 for _, interactive in first if interactive) < len(first)
    assert bench.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert bench.percentile([float(i) for i in range(1, 21)], 0.95) == 19.0
    assert bench.percentile([], 0.95) is None


@pytest.mark.parametrize("flag,value", [("--load", "0"), ("--floor", "1.5"), ("--batch", "0")])
def test_a_bad_flag_is_one_line_and_exit_2(flag, value):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args([flag, value])
    assert exit_info.value.code == 2


def test_smoke_runs_every_part(tmp_path):
    """In its own process (it starts its own event loop, API server and stage deployments): every part runs,
    no job is lost, and no elastic request falls below its floor."""
    out = tmp_path / "classes.json"
    done = subprocess.run([sys.executable, "-m", "bench.latency_classes", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    parts = doc["parts"]
    assert not [name for name, part in parts.items() if "error" in part or "skipped" in part], parts
    for mode in ("with_classes", "without_classes"):
        row = parts["classes"][mode]
        assert row["batch_lost"] == 0 and row["batch_completed"] == row["batch_submitted"] > 0
    assert parts["classes"]["without_classes"]["preemptions"] == 0  # one class: nothing to yield to
    for mode in ("fixed", "elastic"):
        assert parts["elastic"][mode]["lost"] == 0 and parts["elastic"][mode]["below_floor"] == 0
    assert list(parts["elastic"]["fixed"]["schedules"]) == parts["elastic"]["ladder"][:1]
    assert "| with classes |" in doc["table"]
