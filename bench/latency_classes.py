"""Latency classes under a saturating load: interactive latency with and without classes, and load-elastic
switching against a fixed switch.

    python -m bench.latency_classes --out /tmp/classes.json                   # CPU, toy preset, ~10 min on 2 cores
    python -m bench.latency_classes --smoke --out /tmp/classes-smoke.json     # CI: well under a minute
    python -m bench.latency_classes --device cuda --out $OUT/classes.json     # one GPU, the same parts

What runs, in one process: the app's stage deployments (deployments/stage.py: the real `@serve.batch` queues, device
turns and preemption of deployments/batching.py) on an event loop, a drive loop as the orchestrator runs it
(serve/jobs/drive.py, with the Planner's load signal and `fix_switch`), and the HTTP API (deployments/ingress.py)
served by uvicorn on 127.0.0.1; clients POST /v1/videos on loopback. No Ray: on two CPU cores a Ray cluster's own
processes would take the cores the stages need, and the scheduling under test lives in the replica, not in Ray.
Latencies are the job records' (creation to completion, server side). The toy preset: its calibration is what
`floor:T` and the quality cost read.

Each stage replica takes turns on its own device by default, so on a CPU the four stages also time-slice its cores,
as replicas sharing one GPU time-slice it; `--one-device` gives the four stages one `DeviceTurns`, so that work of
any stage takes turns by class on the one device (what the class rules can do when nothing time-slices them).

Parts:
  idle      requests one at a time (after a warm-up): the idle latency, of the interactive class and of the
            elastic part's idle schedule; the service time sets the arrival rate of the loaded parts
  classes   a seeded Poisson trace at `--load` x the idle service rate for `--duration-s`, `--interactive-share`
            interactive and the rest batch, then drained: interactive p50/p95 against the idle p50, every batch job's
            outcome (completed, lost); the same trace again with every request `standard` (no classes), side by side
  elastic   a trace at `--elastic-load` x the idle rate, every request `floor:T`: once with each request's idle choice
            as a fixed switch, once load-elastic; latency target attainment (target = `--target-x` x idle latency),
            the quality of the schedules taken from the toy calibration (mean cost against the idle choice) and how
            many fell below their floor (none may)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import socket
import statistics
import sys
import tempfile
import threading
import time

from bench.harness import Bench, fmt, markdown

PROMPT = "a red ball moving right"


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`; None for none."""
    if not values:
        return None
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q * len(ranked)) - 1)]


