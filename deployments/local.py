"""Running the app on this machine or joining a cluster: `srd serve` (`run_local`) and `srd generate --via-serve`
(`generate_local`), and the local Ray they start, watch and stop. The app graph itself is deployments/app.py.

A Ray this module starts for a command is that command's: on the way out it is shut down with every process it
left behind (Ray's workers and agents are children of ours), whatever signal ended the command.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve.deployment import Application

from deployments.api import VideoResult
from deployments.app import APP_NAME, build_app
from deployments.config import AppConfig, Resources, config_key
from serve.config import EngineConfig
from serve.pipeline.registry import PIPELINE
from serve.request import VideoRequest

__all__ = ["AppStartError", "generate_local", "local_config", "run_local", "serve_start_options"]

# How long a replica may wait for Ray to place it before the command gives up (`srd serve --start-timeout-s`, or
# this environment variable): a config whose resources do not fit fails with one line instead of waiting for ever.
# Placement only: a replica that Ray placed may take as long as its model needs to load.
START_TIMEOUT_ENV = "SRD_START_TIMEOUT_S"
START_TIMEOUT_S = 60.0
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def local_config(engine: EngineConfig, constructor_attempts: int | None = None) -> AppConfig:
    """The app on this one machine: the stage deployments share its CPUs (an equal part each, so they fit however
    few cores it has) and, on CUDA, GPU 0; `constructor_attempts` replaces DEFAULT_OPTIONS' for them."""
    deployments = PIPELINE.deployments()
    share = 1 / len(deployments)
    resources = Resources(num_cpus=len(os.sched_getaffinity(0)) * share,
                          num_gpus=share if engine.device.startswith("cuda") else 0.0)
    options = {} if constructor_attempts is None else {"max_constructor_retry_count": constructor_attempts}
    return AppConfig.model_validate({
        "engine": engine.model_dump(),
        **{config_key(name): {"resources": resources.model_dump(), "serve_options": options} for name in deployments},
    })


def _read_serve_config(config_path: str):
    """The Serve config YAML at `config_path`, validated as `serve deploy` validates it (ServeDeploySchema)."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"--config {config_path!r} is not a file")
    return ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))


def load_serve_config(config_path: str) -> tuple[list[tuple[str, str | None, Application]], list[str]]:
    """The applications of a Serve config YAML (as `serve deploy` takes it): (name, route_prefix, app) each, and one
    line per setting that `srd serve` (Serve's `serve.run`, which takes no application-level policy) leaves out."""
    schema = _read_serve_config(config_path)
    apps, left_out = [], []
    for spec in schema.applications:
        if spec.autoscaling_policy:
            left_out.append(f"application {spec.name!r} sets `autoscaling_policy`, which `srd serve` does not apply "
                            "(its stages scale by Ray's default policy): `serve deploy` applies it")
        if spec.deployments or spec.runtime_env:
            raise ValueError(
                f"application {spec.name!r} in {config_path!r} sets `deployments` or `runtime_env`, which "
                "`srd serve` does not apply: put deployment settings in `args` (AppConfig), or use `serve run`"
            )
        module_name, _, attr = spec.import_path.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
        built = target if isinstance(target, Application) else target(spec.args or {})
        apps.append((spec.name, spec.route_prefix, built))
    return apps, left_out


def engine_configs(config_path: str) -> list[tuple[str, EngineConfig]]:
    """Each application's engine config in a Serve config YAML (its `args.engine`, as the app builder reads it):
    what `srd warm --config` warms."""
    configs = []
    for spec in _read_serve_config(config_path).applications:
        try:
            configs.append((spec.name, AppConfig.model_validate(spec.args or {}).engine))
        except ValueError as e:  # pydantic's ValidationError included: one line naming the application
            first = e.errors()[0] if hasattr(e, "errors") else None
            where = ".".join(str(x) for x in first["loc"]) if first else "args"
            message = first["msg"].removeprefix("Value error, ") if first else str(e)
            raise ValueError(f"application {spec.name!r} in {config_path!r}: invalid {where}: {message}") from None
    return configs


def serve_start_options(config_path: str | None, host: str | None = None, port: int | None = None) -> dict:
    """`serve.start`'s proxy settings for `srd serve`: the config's `http_options` (all of them) and
    `proxy_location`, as `serve deploy` applies them; `--host` and `--port`, when given, replace the config's. Host
    and port that neither sets are 127.0.0.1:8000 (loopback, not Serve's 0.0.0.0: nothing is exposed unasked)."""
    options, http = {}, {}
    if config_path:
        schema = _read_serve_config(config_path)
        http = schema.http_options.model_dump(exclude_unset=True)
        if "proxy_location" in schema.model_fields_set:
            options["proxy_location"] = schema.proxy_location
    http["host"] = host if host is not None else http.get("host", DEFAULT_HOST)
    http["port"] = port if port is not None else http.get("port", DEFAULT_PORT)
    return {**options, "http_options": http}


def resolve_start_timeout(value: float | None = None) -> float:
    """The placement bound: `value` (the flag) if given, else $SRD_START_TIMEOUT_S, else START_TIMEOUT_S."""
    if value is None:
        raw = os.environ.get(START_TIMEOUT_ENV)
        try:
            value = START_TIMEOUT_S if raw is None else float(raw)
        except ValueError:
            raise ValueError(f"{START_TIMEOUT_ENV} must be a number of seconds > 0 but is {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the start timeout must be a number of seconds > 0 but is {value}")
    return value


class AppStartError(RuntimeError):
    """A deployment of the app failed to start (its model would not load, say); the message is one line."""


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _local_auth_env(host: str) -> None:
    """A Ray this command starts for itself, reachable only on loopback, needs no token: RAY_AUTH_MODE=disabled
    unless the user set RAY_AUTH_MODE or joins a cluster (RAY_ADDRESS), where the cluster's auth applies."""
    if not os.environ.get("RAY_ADDRESS") and (host in _LOOPBACK or host.startswith("127.")):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every live (non-zombie) process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):  # state; then ppid ... starttime (field 22 of stat)
            table[int(entry)] = (int(fields[1]), fields[19])
    return table


