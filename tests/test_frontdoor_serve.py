"""`srd serve` and `srd generate --via-serve` as a user (or a service manager) runs them, in a process group of their
own: SIGTERM and SIGINT stop `srd serve` and leave no process of the group behind (raylet, GCS, agents, workers); a
model that fails to load is one line on stderr naming the stage and the cause, and Ray is gone afterwards; a local
run on loopback prints no Ray token-auth warning."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

SRD = os.path.join(sysconfig.get_path("scripts"), "srd")  # the console script `pip install` made
START_S = 300.0  # Ray and the four stage replicas on two busy cores
GONE_S = 30.0  # after the signal: `srd serve` exits and every process of its group is gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[str]:
    """Live processes (zombies aside) whose process group is `pgid`, as 'pid cmdline'."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) == pgid and stat[0] not in ("Z", "X"):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry} {cmdline[:120]}")
        except (OSError, IndexError, ValueError):
            continue
    return found


def local_env() -> dict[str, str]:
    """The test environment without RAY_AUTH_MODE and RAY_ADDRESS: as a user's shell would start `srd`."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}


def start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    """`srd ARGS` in a new session (its own process group, as setsid or a service manager starts it)."""
    return subprocess.Popen([SRD, *args], start_new_session=True, env=local_env(),
                            stdout=open(tmp_path / "stdout", "w"), stderr=open(tmp_path / "stderr", "w"))


def kill_group(proc: subprocess.Popen) -> None:
    """Whatever happened, nothing of this test's group outlives it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait(timeout=30)