class LoopbackApp:
    """The app's stage deployments, one drive loop and the HTTP API in this process; requests over loopback HTTP."""

    def __init__(self, args, data_dir: str):
        import uvicorn
        from ray.serve.batching import _BatchQueue

        from deployments.config import AppConfig
        from deployments.ingress import VideoService, make_api
        from deployments.stage import StageDeployment
        from serve.jobs.drive import Driver, sketch_backlog
        from serve.jobs.store import JobStore
        from serve.pipeline.registry import PIPELINE
        from serve.pipeline.stage import Planner

        # Serve's batch queue runs on any event loop; only its check of max_ongoing_requests reads the replica's
        # deployment config, which exists in a Serve replica alone.
        _BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda queue: None
        self.config = AppConfig.model_validate({
            "engine": {"preset": "toy", "device": args.device, "speed": "exact"},
            "jobs": {"data_dir": data_dir, "poll_interval_s": 0.02, "progress_interval_s": 0.05,
                     "max_unfinished_jobs": 100000,
                     "classes": {"aging_s": args.aging_s, "backlog_per_shift": args.backlog_per_shift}},
            **{name: {"batching": {"max_batch_size": args.batch, "batch_wait_timeout_s": 0.0}}
               for name in ("encoder", "sketcher", "renderer", "decoder")},
        })
        engine, jobs = self.config.engine, self.config.jobs
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="app-loop").start()
        self.store = JobStore(jobs.store, jobs.store_table)

        async def build():
            from deployments.batching import DeviceTurns

            device = DeviceTurns(jobs.classes.aging_s) if args.one_device else None
            hosts = {name: StageDeployment(name, engine, self.config.stage_config(name), jobs, PIPELINE, device)
                     for name in PIPELINE.deployments()}
            by_stage = {stage.name: hosts[stage.deployment] for stage in PIPELINE.stages}

            async def call(step, job_id, params):
                return await by_stage[step.stage].run(step, job_id, params)

            planner = Planner(engine, PIPELINE, backlog=lambda: sketch_backlog(self.store),
                              backlog_per_shift=jobs.classes.backlog_per_shift)
            driver = Driver(self.store, planner.steps, call, jobs, "bench", fix_switch=planner.fix)
            self._driving = asyncio.ensure_future(driver.run())
            return hosts

        self.hosts = asyncio.run_coroutine_threadsafe(build(), self.loop).result(600)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(make_api(VideoService(self.config)), host="127.0.0.1", port=port,
                                               log_level="warning", access_log=False))
        threading.Thread(target=server.run, daemon=True, name="http").start()
        self.url = f"http://127.0.0.1:{port}"
        import httpx

        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API at {self.url} did not answer /healthz")
            time.sleep(0.1)

    def submit(self, body: dict) -> str:
        response = self.http.post("/v1/videos", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"POST /v1/videos answered {response.status_code}: {response.text[:300]}")
        return response.json()["id"]

    def wait(self, job_ids: list[str], timeout_s: float) -> dict:
        """The records of `job_ids` once all are finished (or the timeout passed: then some are not)."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = self.store.get_many(job_ids)
            if all(r.terminal for r in records.values()) or time.monotonic() > deadline:
                return records
            time.sleep(0.1)


def body(args, seed: int, priority: str, switch: str | None = None) -> dict:
    request = {"prompt": PROMPT, "seed": seed, "priority": priority, "num_inference_steps": args.steps,
               "width": args.size, "height": args.size, "num_frames": args.frames}
    return request if switch is None else {**request, "switch": switch}


def latency(record) -> float | None:
    return None if record.completed_at is None else record.completed_at - record.created_at


def trace(args, count_rate: float, duration_s: float, seed: int, share: float) -> list[tuple[float, bool]]:
    """(arrival offset, interactive?) of a seeded Poisson trace."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(count_rate)
    while t < duration_s:
        arrivals.append((t, rng.random() < share))
        t += rng.expovariate(count_rate)
    return arrivals


def replay(app: LoopbackApp, arrivals, make_body) -> list[tuple[str, bool]]:
    """Submit each arrival at its offset; the job ids with their interactive flag."""
    start, submitted = time.monotonic(), []
    for i, (offset, interactive) in enumerate(arrivals):
        time.sleep(max(0.0, start + offset - time.monotonic()))
        submitted.append((app.submit(make_body(i, interactive)), interactive))
    return submitted


def part_idle(rec: dict, app: LoopbackApp, args, ctx: dict) -> None:
    app.wait([app.submit(body(args, 0, "interactive"))], 600)  # warm-up: every stage has run once
    for name, switch in (("interactive", None), ("elastic_idle", f"floor:{args.floor}")):
        latencies = []
        for i in range(args.idle_requests):
            job_id = app.submit(body(args, 100 + i, "interactive", switch))
            latencies.append(latency(app.wait([job_id], 600)[job_id]))
        rec[name] = {"n": len(latencies), "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
                     "mean_s": statistics.mean(latencies)}
    ctx["service_s"] = rec["interactive"]["mean_s"]
    ctx["idle_p50_s"] = rec["interactive"]["p50_s"]
    ctx["elastic_idle_s"] = rec["elastic_idle"]["mean_s"]