def _descendants() -> set[tuple[int, str]]:
    """(pid, start time) of every live process below this one (the start time tells a reused pid apart)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, table[child][1]))
            todo.append(child)
    return found


def _stop_processes(processes: set[tuple[int, str]], grace_s: float = 10.0) -> None:
    """Wait up to `grace_s` for these processes to exit, SIGTERM the rest, then SIGKILL what is left after 5 s."""

    def alive() -> set[int]:
        table = _process_table()
        return {pid for pid, start in processes if pid in table and table[pid][1] == start}

    for sig, wait_s in ((None, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        left = alive()
        if not left:
            return
        for pid in left if sig is not None else ():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)


# Serve's controller reports a replica that Ray has not placed once it has waited this long, checked this often (30 s
# each by default); read from the environment when the controller starts.
_SERVE_UNPLACED_AFTER = ("RAY_SERVE_SLOW_STARTUP_WARNING_S", "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S")


@contextlib.contextmanager
def _serve_reports_unplaced_after(seconds: float):
    """While Ray starts here: Serve's controller reports unplaced replicas after `seconds`, so that its report (the
    deployment and what it asks for) is there when the start timeout ends. Variables the user set are kept."""
    saved = {name: os.environ.get(name) for name in _SERVE_UNPLACED_AFTER}
    for name in _SERVE_UNPLACED_AFTER:
        os.environ.setdefault(name, str(max(1, math.ceil(seconds))))  # Serve reads whole seconds
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


@contextlib.contextmanager
def _local_ray(host: str, before_shutdown: Callable[[], None] | None = None, start_timeout_s: float = START_TIMEOUT_S):
    """Ray for one command; yields whether the command owns it (started it here). Already initialised in this
    process: used as is (False). Otherwise started (True), or joined with RAY_ADDRESS (False: the cluster outlives
    the command), quietly (Ray's and the replicas' logs stay in Ray's log directory, not on this terminal), and on
    the way out shut down with everything it left behind: `ray.shutdown()` stops the processes it started itself,
    not always what those started (workers, dashboard and runtime-env agents), so any process born below this one
    since `ray.init` is waited for, then terminated. A Ray started here has Serve report a replica it cannot place
    after `start_timeout_s` (`_wait_running` reads that report)."""
    if ray.is_initialized():
        yield False
        return
    _local_auth_env(host)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not "Started Serve in namespace ..."
    before = _descendants()
    try:
        joining = bool(os.environ.get("RAY_ADDRESS"))  # a cluster's Serve keeps its own settings
        with contextlib.nullcontext() if joining else _serve_reports_unplaced_after(start_timeout_s):
            ray.init(logging_level=logging.WARNING, log_to_driver=False)
        yield not os.environ.get("RAY_ADDRESS")
    finally:
        if before_shutdown is not None:
            before_shutdown()
        spawned = _descendants() - before
        # No serve.shutdown(): the cluster goes with the app (and Serve's controller, killed while its own graceful
        # shutdown task runs, would print a retry warning).
        ray.shutdown()
        _stop_processes(spawned | (_descendants() - before))


class _StopSignals:
    """SIGINT, SIGTERM and SIGHUP raise `_Stop` in the main thread. Installed explicitly: a background job (`cmd &`,
    nohup, setsid, a service manager) may inherit SIGINT ignored, and `ray.init` sets SIGTERM to a bare `sys.exit`."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self) -> None:
        self.saved = {s: signal.getsignal(s) for s in self.SIGNALS}

    @staticmethod
    def _raise(signum, _frame) -> None:
        raise _Stop(signal.Signals(signum).name)

    def arm(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, self._raise)

    def hold(self) -> None:
        """While shutting down: a second Ctrl-C must not cut the shutdown short and leave Ray processes behind."""
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def restore(self) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class _Stop(BaseException):
    """A stop signal arrived. Not an Exception, so that no `except Exception` on the way up swallows it."""


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?:\((\w+)\))?: (.+)$")


