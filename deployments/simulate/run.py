"""`srd simulate`: read a run's config (YAML), build the layout with the app's planner, generate or read the
arrivals, simulate, write the figures (JSON) and the run's plot (PNG).

Importing this package imports Ray's autoscaling-policy module (for the app's own policy code) but never starts
Ray: no `ray.init`, no Serve controller; tests/test_simulate.py checks that."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from deployments.simulate.config import SimConfig
from deployments.simulate.engine import Simulation
from deployments.simulate.layout import build_layout
from deployments.simulate.report import plot_run, summary
from deployments.simulate.rules import load_rule
from deployments.simulate.workload import arrivals


def load_config(path: Path, overrides: dict | None = None) -> SimConfig:
    """A run's config from YAML, with `overrides` merged in (nested dicts merge, other values replace)."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    return SimConfig.model_validate(merge(doc, overrides or {}))


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def simulate(config: SimConfig, config_dir: Path | None = None) -> dict:
    """One run: its summary (report.summary)."""
    cluster = config.cluster
    layout = build_layout(config.layout, cluster.gpus, cluster.card, config.workload.preset, config_dir)
    jobs = arrivals(config.workload, config.seed, config_dir)
    return summary(Simulation(config, layout, jobs, load_rule(config.priority_rule)).run())


def describe(result: dict) -> list[str]:
    """A few lines for a terminal."""
    lines = [f"{result['name']}: {result['gpus']} x {result['card']}, layout {result['layout']}, "
             f"policy {result['policy']}", *(f"  {line}" for line in result["layout_lines"])]
    vph, cost = result["videos_per_hour"], result["cost_per_video"]
    lines.append(f"jobs {result['jobs']}: completed {result['completed']}, failed {result['failed']}, refused "
                 f"{result['refused']}, unfinished {result['unfinished']}; makespan {result['makespan_s']:.1f} s; "
                 f"{vph:.1f} videos/hour; cost/video {cost:.3f}" if vph else "no job completed")
    for klass, c in result["classes"].items():
        slo = "" if c["slo_attainment"] is None else f", SLO {c['slo_s']:g} s met by {100 * c['slo_attainment']:.1f}%"
        if c["completed"]:
            lines.append(f"class {klass}: p50 {c['p50_s']:.1f} s, p95 {c['p95_s']:.1f} s, p99 {c['p99_s']:.1f} s"
                         + slo)
    lines.append("busy share: " + ", ".join(f"{name} {s['busy_share']:.2f} (peak {s['peak_replicas']} replicas)"
                                            for name, s in result["stages"].items())
                 + f"; devices {result['device_busy_share']:.2f}")
    for fault in result["faults"]:
        lines.append(f"fault: {fault['deployment']} killed at {fault['killed_at_s']:.1f} s "
                     f"({fault['jobs_finished_then']} jobs finished), back at {fault['back_at_s']:.1f} s")
    return lines


def simulate_command(config_path: str, trace: str | None, out: str | None) -> None:
    """`srd simulate --config FILE [--trace FILE] [--out DIR]`."""
    path = Path(config_path)
    overrides = {"workload": {"kind": "trace", "trace": str(Path(trace).resolve())}} if trace else {}
    config = load_config(path, overrides)
    result = simulate(config, path.parent)
    print("\n".join(describe(result)))
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{config.name}.json").write_text(json.dumps(result, indent=1))
        plot_run(result, folder / f"{config.name}.png")
        print(f"wrote {folder / config.name}.json and .png")