def part_classes(rec: dict, app: LoopbackApp, args, ctx: dict) -> None:
    rate = args.load / ctx["service_s"]
    arrivals = trace(args, rate, args.duration_s, args.seed, args.interactive_share)
    rec.update(rate_per_s=rate, requests=len(arrivals), interactive=sum(1 for _, i in arrivals if i))
    for mode in ("with_classes", "without_classes"):
        def make(i, interactive, mode=mode):
            priority = ("interactive" if interactive else "batch") if mode == "with_classes" else "standard"
            return body(args, 1000 + i, priority)

        start = time.time()
        submitted = replay(app, arrivals, make)
        records = app.wait([job_id for job_id, _ in submitted], args.drain_s)
        inter = [latency(records[j]) for j, i in submitted if i and records[j].status == "completed"]
        batch = [records[j] for j, i in submitted if not i]
        rec[mode] = {
            "interactive_p50_s": percentile(inter, 0.5), "interactive_p95_s": percentile(inter, 0.95),
            "interactive_completed": len(inter),
            "batch_submitted": len(batch), "batch_completed": sum(1 for r in batch if r.status == "completed"),
            "batch_lost": sum(1 for r in batch if r.status != "completed"),
            "batch_p50_s": percentile([latency(r) for r in batch if r.status == "completed"], 0.5),
            "preemptions": sum(records[j].preemptions for j, _ in submitted),
            # where interactive jobs spent their time: each step's call to its end (its queue wait included)
            "interactive_step_s": {step: statistics.mean(values) for step, values in _step_times(
                [records[j] for j, i in submitted if i and records[j].status == "completed"]).items()},
            "makespan_s": max((r.completed_at or time.time()) for r in records.values()) - start,
        }
        p95 = rec[mode]["interactive_p95_s"]
        rec[mode]["interactive_p95_over_idle_p50"] = None if p95 is None else p95 / ctx["idle_p50_s"]


def _step_times(records) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for record in records:
        for name, step in record.stages.items():
            if step.start is not None and step.end is not None:
                times.setdefault(name, []).append(step.end - step.start)
    return times


def part_elastic(rec: dict, app: LoopbackApp, args, ctx: dict) -> None:
    from serve.switch import ladder, parse_switch

    calibration = app.config.engine.pair_calibration()
    rungs = [str(p) for p in ladder(parse_switch(f"floor:{args.floor}"), calibration)]
    target_s = args.target_x * ctx["elastic_idle_s"]
    rate = args.elastic_load / ctx["elastic_idle_s"]
    arrivals = trace(args, rate, args.duration_s, args.seed + 1, 0.0)
    rec.update(rate_per_s=rate, requests=len(arrivals), ladder=rungs, target_s=target_s, floor=args.floor)
    best = calibration.quality_of(rungs[0])
    for mode, switch in (("fixed", rungs[0]), ("elastic", f"floor:{args.floor}")):
        submitted = replay(app, arrivals, lambda i, _, switch=switch: body(args, 5000 + i, "standard", switch))
        records = app.wait([job_id for job_id, _ in submitted], args.drain_s)
        done = [r for r in records.values() if r.status == "completed"]
        taken = [r.switch_fixed or switch for r in done]
        qualities = [calibration.quality_of(s) for s in taken]
        rec[mode] = {
            "completed": len(done), "lost": len(records) - len(done),
            "attainment": sum(1 for r in done if latency(r) <= target_s) / max(1, len(records)),
            "p50_s": percentile([latency(r) for r in done], 0.5), "p95_s": percentile([latency(r) for r in done], 0.95),
            "mean_quality": statistics.mean(qualities) if qualities else None,
            "mean_quality_cost": statistics.mean(best - q for q in qualities) if qualities else None,
            "below_floor": sum(1 for q in qualities if q < args.floor),
            "schedules": {s: taken.count(s) for s in sorted(set(taken))},
        }


