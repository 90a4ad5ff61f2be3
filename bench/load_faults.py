"""A bounded load run with faults: many concurrent jobs over HTTP on loopback while replicas
are killed, and nothing is lost.

    python -m bench.load_faults --jobs 100 --out bench/results/2026-12-02-load-faults.json

What runs: a local Ray and the Serve app (`deployments.app.build_app`, the tiny preset on the CPU, each stage
replica 0.5 CPU, a fresh data dir with the embedded SQLite job store), its HTTP proxy on a free loopback port.
`--jobs` tiny jobs (each its own prompt and seed) are submitted over HTTP with httpx from `--concurrency` client
threads; a POST is retried only when the connection could not be made (then no job was created). The client then
watches every job through the list endpoint (one GET /v1/videos?limit=100 page at a time) until all are finished or
`--timeout-s` has passed.

Faults (`--kill`, default `Renderer@0.2,Orchestrator@0.5`): when that fraction of the jobs has finished, the named
deployment's replica actor is killed (`ray.kill`, no restart; Serve replaces it). A kill of a stage replica fails the
calls it was running: the orchestrator records the attempt and runs the stage again from its last checkpoint. A
killed orchestrator's jobs are taken over once their leases (`--lease-s`) expire. The timeline records when each
kill happened and when the deployment had a new replica and was HEALTHY again, both in seconds from the first
submission.

Reported: completed, failed, lost (an id whose record is missing, or still unfinished at the end: must be 0),
latency (the job record's created_at -> completed_at) p50/p90/p99/max, makespan, jobs with a retried stage, and the
failures' messages (the result file's part `load`). The numbers depend on the machine: label them with it (the
JSON's `meta.machine`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.harness import Bench, fmt, markdown
from deployments.simulate.report import percentile  # one definition for measured and simulated runs

APP = "srd-load"
TERMINAL = ("completed", "failed")


def parse_kills(text: str) -> list[tuple[str, float]]:
    """"Renderer@0.2,Orchestrator@0.5" -> [("Renderer", 0.2), ("Orchestrator", 0.5)]."""
    kills = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, at = part.partition("@")
        if name not in ("Encoder", "Sketcher", "Renderer", "Decoder", "Orchestrator", "Ingress") or not at:
            raise SystemExit(f"--kill {part!r}: want DEPLOYMENT@FRACTION, DEPLOYMENT one of Encoder, Sketcher, "
                             "Renderer, Decoder, Orchestrator, Ingress")
        kills.append((name, float(at)))
    return sorted(kills, key=lambda k: k[1])


def app_config(args, data_dir: str):
    from deployments.config import AppConfig

    fast = {"health_check_period_s": 1.0, "health_check_timeout_s": 10.0, "graceful_shutdown_timeout_s": 2.0}
    stage = {"resources": {"num_cpus": 0.5}, "serve_options": fast,
             "batching": {"max_batch_size": args.batch, "batch_wait_timeout_s": 0.05}}
    return AppConfig.model_validate({
        "engine": {"preset": "tiny"},
        **{name: stage for name in ("encoder", "sketcher", "renderer", "decoder")},
        "orchestrator": {"serve_options": fast}, "ingress": {"serve_options": fast},
        "jobs": {"data_dir": data_dir, "lease_s": args.lease_s, "max_attempts": 3},
    })


def job_request(args, index: int) -> dict:
    return {"prompt": f"load job {index}: a red ball bouncing", "seed": index, "height": args.size,
            "width": args.size, "num_frames": args.frames, "num_inference_steps": args.steps,
            "switch": f"step:{args.steps // 2}"}


STAGE_OF = {"Encoder": "encode", "Sketcher": "sketch", "Renderer": "render", "Decoder": "decode"}


class Faults:
    """Kills replicas when given fractions of the jobs have finished (a stage replica once a job is in its stage, so
    that the kill hits running work); records the timeline."""

    def __init__(self, kills: list[tuple[str, float]], total: int, t0: float):
        self.todo = list(kills)
        self.total = total
        self.t0 = t0
        self.timeline: list[dict] = []
        self._watchers: list[threading.Thread] = []

    def poll(self, finished: int, stages: dict[str, int]) -> None:
        import ray

        while self.todo and finished >= self.todo[0][1] * self.total:
            name, fraction = self.todo[0]
            if name in STAGE_OF and not stages.get(STAGE_OF[name]) and finished < self.total:
                return  # nothing in that stage just now: look again at the next poll
            self.todo.pop(0)
            (actor,) = replicas(name)
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            event = {"deployment": name, "at_fraction": fraction, "killed_at_s": round(time.time() - self.t0, 2),
                     "jobs_finished_then": finished, "jobs_in_stage_then": dict(stages), "killed": actor["name"],
                     "back_at_s": None, "replacement": None}
            self.timeline.append(event)
            watcher = threading.Thread(target=self._watch, args=(event,), daemon=True)
            watcher.start()
            self._watchers.append(watcher)

    def _watch(self, event: dict, timeout_s: float = 300.0) -> None:
        """Until the deployment has a replica other than the killed one and Serve reports it HEALTHY."""
        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            others = [a["name"] for a in replicas(event["deployment"]) if a["name"] != event["killed"]]
            try:
                status = serve.status().applications[APP].deployments[event["deployment"]].status
            except Exception:  # noqa: BLE001 - the controller is busy: ask again
                status = None
            if others and str(getattr(status, "value", status)) == "HEALTHY":
                event["back_at_s"] = round(time.time() - self.t0, 2)
                event["replacement"] = others[0]
                return
            time.sleep(0.2)

    def join(self, timeout_s: float) -> None:
        for watcher in self._watchers:
            watcher.join(timeout_s)


def replicas(deployment: str) -> list[dict]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def submit_all(http_base: str, requests: list[dict], concurrency: int) -> tuple[list[str], list[str]]:
    import httpx

    def submit(body: dict) -> str:
        with httpx.Client(base_url=http_base, timeout=60) as http:
            for _ in range(60):
                try:
                    response = http.post("/v1/videos", json=body)
                except httpx.ConnectError:  # nothing was sent: safe to retry
                    time.sleep(0.5)
                    continue
                if response.status_code == 200:
                    return response.json()["id"]
                raise RuntimeError(f"POST /v1/videos: {response.status_code} {response.text[:300]}")
            raise RuntimeError("POST /v1/videos: no connection for 30 s")

    ids, errors = [], []
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(submit, body) for body in requests]:
            try:
                ids.append(future.result())
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
    return ids, errors


def snapshot(http) -> dict[str, dict]:
    """Every job of the app, by id (pages of 100 through the list endpoint)."""
    jobs, after = {}, None
    while True:
        query = "/v1/videos?limit=100&order=asc" + (f"&after={after}" if after else "")
        page = http.get(query)
        page.raise_for_status()
        body = page.json()
        jobs.update({job["id"]: job for job in body["data"]})
        if not body["has_more"]:
            return jobs
        after = body["last_id"]


def run(args) -> dict:
    import httpx
    import ray
    from ray import serve

    from deployments.app import build_app

    from serve.tiny import ensure_tiny_models

    ensure_tiny_models()  # built once here, not by four replicas at once
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data_dir = tempfile.mkdtemp(prefix="srd-load-faults-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    started = time.time()
    ray.init(num_cpus=4 + len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        serve.run(build_app(app_config(args, data_dir)), name=APP, route_prefix="/", logging_config=quiet)
        startup_s = time.time() - started
        print(f"app up in {startup_s:.1f} s on {base}; submitting {args.jobs} jobs", flush=True)

        requests = [job_request(args, i) for i in range(args.jobs)]
        t0 = time.time()
        faults = Faults(parse_kills(args.kill), args.jobs, t0)
        ids, submit_errors = submit_all(base, requests, args.concurrency)
        submitted_s = time.time() - t0
        print(f"{len(ids)} jobs submitted in {submitted_s:.1f} s ({len(submit_errors)} refused)", flush=True)

        deadline = time.monotonic() + args.timeout_s
        jobs: dict[str, dict] = {}
        with httpx.Client(base_url=base, timeout=60) as http:
            last_print = 0.0
            while True:
                try:
                    jobs = snapshot(http)
                except (httpx.TransportError, httpx.HTTPStatusError):  # the proxy or ingress is being replaced
                    time.sleep(0.5)
                    if time.monotonic() > deadline:
                        break
                    continue
                mine = [jobs.get(i) for i in ids]
                finished = sum(1 for j in mine if j is not None and j["status"] in TERMINAL)
                stages: dict[str, int] = {}
                for j in mine:
                    if j is not None and j["stage"]:
                        stages[j["stage"]] = stages.get(j["stage"], 0) + 1
                faults.poll(finished, stages)
                if time.time() - last_print > 10:
                    last_print = time.time()
                    print(f"  t={time.time() - t0:6.1f} s finished {finished}/{len(ids)} in stages {stages}",
                          flush=True)
                if finished == len(ids) and not faults.todo or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            end = time.time()
            faults.join(timeout_s=60)
            jobs = snapshot(http)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    # The records themselves, from the store (the API's times are whole seconds): the judge of "lost".
    from serve.jobs.store import JobStore, default_store_url

    records = JobStore(default_store_url(data_dir)).get_many(ids)
    lost = [i for i in ids if i not in records or not records[i].terminal or i not in jobs]
    completed = [j for j in records.values() if j.status == "completed"]
    failed = [jobs.get(j.id) or {} for j in records.values() if j.status != "completed" and j.terminal]
    latencies = [j.completed_at - j.created_at for j in completed]
    mine = {i: jobs.get(i) for i in ids}
    retried = [j for j in mine.values() if j and any(s["attempts"] > 1 for s in j["stages"].values())]
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "startup_s": round(startup_s, 1),
        "submitted": len(ids), "submit_errors": submit_errors, "submit_s": round(submitted_s, 2),
        "completed": len(completed), "failed": len(failed), "lost": len(lost), "lost_ids": lost,
        "latency_s": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                      "p99": percentile(latencies, 99), "max": max(latencies, default=None),
                      "mean": statistics.fmean(latencies) if latencies else None},
        "makespan_s": round(end - t0, 2),
        "jobs_per_min": round(60 * len(completed) / (end - t0), 2) if end > t0 else None,
        "retried_jobs": len(retried),
        "retried_stages": {stage: sum(1 for j in retried if j["stages"].get(stage, {}).get("attempts", 0) > 1)
                           for stage in ("encode", "sketch", "render", "decode")},
        "sketch_reruns_after_handoff": sum(
            1 for j in retried if j["stages"].get("sketch", {}).get("attempts", 0) > 1
            and any(j["stages"].get(s, {}).get("attempts", 0) > 1 for s in ("render", "decode"))),
        "failures": sorted({j["error"]["message"] for j in failed if j.get("error")}),
        "timeline": faults.timeline,
    }


def machine() -> dict:
    """The CPU this ran on: the figures depend on it."""
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    return {"machine": f"{cores}-core CPU, tiny preset, loopback", "cpu": cpu, "cores": cores,
            "load_avg_at_start": list(os.getloadavg())}


def table(result: dict) -> str:
    lat = result["latency_s"]
    jobs = markdown(
        ["jobs", "completed", "failed", "lost", "p50 s", "p90 s", "p99 s", "max s", "makespan s", "jobs/min",
         "retried jobs"],
        [[result["submitted"], result["completed"], result["failed"], result["lost"],
          *(fmt(lat[q], "{:.2f}") for q in ("p50", "p90", "p99", "max")), f"{result['makespan_s']:.1f}",
          result["jobs_per_min"], result["retried_jobs"]]])
    faults = markdown(
        ["fault", "killed at s", "jobs finished then", "jobs in stage then", "back (new replica HEALTHY) at s"],
        [[f"{e['deployment']} replica", e["killed_at_s"], e["jobs_finished_then"], e["jobs_in_stage_then"],
          e["back_at_s"]] for e in result["timeline"]])
    return f"{jobs}\n\n{faults}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16, help="client threads submitting jobs")
    parser.add_argument("--kill", default="Renderer@0.2,Orchestrator@0.5",
                        help="DEPLOYMENT@FRACTION,...: kill that replica once that fraction of jobs finished")
    parser.add_argument("--size", type=int, default=32, help="height and width of every job")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (switch at half)")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size of every stage")
    parser.add_argument("--lease-s", type=float, default=5.0, help="jobs.lease_s: takeover delay after an "
                                                                   "orchestrator dies")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="bound on waiting for the jobs")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)

    bench = Bench("bench.load_faults", argv, args.out, **machine())
    result = bench.run("load", 0, lambda record: record.update(run(args)))
    if "error" in result:
        print(result["traceback"])
        return 1
    print(table(result))
    print(json.dumps(result["timeline"], indent=1))
    return 0 if result["lost"] == 0 and result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
