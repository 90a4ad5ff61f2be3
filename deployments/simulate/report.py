"""What a simulated run gives: videos per hour, latency percentiles and SLO attainment per class, each stage's busy
share, replicas over time, cost per video; and the two plots (a run over time, a sweep over cluster sizes).
matplotlib comes with the `bench` extra and is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path

from deployments.simulate.engine import Simulation


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100), None for no values; the benchmarks' definition (bench/load_faults.py
    imports it), so that simulated and measured percentiles compare."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def summary(sim: Simulation) -> dict:
    """The run's figures as one JSON-able dict."""
    config, jobs = sim.config, sim.jobs
    done = [j for j in jobs if j.status == "completed"]
    first = min((j.arrival.t for j in jobs), default=0.0)
    last = max((j.done_at for j in jobs if j.done_at is not None), default=first)
    makespan = last - first
    classes = {}
    for klass in sorted({j.arrival.klass for j in jobs}):
        members = [j for j in jobs if j.arrival.klass == klass]
        latency = [j.done_at - j.arrival.t for j in members if j.status == "completed"]
        slo = config.slo_s.get(klass)
        classes[klass] = {
            "jobs": len(members), "completed": len(latency),
            **{f"p{q}_s": percentile(latency, q) for q in (50, 90, 95, 99)},
            "max_s": max(latency, default=None),
            "slo_s": slo,
            "slo_attainment": (sum(1 for t in latency if t <= slo) / len(members)) if slo is not None else None,
        }
    stages = {}
    for name, replicas in sim.replicas.items():
        alive = sum(((r.died if r.died is not None else sim.loop.now) - r.born) for r in replicas)
        gpu_s = sum(((r.died if r.died is not None else sim.loop.now) - r.born) * r.share for r in replicas)
        stages[name] = {"replica_s": alive, "busy_share": sim.replicas and (sum(r.busy_s for r in replicas) / alive
                                                                            if alive else 0.0),
                        "work_s": sim.work_done[name], "gpu_s": gpu_s,
                        "peak_replicas": max((row[f"{name}.ready"] for row in sim.timeline), default=0)}
    gpus = config.cluster.gpus
    device_busy = sum(d.busy_s for d in sim.devices) / (gpus * makespan) if makespan else 0.0
    hours = makespan / 3600
    held_gpu_hours = sum(s["gpu_s"] for s in stages.values()) / 3600  # what an autoscaled app pays for
    return {
        "name": config.name, "gpus": gpus, "card": config.cluster.card, "policy": config.layout.policy,
        "layout": config.layout.kind, "layout_lines": sim.layout.lines,
        "jobs": len(jobs), "completed": len(done), "failed": sum(1 for j in jobs if j.status == "failed"),
        "refused": sum(1 for j in jobs if j.status == "refused"),
        "unfinished": sum(1 for j in jobs if j.status in ("queued", "running", "arriving")),
        "makespan_s": makespan, "videos_per_hour": len(done) / hours if hours else None,
        "classes": classes, "stages": stages, "device_busy_share": device_busy,
        "gpu_hours_held": held_gpu_hours,
        "cost_per_video": config.cluster.price_per_gpu_hour * held_gpu_hours / len(done) if done else None,
        "calls_started": sim.calls_started, "reruns_after_checkpoint": sim.reruns_after_checkpoint,
        "faults": sim.faults_done, "timeline": sim.timeline,
        "latencies": [[j.arrival.t, j.done_at, j.arrival.klass] for j in done],
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(result: dict, path: Path) -> None:
    """A run over time: jobs waiting and running, each stage's replicas, and each job's latency at its end."""
    plt = _pyplot()
    rows = result["timeline"]
    t = [row["t"] / 60 for row in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [r["queued_jobs"] for r in rows], label="jobs queued in the store")
    axes[0].plot(t, [r["running_jobs"] for r in rows], label="jobs being driven")
    axes[0].set_ylabel("jobs")
    axes[0].legend(loc="upper right")
    for name in result["stages"]:
        axes[1].step(t, [r[f"{name}.ready"] for r in rows], where="post", label=name)
    axes[1].set_ylabel("replicas serving")
    axes[1].legend(loc="upper right")
    for klass in sorted({k for *_, k in result["latencies"]}):
        points = [(end / 60, end - start) for start, end, k in result["latencies"] if k == klass]
        axes[2].scatter([p[0] for p in points], [p[1] for p in points], s=4, label=klass)
    axes[2].set_ylabel("latency s (at completion)")
    axes[2].set_xlabel("minutes")
    axes[2].legend(loc="upper right")
    fig.suptitle(f"{result['name']}: {result['gpus']} x {result['card']}, policy {result['policy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    """Throughput and p95 latency against cluster size, one line per variant (rows: variant, gpus, videos_per_hour,
    p95_s)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["gpus"])
        gpus = [r["gpus"] for r in mine]
        left.plot(gpus, [r["videos_per_hour"] for r in mine], marker="o", label=variant)
        right.plot(gpus, [r["p95_s"] for r in mine], marker="o", label=variant)
    for axis, label in ((left, "videos/hour"), (right, "p95 latency s")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("GPUs")
        axis.set_ylabel(label)
        axis.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