def table(doc: dict) -> str:
    parts, rows = doc["parts"], []
    idle = parts.get("idle", {}).get("interactive", {})
    classes = parts.get("classes", {})
    for mode in ("without_classes", "with_classes"):
        row = classes.get(mode)
        if row:
            p95 = row["interactive_p95_s"]
            idle_s = f"{fmt(idle.get('p50_s'), '{:.2f}')} / {fmt(idle.get('p95_s'), '{:.2f}')}"
            rows.append([mode.replace("_", " "), idle_s,
                         fmt(p95, "{:.2f}"), fmt(row["interactive_p95_over_idle_p50"], "{:.2f}x"),
                         fmt(None if p95 is None or not idle.get("p95_s") else p95 / idle["p95_s"], "{:.2f}x"),
                         f"{row['batch_completed']}/{row['batch_submitted']}", row["batch_lost"], row["preemptions"],
                         fmt(row["batch_p50_s"], "{:.1f}")])
    text = markdown(["load", "idle p50 / p95 s", "interactive p95 s", "/ idle p50", "/ idle p95", "batch done", "lost",
                     "preemptions",
                     "batch p50 s"], rows)
    elastic, rows = parts.get("elastic", {}), []
    for mode in ("fixed", "elastic"):
        row = elastic.get(mode)
        if row:
            rows.append([mode, f"{row['attainment']:.0%}", fmt(row["p50_s"], "{:.1f}"), fmt(row["p95_s"], "{:.1f}"),
                         fmt(row["mean_quality"], "{:.4f}"), fmt(row["mean_quality_cost"], "{:.4f}"),
                         row["below_floor"], f"{row['completed']}/{row['completed'] + row['lost']}"])
    if rows:
        text += "\n\n" + markdown(["switch", f"within {fmt(elastic.get('target_s'), '{:.1f}')} s", "p50 s", "p95 s",
                                   "mean quality", "quality cost", "below floor", "done"], rows)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.latency_classes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON result file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="seconds-long parts at 4 steps (CI)")
    p.add_argument("--steps", type=int, default=20, help="num_inference_steps of every request")
    p.add_argument("--size", type=int, default=64, help="width = height in pixels")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--batch", type=int, default=4, help="max_batch_size of every stage")
    p.add_argument("--idle-requests", type=int, default=5)
    p.add_argument("--load", type=float, default=3.0, help="arrival rate over the idle service rate (classes)")
    p.add_argument("--elastic-load", type=float, default=3.0, help="the same, for the elastic part")
    p.add_argument("--interactive-share", type=float, default=0.2)
    p.add_argument("--duration-s", type=float, default=60.0, help="length of each trace's arrivals")
    p.add_argument("--drain-s", type=float, default=900.0, help="the longest wait for a trace's jobs to finish")
    p.add_argument("--aging-s", type=float, default=600.0, help="jobs.classes.aging_s of the app")
    p.add_argument("--backlog-per-shift", type=int, default=1, help="jobs.classes.backlog_per_shift of the app")
    p.add_argument("--floor", type=float, default=0.9, help="T of the elastic part's floor:T requests")
    p.add_argument("--target-x", type=float, default=3.0, help="latency target over the idle latency (elastic)")
    p.add_argument("--one-device", action="store_true",
                   help="the four stages take turns on one device (one DeviceTurns), as on a CPU or a GPU they "
                        "share, instead of each computing whenever its own queue has work")
    p.add_argument("--seed", type=int, default=2626)
    p.add_argument("--parts", default="idle,classes,elastic",
                   help="which of classes and elastic to run (idle always runs: it sets their arrival rates)")
    p.add_argument("--budget-s", type=float, default=3000.0)
    args = p.parse_args(argv)
    for name in ("steps", "size", "frames", "batch", "idle_requests", "backlog_per_shift"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    for name in ("load", "elastic_load", "duration_s", "aging_s", "target_x"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, not {getattr(args, name)}")
    unknown = set(args.parts.split(",")) - {"idle", "classes", "elastic"}
    if unknown:
        p.error(f"--parts {args.parts!r}: unknown part(s) {', '.join(sorted(unknown))}; give idle, classes, elastic")
    if not 0 <= args.interactive_share <= 1 or not 0 < args.floor <= 1:
        p.error("--interactive-share must be in [0, 1] and --floor in (0, 1]")
    if args.smoke:
        args.steps, args.size, args.frames, args.idle_requests, args.duration_s = 4, 32, 5, 1, 2.0
        args.load = args.elastic_load = 1.5
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    bench = Bench("bench.latency_classes", argv if argv is not None else sys.argv[1:], args.out, args.budget_s,
                  packages=("torch", "diffusers", "ray", "uvicorn"), device=args.device)
    ctx: dict = {}
    with tempfile.TemporaryDirectory(prefix="srd-classes-") as data_dir:
        app = LoopbackApp(args, data_dir)
        bench.run("idle", 0, part_idle, app, args, ctx)
        for name, part in (("classes", part_classes), ("elastic", part_elastic)):
            if "service_s" in ctx and name in args.parts.split(","):
                bench.run(name, 0, part, app, args, ctx)
    bench.doc["table"] = table(bench.doc)
    bench.save()
    print(bench.doc["table"])
    for line in bench.problems():
        print(line, file=sys.stderr)
    return bench.doc


if __name__ == "__main__":
    doc = main()
    sys.exit(1 if any("error" in part for part in doc["parts"].values()) else 0)
