"""Simulated runs for bench/RESULTS.md: the validation against measured runs, and the cluster sizes nobody can
measure here (`srd simulate` runs one config; this script runs the sets and writes the tables and plots).

    python -m bench.simulate --parts validate,layouts,policies --gpus 8,32,256 --out bench/results/2026-12-08-simulate

Parts:
- validate: bench/scenarios/one-gpu-h100.yaml (one request alone, then 3 at once) and load-faults-cpu.yaml, each
  beside the figures of the run it reproduces (quoted from bench/RESULTS.md below, with the row they come from).
- layouts: at each size, the planner's sketch:render split against all-14B on the same GPUs (both fixed at their
  replicas, the same cost table, so the same levers): throughput with 30 videos per GPU queued at once, and p95
  under Poisson arrivals at 70% of the planner's capacity for two hours (the same arrivals for both).
- policies: at each size, the planner's layout autoscaled (min 1 replica, max the plan) by the cost-aware policy
  against Ray's default request-count policy, under a bursty trace (3 x: 30 min at 25% of the planner's capacity,
  20 min at 120%; written to `--out` as bursty-GPUS.jsonl), the same file for both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.harness import fmt, git_commit, markdown
from deployments.simulate.report import plot_run, plot_sweep
from deployments.simulate.config import WorkloadConfig
from deployments.simulate.run import load_config, simulate
from deployments.simulate.workload import arrivals, write_trace
from serve.placement import CARDS, plan

SCENARIOS = Path(__file__).with_name("scenarios")

# The measured runs the validation reproduces (bench/RESULTS.md; the row each comes from is named).
MEASURED = {
    "one request alone": {"row": "Serving through the placement planner's layout, 2026-12-07: one request alone",
                          "latency_s": 17.87},
    "3 at once": {"row": "same run: 3 concurrent", "makespan_s": 52.1, "videos_per_hour": 207.4},
    "load with faults": {"row": "Load with faults, 2026-12-02", "p50_s": 43.09, "p90_s": 56.68, "p99_s": 58.47,
                         "makespan_s": 62.4, "renderer_killed_at_s": 10.12, "orchestrator_killed_at_s": 45.57},
}


def _run(name: str, overrides: dict) -> dict:
    return simulate(load_config(SCENARIOS / name, overrides), SCENARIOS)


def validate() -> tuple[list[list], dict]:
    rows, results = [], {}
    lone = _run("one-gpu-h100.yaml", {"name": "one-gpu-lone", "workload": {"count": 1}})
    three = _run("one-gpu-h100.yaml", {})
    faults = _run("load-faults-cpu.yaml", {})
    results.update({"one-gpu-lone": lone, "one-gpu-3": three, "load-faults": faults})
    cls = faults["classes"]["default"]

    def row(what, measured, simulated, source):
        rows.append([what, fmt(measured, "{:.2f}"), fmt(simulated, "{:.2f}"),
                     f"{100 * (simulated / measured - 1):+.1f}%", source])

    row("one request alone, latency s", MEASURED["one request alone"]["latency_s"],
        lone["classes"]["default"]["p50_s"], "one-gpu-h100.yaml, count 1")
    row("3 at once, makespan s", MEASURED["3 at once"]["makespan_s"], three["makespan_s"], "one-gpu-h100.yaml")
    row("3 at once, videos/hour", MEASURED["3 at once"]["videos_per_hour"], three["videos_per_hour"],
        "one-gpu-h100.yaml")
    m = MEASURED["load with faults"]
    for key in ("p50_s", "p90_s", "p99_s"):
        row(f"100 jobs with kills, completion {key[:-2]} s", m[key], cls[key], "load-faults-cpu.yaml")
    row("100 jobs with kills, makespan s", m["makespan_s"], faults["makespan_s"], "load-faults-cpu.yaml")
    row("Renderer killed at s (fitted: call_s)", m["renderer_killed_at_s"], faults["faults"][0]["killed_at_s"],
        "load-faults-cpu.yaml")
    row("Orchestrator killed at s", m["orchestrator_killed_at_s"], faults["faults"][1]["killed_at_s"],
        "load-faults-cpu.yaml")
    return rows, results


def _planned_rate(gpus: int) -> float:
    """The planner's videos/hour for the preset's default request on `gpus` H200s."""
    return plan(gpus, CARDS["h200"], 480, 832, 81, 50, 10).videos_per_hour


def layouts(sizes: list[int]) -> tuple[list[dict], dict]:
    rows, results = [], {}
    for gpus in sizes:
        rate = _planned_rate(gpus)
        base = {"cluster": {"gpus": gpus}, "layout": {"orchestrators": max(1, gpus // 64)}}
        for variant, layout, mix in (("planner split", "plan", {}), ("all-14B", "all-sketch", {"switch": "step:50"})):
            common = {**base, "layout": {**base["layout"], "kind": layout}}
            mix_doc = [{"request": mix}]
            saturated = _run("h200-480p.yaml", {**common, "name": f"{variant}-{gpus}-saturated",
                                                "workload": {"kind": "at-once", "count": 30 * gpus, "mix": mix_doc}})
            poisson = _run("h200-480p.yaml", {**common, "name": f"{variant}-{gpus}-poisson70",
                                              "workload": {"kind": "poisson", "rate_per_hour": 0.7 * rate,
                                                           "duration_s": 7200, "mix": mix_doc}})
            results[f"{variant}-{gpus}-saturated"], results[f"{variant}-{gpus}-poisson70"] = saturated, poisson
            rows.append({"variant": variant, "gpus": gpus, "planned": rate,
                         "videos_per_hour": saturated["videos_per_hour"],
                         "busy": saturated["device_busy_share"], "p95_s": poisson["classes"]["default"]["p95_s"],
                         "p50_s": poisson["classes"]["default"]["p50_s"],
                         "completed_2h": poisson["completed"], "jobs_2h": poisson["jobs"],
                         "cost": saturated["cost_per_video"]})
    return rows, results


def bursty_trace(gpus: int, folder: Path) -> Path:
    """The bursty arrivals for `gpus` written as a trace (every request the preset's default), so that both
    policies replay the same file."""
    rate = _planned_rate(gpus)
    phases = [{"duration_s": 1800, "rate_per_hour": 0.25 * rate}, {"duration_s": 1200, "rate_per_hour": 1.2 * rate}]
    config = WorkloadConfig(kind="phases", phases=phases, repeat=3)
    path = folder / f"bursty-{gpus}.jsonl"
    write_trace(path, [(a.t, {}, a.klass, a.priority) for a in arrivals(config, seed=0)])
    return path


def policies(sizes: list[int], folder: Path) -> tuple[list[dict], dict]:
    rows, results = [], {}
    for gpus in sizes:
        trace = bursty_trace(gpus, folder)
        for variant, policy in (("cost-aware", "app"), ("Ray default", "ray-default")):
            result = _run("h200-480p.yaml", {
                "name": f"{variant}-{gpus}-bursty", "cluster": {"gpus": gpus},
                "layout": {"policy": policy, "orchestrators": max(1, gpus // 64)},
                "workload": {"kind": "trace", "trace": str(trace.resolve())}})
            results[result["name"]] = result
            stages = result["stages"]
            rows.append({"variant": variant, "gpus": gpus, "videos_per_hour": result["videos_per_hour"],
                         "p50_s": result["classes"]["default"]["p50_s"],
                         "p95_s": result["classes"]["default"]["p95_s"],
                         "slo": result["classes"]["default"]["slo_attainment"],
                         "peak": f"{stages['Sketcher']['peak_replicas']} + {stages['Renderer']['peak_replicas']}",
                         "gpu_hours": result["gpu_hours_held"], "cost": result["cost_per_video"],
                         "jobs": result["jobs"], "completed": result["completed"]})
    return rows, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="validate,layouts,policies")
    parser.add_argument("--gpus", default="8,32,256", help="Cluster sizes for layouts and policies.")
    parser.add_argument("--out", default=None, help="Folder for the JSON and the plots.")
    args = parser.parse_args(argv)
    parts, sizes = args.parts.split(","), [int(g) for g in args.gpus.split(",")]
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    doc: dict = {"commit": git_commit(), "argv": argv, "runs": {}}
    if "validate" in parts:
        rows, results = validate()
        doc["runs"].update(results)
        print(markdown(["figure", "measured", "simulated", "off", "config"], rows) + "\n")
    if "layouts" in parts:
        rows, results = layouts(sizes)
        doc["runs"].update(results)
        doc["layouts"] = rows
        print(markdown(["GPUs", "layout", "videos/hour (30/GPU at once)", "planner's closed form", "device busy",
                        "p50 / p95 s at 70% load", "completed of arrivals (2 h)", "GPU-h per video"],
                       [[r["gpus"], r["variant"], fmt(r["videos_per_hour"], "{:.1f}"), fmt(r["planned"], "{:.1f}"),
                         fmt(r["busy"], "{:.2f}"), f"{r['p50_s']:.0f} / {r['p95_s']:.0f}",
                         f"{r['completed_2h']} / {r['jobs_2h']}", fmt(r["cost"], "{:.4f}")] for r in rows]) + "\n")
        if out:
            plot_sweep(rows, out / "layouts.png", "planner split vs all-14B (H200, 480p, N=50): throughput with "
                       "30 videos/GPU queued; p95 at 70% of the planner's capacity")
    if "policies" in parts:
        rows, results = policies(sizes, out or Path(tempfile.mkdtemp()))
        doc["runs"].update(results)
        doc["policies"] = rows
        print(markdown(["GPUs", "policy", "videos/hour", "p50 / p95 s", "SLO 600 s met", "peak sketch + render",
                        "GPU-hours held", "GPU-h per video", "completed"],
                       [[r["gpus"], r["variant"], fmt(r["videos_per_hour"], "{:.1f}"),
                         f"{r['p50_s']:.0f} / {r['p95_s']:.0f}", f"{100 * r['slo']:.1f}%", r["peak"],
                         fmt(r["gpu_hours"], "{:.1f}"), fmt(r["cost"], "{:.4f}"), f"{r['completed']} / {r['jobs']}"]
                        for r in rows]) + "\n")
        if out:
            plot_sweep(rows, out / "policies.png", "cost-aware vs Ray default, bursty load (H200, 480p, N=50)")
            for name, result in results.items():
                if name.endswith("-32-bursty"):
                    plot_run(result, out / f"{name.replace(' ', '-').lower()}.png")
    if out:
        for name, result in doc["runs"].items():
            result.pop("latencies", None)  # the plots have them; the JSON stays small
            if not name.endswith("-32-bursty"):
                result.pop("timeline", None)
        (out / "simulate.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