def wait_healthy(proc: subprocess.Popen, port: int, tmp_path: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    pytest.fail(f"/healthz did not answer 200 within {START_S:.0f} s:\n{(tmp_path / 'stderr').read_text()[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_on_signal_and_leaves_no_process(tiny_models, tmp_path, sig):
    port = free_port()
    proc = start(["serve", "--preset", "tiny", "--port", str(port)], tmp_path)
    try:
        wait_healthy(proc, port, tmp_path)
        assert len(group_members(proc.pid)) > 1  # Ray's processes run in the group: the check below means something
        os.kill(proc.pid, sig)
        deadline = time.monotonic() + GONE_S
        while time.monotonic() < deadline and (proc.poll() is None or group_members(proc.pid)):
            time.sleep(0.5)
        left = group_members(proc.pid)
        assert proc.poll() is not None, f"srd serve still runs {GONE_S:.0f} s after {sig.name}"
        assert not left, f"{GONE_S:.0f} s after {sig.name}, processes of the group remain: {left}"
        stderr = (tmp_path / "stderr").read_text()
        assert proc.returncode == 0, stderr[-3000:]
        assert f"srd serve: {sig.name}: stopped" in stderr
        assert "Token authentication" not in stderr  # loopback: RAY_AUTH_MODE=disabled, set by srd itself
        assert "Traceback" not in stderr
    finally:
        kill_group(proc)


@pytest.fixture(scope="module")
def broken_sketch(tiny_models, tmp_path_factory) -> str:
    """The tiny sketch pipeline without its transformer's weights: its configs pass every check made before loading,
    and the Sketcher replica fails to load it."""
    import shutil

    path = tmp_path_factory.mktemp("broken") / "sketch"
    shutil.copytree(tiny_models.sketch, path)
    for weights in (path / "transformer").glob("*.safetensors"):
        weights.unlink()
    return str(path)


# One constructor attempt for the Sketcher that cannot load: its failure is the same on every retry, and each retry
# is another replica start (seconds each on two cores).
BROKEN_STAGES = {**{stage: {"resources": {"num_cpus": 0.25}} for stage in ("encoder", "renderer", "decoder")},
                 "sketcher": {"resources": {"num_cpus": 0.25}, "serve_options": {"max_constructor_retry_count": 1}}}


def assert_one_line_failure(proc: subprocess.Popen, command: str, tmp_path: Path) -> None:
    try:
        proc.wait(timeout=START_S + GONE_S)
        lines = [line for line in (tmp_path / "stderr").read_text().splitlines() if line.strip()]
        assert proc.returncode == 1, lines[-20:]
        assert len(lines) == 1, lines[-20:]
        assert lines[0].startswith(f"srd {command}: error: Sketcher failed to start: ModelError: cannot load the "
                                   "sketch transformer"), lines
        assert not group_members(proc.pid)  # Ray went with it
    finally:
        kill_group(proc)


def test_serve_with_a_broken_model_is_one_line(tiny_models, broken_sketch, tmp_path):
    config = {"applications": [{
        "name": "srd", "route_prefix": "/", "import_path": "deployments.app:app_builder",
        "args": {"engine": {"preset": "tiny", "sketch": broken_sketch, "render": tiny_models.render},
                 **BROKEN_STAGES},
    }]}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(config))
    proc = start(["serve", "--config", str(tmp_path / "broken.yaml"), "--port", str(free_port())], tmp_path)
    assert_one_line_failure(proc, "serve", tmp_path)


def test_generate_via_serve_with_a_broken_model_is_one_line(tiny_models, broken_sketch, tmp_path):
    proc = start(["generate", "--via-serve", "--preset", "tiny", "--sketch", broken_sketch, "--render",
                  tiny_models.render, "--prompt", "a cat", "--height", "32", "--width", "32", "--frames", "5",
                  "--steps", "2", "--out", str(tmp_path / "never.mp4")], tmp_path)
    assert_one_line_failure(proc, "generate", tmp_path)
    assert not (tmp_path / "never.mp4").exists()


def test_healthz_is_not_ok_while_a_stage_cannot_load(serve_http, tiny_models, broken_sketch, tmp_path):
    """An app whose Sketcher cannot load its model: deploying it fails, and the ingress that did start answers
    /healthz with 503 naming the stage and the cause, not "ok"."""
    import httpx
    from ray import serve

    from deployments.app import build_app
    from deployments.config import AppConfig

    config = AppConfig.model_validate({
        "engine": {"preset": "tiny", "sketch": broken_sketch, "render": tiny_models.render},
        "jobs": {"data_dir": str(tmp_path / "data")},
        **BROKEN_STAGES,
    })
    with pytest.raises(RuntimeError, match="failed"):
        serve.run(build_app(config), name="srd-broken", route_prefix="/broken")
    try:
        response = httpx.get(f"{serve_http}/broken/healthz", timeout=30)
        assert response.status_code == 503, response.text
        problems = response.json()["problems"]
        assert any(p.startswith("Sketcher: DEPLOY_FAILED") and "ModelError: cannot load the sketch transformer" in p
                   for p in problems), problems
    finally:
        serve.delete("srd-broken")


def test_serve_with_an_unplaceable_config_fails_fast_on_the_configs_port(tiny_models, tmp_path):
    """A Sketcher asking for more CPUs than the machine has: `srd serve` fails within --start-timeout-s (plus Ray's
    start) with one line naming the deployment and the resources it waits for, and leaves no process behind. Until
    then Serve's proxy listens where the config's `http_options` say (no --host/--port given)."""
    port, timeout_s = free_port(), 15
    stages = {stage: {"resources": {"num_cpus": 0.25}} for stage in ("encoder", "renderer", "decoder")}
    config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [{
        "name": "srd", "route_prefix": "/", "import_path": "deployments.app:app_builder",
        "args": {"engine": {"preset": "tiny"}, "jobs": {"data_dir": str(tmp_path / "data")},
                 "sketcher": {"resources": {"num_cpus": 1000}}, **stages},
    }]}
    (tmp_path / "unplaceable.yaml").write_text(yaml.safe_dump(config))
    started = time.monotonic()
    proc = start(["serve", "--config", str(tmp_path / "unplaceable.yaml"), "--start-timeout-s", str(timeout_s)],
                 tmp_path)
    try:
        proxy_answered = False
        while proc.poll() is None and time.monotonic() - started < START_S:
            try:  # Serve's proxy health route: any HTTP answer means it listens on the config's port
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthz", timeout=2):
                    proxy_answered = True
            except urllib.error.HTTPError:
                proxy_answered = True
            except OSError:
                pass
            time.sleep(0.5)
        proc.wait(timeout=GONE_S)
        elapsed = time.monotonic() - started
        lines = [line for line in (tmp_path / "stderr").read_text().splitlines() if line.strip()]
        assert proc.returncode == 1, lines[-20:]
        assert len(lines) == 1, lines[-20:]
        assert lines[0].startswith("srd serve: error: Sketcher cannot be placed: 1 replica(s) waited "), lines
        assert "for CPU 1000 each; Ray has CPU " in lines[0] and "--start-timeout-s" in lines[0], lines
        assert proxy_answered, f"nothing answered on the config's port {port}"
        assert elapsed < START_S, elapsed  # bounded: Ray's start, the timeout, then the controller's next check
        assert not group_members(proc.pid)
    finally:
        kill_group(proc)