def _cause(message: str) -> str:
    """`Cause: first line of its message` from a deployment's status message (which holds a traceback): the last
    exception line in it, with a RayTaskError unwrapped to the exception it wraps."""
    lines = [line.strip() for line in message.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        match = _EXCEPTION_LINE.match(lines[i])
        if match and not match.group(1).endswith("RayTaskError"):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(3)}"
    return next((line for line in lines if line), "no message")


def _start_failure(app_name: str) -> str | None:
    """'<Deployment> failed to start: <Cause>: <message>' for the first failed deployment of the app, if any."""
    try:
        app_status = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - only used to word an error that is already being raised
        return None
    if app_status is None:
        return None
    for name, deployment in app_status.deployments.items():
        if str(deployment.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            return f"{name} failed to start: {_cause(deployment.message or '')}"
    return None


# Serve's report of replicas that Ray has not placed (deployment_state.py), in a deployment's status message.
_UNPLACED = re.compile(r"has (\d+) replicas that have taken more than (\d+)s to be scheduled\..*Resources required for "
                       r"each replica: (.*), total resources available:", re.DOTALL)


def _resources(text: str) -> dict[str, float]:
    """Serve's JSON of one replica's resources (a dict, or a list of placement-group bundles), summed per kind."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    total: dict[str, float] = {}
    for bundle in value if isinstance(value, list) else [value]:
        for kind, amount in (bundle.items() if isinstance(bundle, dict) else ()):
            if isinstance(amount, (int, float)) and amount > 0:
                total[kind] = total.get(kind, 0.0) + amount
    return total


def _words(resources: dict[str, float]) -> str:
    return ", ".join(f"{kind} {amount:g}" for kind, amount in sorted(resources.items())) or "nothing"


def _resource_demands() -> list[dict[str, float]] | None:
    """What Ray cannot grant now (an actor's resources, a placement group's bundles summed), one dict each, from the
    GCS's view the autoscaler reads; None if the GCS does not say. A replica whose worker is merely slow to start
    has its resources already and is not here."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
    except Exception:  # an older or remote GCS without the autoscaler's state service: Serve's report alone
        return None
    # An actor's demand: one shape per request (its count is how many actors wait with it). A placement group's:
    # all its bundles together, as Serve sums a replica's bundles.
    shapes = [dict(request.bundle) for demand in demands.ray_task_actor_demand for request in demand.bundles_by_count]
    for demand in demands.placement_group_demand:
        summed: dict[str, float] = {}
        for request in demand.bundles_by_count:
            for kind, amount in request.bundle.items():
                summed[kind] = summed.get(kind, 0.0) + amount * request.count
        shapes.append(summed)
    return shapes


def _unplaced(deployment: str, message: str, free: dict[str, float], cluster: dict[str, float],
              demands: list[dict[str, float]] | None) -> str | None:
    """'<Deployment> cannot be placed: N replica(s) waited S s for <resources> each; Ray has <resources> free
    (<resources> in all)' if Serve reports replicas of the deployment that Ray has not placed and Ray confirms it
    cannot grant what they ask (`demands`, `_resource_demands`; None: Serve's report alone). `free` and `cluster`
    are Ray's available and total resources."""
    match = _UNPLACED.search(message or "")
    if match is None:
        return None
    count, waited, required = match.groups()
    asks = _resources(required)
    if not asks:
        return None  # a replica that asks for nothing is never short of it
    if demands is not None and not any(all(abs(shape.get(kind, 0.0) - amount) < 1e-6 for kind, amount in asks.items())
                                       for shape in demands):
        return None  # placed by now, or its worker is still starting: not a resource shortage
    return (f"{deployment} cannot be placed: {count} replica(s) waited {waited} s for {_words(asks)} each; Ray has "
            f"{_words({kind: float(free.get(kind, 0.0)) for kind in asks})} free "
            f"({_words({kind: float(cluster.get(kind, 0.0)) for kind in asks})} in all)")


def _wait_running(name: str, start_timeout_s: float, poll_s: float = 0.5) -> None:
    """Until the app runs. A deployment that fails to start raises AppStartError naming it and the cause; once
    `start_timeout_s` has passed, so does one whose replicas Ray has not placed for want of resources (Serve's
    report of them, which Ray's pending demands confirm), naming the deployment and the resources it asks for. A
    replica that is placed may start and load its model for as long as it takes."""
    deadline = time.monotonic() + start_timeout_s
    while True:
        app = serve.status().applications.get(name)
        status = str(getattr(app, "status", "")).rsplit(".", 1)[-1]
        if status == "RUNNING":
            return
        if app is None or status in ("DEPLOY_FAILED", "DELETING"):
            message = (getattr(app, "message", "") or f"application {name!r} is gone").strip().splitlines()
            raise AppStartError(_start_failure(name) or f"deploying {name!r} failed: {message[0]}")
        if time.monotonic() >= deadline:
            free, cluster, demands = ray.available_resources(), ray.cluster_resources(), _resource_demands()
            unplaced = [line for deployment, state in app.deployments.items()
                        if (line := _unplaced(deployment, state.message, free, cluster, demands))]
            if unplaced:
                raise AppStartError(f"{'; '.join(unplaced)}. Lower the resources in the config, give Ray more, or "
                                    f"allow more time (--start-timeout-s, now {start_timeout_s:g} s)")
        time.sleep(poll_s)


def _deploy(application: Application, name: str, start_timeout_s: float = START_TIMEOUT_S, **options):
    """Serve's deploy, waiting until the app runs: a deployment that fails to start (Serve logs the controller's
    tracebacks) or that Ray cannot place within `start_timeout_s` is one AppStartError naming the deployment and
    the cause, or the resources it waits for."""
    from ray.serve import RunTarget

    serve_logger = logging.getLogger("ray.serve")
    level = serve_logger.level
    serve_logger.setLevel(logging.CRITICAL)  # the failure is reported once, below
    try:
        (handle,) = serve.run_many([RunTarget(application, name=name, **options)],
                                   wait_for_applications_running=False)
        _wait_running(name, start_timeout_s)
        return handle
    except RuntimeError as e:
        if isinstance(e, AppStartError):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AppStartError(_start_failure(name) or first) from None
    finally:
        serve_logger.setLevel(level)


QUIET_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


def run_local(config_path: str | None = None, preset: str = "toy", host: str | None = None, port: int | None = None,
              start_timeout_s: float | None = None) -> None:
    """`srd serve`: start (or join, with RAY_ADDRESS) Ray, deploy the app, serve HTTP until SIGINT, SIGTERM or
    SIGHUP; then shut the app and Ray down, leaving no Ray process behind. HTTP as `serve_start_options` says (the
    config's `http_options` unless `host`/`port` are given). A deployment that fails to start, or that Ray cannot
    place within `start_timeout_s` (default: `resolve_start_timeout`), raises AppStartError (one line)."""
    start_timeout_s = resolve_start_timeout(start_timeout_s)
    start_options = serve_start_options(config_path, host, port)
    host, port = start_options["http_options"]["host"], start_options["http_options"]["port"]
    if config_path:
        apps, left_out = load_serve_config(config_path)
        for line in left_out:
            print(f"srd serve: warning: {line}", file=sys.stderr, flush=True)
    else:
        apps = [(APP_NAME, "/", build_app(local_config(EngineConfig(preset=preset))))]
    stop = _StopSignals()
    stop.arm()
    try:
        with _local_ray(host, before_shutdown=stop.hold, start_timeout_s=start_timeout_s):
            stop.arm()  # again: ray.init replaced SIGTERM's handler
            deployed = []
            try:
                serve.start(**start_options, logging_config=QUIET_LOGGING)
                for name, route_prefix, application in apps:
                    deployed.append(name)
                    _deploy(application, name, start_timeout_s, route_prefix=route_prefix,
                            logging_config=QUIET_LOGGING)
                print(f"srd serve: {', '.join(n for n, _, _ in apps)} ready on http://{host}:{port} "
                      f"(API docs at /docs, Prometheus metrics at http://{host}:{port}/metrics); Ctrl-C or SIGTERM "
                      f"stops", flush=True)
                while True:
                    signal.pause()
            finally:
                if os.environ.get("RAY_ADDRESS"):  # a cluster's Ray and Serve outlive this command, its apps do not
                    stop.hold()
                    for name in deployed:
                        serve.delete(name)
    except _Stop as e:
        print(f"srd serve: {e}: stopped", file=sys.stderr, flush=True)
    finally:
        stop.restore()


def generate_local(request: VideoRequest, engine: EngineConfig,
                   on_update: Callable[[object], None] | None = None, poll_s: float = 0.2) -> VideoResult:
    """One job through the disaggregated app on a local Ray (no HTTP proxy), over its deployment handle.

    Starts Ray and the app (unless Ray is already initialised here, or RAY_ADDRESS names a cluster: then only the
    app, deleted afterwards), submits, reports every change of the job's status, stage or progress to `on_update`,
    and shuts down what it started. A deployment that fails to start raises AppStartError (one line).
    """
    name = f"{APP_NAME}-generate"
    start_timeout_s = resolve_start_timeout()
    # A Ray it does not own outlives the command; its app does not.
    with _local_ray("127.0.0.1", start_timeout_s=start_timeout_s) as own_ray:
        try:
            if own_ray:
                serve.start(proxy_location="Disabled", logging_config=QUIET_LOGGING)
            # One job on this machine: a stage whose model fails to load fails the command at once (a load that
            # failed here fails again; a server, `srd serve`, keeps DEFAULT_OPTIONS' three attempts).
            app = build_app(local_config(engine, constructor_attempts=1))
            handle = _deploy(app, name, start_timeout_s, route_prefix=None, logging_config=QUIET_LOGGING)
            job = handle.submit.remote(request).result()
            seen = (job.status, job.stage, job.progress)
            while job.status not in ("completed", "failed", "cancelled"):
                time.sleep(poll_s)
                job = handle.status.remote(job.id).result()
                if on_update is not None and (job.status, job.stage, job.progress) != seen:
                    on_update(job)
                seen = (job.status, job.stage, job.progress)
            return handle.result.remote(job.id).result()
        finally:
            if not own_ray:
                serve.delete(name)
