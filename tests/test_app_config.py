"""The typed app config, the builder's option merging and the Serve YAMLs, without starting Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.deployment import Application
from ray.serve.schema import ServeDeploySchema

from deployments.app import app_builder, deployment_options
from deployments.local import load_serve_config, resolve_start_timeout, serve_start_options
from deployments.config import AppConfig, SketcherConfig

CONFIGS = Path(__file__).resolve().parent.parent / "deployments" / "configs"
STAGES = ("encoder", "sketcher", "renderer", "decoder")


def test_sketcher_bundles_follow_the_parallel_degree():
    config = SketcherConfig.model_validate({
        "resources": {"num_cpus": 2, "num_gpus": 1}, "parallel": {"ulysses_degree": 2, "cfg_degree": 2},
    })
    options = deployment_options("Sketcher", config)
    assert options["placement_group_bundles"] == [{"CPU": 2, "GPU": 1}] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    # Serve places the replica actor in the first bundle: its own reservation must fit there
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}


def test_defaults_first_typed_config_next_serve_options_last():
    config = SketcherConfig.model_validate({
        "max_ongoing_requests": 7,
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        "serve_options": {"health_check_period_s": 2.0, "ray_actor_options": {"runtime_env": {"env_vars": {"A": "1"}}}},
    })
    options = deployment_options("Sketcher", config)
    assert options["name"] == "Sketcher" and options["max_ongoing_requests"] == 7
    assert options["health_check_period_s"] == 2.0  # the user's override beats the builder's default
    assert options["graceful_shutdown_timeout_s"] == 20.0  # a default nobody overrode
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"A": "1"}}
    assert options["ray_actor_options"]["num_cpus"] == 1.0  # merged, not replaced


@pytest.mark.parametrize(("args", "message"), [
    ({"sketcher": {"max_ongoing_requests": 2, "batching": {"max_batch_size": 4}}}, "`max_ongoing_requests` (2)"),
    ({"renderer": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "`min_replicas` (3)"),
    ({"decoder": {"serve_options": {"num_replicas": 2}}}, "`serve_options.num_replicas` is set by `num_replicas`"),
    ({"encoder": {"serve_options": {"ray_actor_options": {"num_gpus": 1}}}},
     "`serve_options.ray_actor_options.num_gpus` is set by `resources.num_gpus`"),
    ({"jobs": {"max_attempts": 0}}, "max_attempts"),
    ({"jobs": {"store_table": "jobs; drop table x"}}, "store_table"),
    ({"limits": {"max_body_bytes": 10}}, "max_body_bytes"),
    ({"ingress": {"max_queued_requests": -2}}, "max_queued_requests"),
    ({"job_store": {}}, "job_store"),  # the in-memory JobStore deployment is gone: its config is refused
    ({"engine": {"device": "cuda"}}, "`encoder.resources.num_gpus` is 0"),
    ({"sketcher": {"parallel": {"cfg_degree": 3}}}, "cfg_degree"),
    ({"sketcher": {"batching": {"max_batch_size": 0}}}, "max_batch_size"),
    ({"renderer": {"gpus": 1}}, "gpus"),
])
def test_bad_config_names_the_field(args, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AppConfig.model_validate(args)


def test_serve_config_http_options_apply_unless_flags_say_otherwise(tmp_path):
    """`srd serve --config`: the config's `http_options` (all of them) and `proxy_location` reach `serve.start`, as
    `serve deploy` applies them; --host and --port replace the config's; neither: loopback, port 8000."""
    config = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    config.update(http_options={"host": "0.0.0.0", "port": 9123, "request_timeout_s": 30}, proxy_location="HeadOnly")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    assert serve_start_options(str(path)) == {
        "proxy_location": "HeadOnly", "http_options": {"host": "0.0.0.0", "port": 9123, "request_timeout_s": 30}}
    assert serve_start_options(str(path), port=8001)["http_options"] == {
        "host": "0.0.0.0", "port": 8001, "request_timeout_s": 30}
    assert serve_start_options(str(path), host="127.0.0.1")["http_options"]["host"] == "127.0.0.1"
    del config["http_options"], config["proxy_location"]
    path.write_text(yaml.safe_dump(config))
    assert serve_start_options(str(path)) == {"http_options": {"host": "127.0.0.1", "port": 8000}}
    assert serve_start_options(None, port=8002) == {"http_options": {"host": "127.0.0.1", "port": 8002}}


def test_start_timeout_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("SRD_START_TIMEOUT_S", raising=False)
    assert resolve_start_timeout() == 60.0
    monkeypatch.setenv("SRD_START_TIMEOUT_S", "12.5")
    assert resolve_start_timeout() == 12.5 and resolve_start_timeout(3.0) == 3.0
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv("SRD_START_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="SRD_START_TIMEOUT_S|seconds > 0"):
            resolve_start_timeout()


def serve_unplaced_report(required: str) -> str:
    """A deployment's status message as Serve 2.60 words it (deployment_state.py) for replicas Ray has not placed."""
    return ("Deployment 'Sketcher' in application 'srd' has 1 replicas that have taken more than 15s to be scheduled. "
            "This may be due to waiting for the cluster to auto-scale or for a runtime environment to be installed. "
            f"Resources required for each replica: {required}, total resources available: {{}}. "
            "Use `ray status` for more details.")


def test_unplaced_needs_serves_report_and_rays_demand():
    """A deployment is reported unplaceable when Serve says its replicas wait and Ray has a pending demand of their
    shape; one whose worker is only slow to start (no demand) is not; a placement group's bundles count summed."""
    from deployments.local import _unplaced

    free, cluster = {"CPU": 1.25}, {"CPU": 2.0}
    report = serve_unplaced_report('{"CPU": 1000}')
    assert _unplaced("Sketcher", report, free, cluster, [{"CPU": 1000.0}]) == (
        "Sketcher cannot be placed: 1 replica(s) waited 15 s for CPU 1000 each; Ray has CPU 1.25 free (CPU 2 in all)")
    assert _unplaced("Sketcher", report, free, cluster, [{"CPU": 1.0}]) is None  # its worker is starting
    assert _unplaced("Sketcher", report, free, cluster, None) is not None  # Ray does not say: Serve's report alone
    assert _unplaced("Sketcher", "", free, cluster, [{"CPU": 1000.0}]) is None  # Serve reports nothing
    bundles = serve_unplaced_report('[{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}]')
    line = _unplaced("Sketcher", bundles, free, cluster, [{"CPU": 4.0, "GPU": 2.0}])
    assert line is not None and "for CPU 4, GPU 2 each; Ray has CPU 1.25, GPU 0 free (CPU 2, GPU 0 in all)" in line


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "gpu.yaml"])
def test_serve_yamls_validate_and_build(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` / `serve run` check first
    (application,) = schema.applications
    assert application.import_path == "deployments.app:app_builder"
    app_config = AppConfig.model_validate(application.args)
    assert isinstance(app_builder(application.args), Application)
    ((app_name, route_prefix, built),), left_out = load_serve_config(str(CONFIGS / name))  # `srd serve --config`
    assert (app_name, route_prefix) == ("srd", "/") and isinstance(built, Application)
    # serve.run takes no application-level autoscaling policy: `srd serve` says so (one line), `serve deploy` applies
    assert len(left_out) == (1 if application.autoscaling_policy else 0)
    assert all("`autoscaling_policy`" in line for line in left_out)
    if name == "gpu.yaml":  # `srd plan --gpus 3`: sketchers on whole GPUs; encoder and VAE beside the renderer
        assert left_out  # the planned config's cost-aware policy
        assert app_config.engine.device == "cuda"
        assert app_config.sketcher.resources.num_gpus == 1
        assert app_config.renderer.resources.num_gpus + app_config.encoder.resources.num_gpus \
            + app_config.decoder.resources.num_gpus <= 1
    else:
        assert all(getattr(app_config, s).resources.num_gpus == 0 for s in STAGES)


def test_srd_serve_refuses_deployment_overrides_it_would_ignore(tmp_path):
    config = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    config["applications"][0]["deployments"] = [{"name": "Sketcher", "num_replicas": 2}]
    path = tmp_path / "with_overrides.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="put deployment settings in `args`"):
        load_serve_config(str(path))


def test_serve_build_accepts_the_app(tmp_path):
    """`serve build` (Ray's CLI) turns the default app into a config listing all six deployments."""
    out = tmp_path / "built.yaml"
    # Ray's `serve` console script (entry point ray.serve.scripts:cli), run through this interpreter so that it is
    # found wherever Ray was installed (a venv over system packages puts the script outside the venv).
    serve_cli = [sys.executable, "-c", "from ray.serve.scripts import cli; cli(prog_name='serve')"]
    done = subprocess.run([*serve_cli, "build", "deployments.app:app", "-o", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=CONFIGS.parent.parent)
    assert done.returncode == 0, done.stderr
    built = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    names = {d.name for d in built.applications[0].deployments}
    assert names == {"Ingress", "Orchestrator", "Encoder", "Sketcher", "Renderer", "Decoder"}


def test_limits_default_to_the_presets_and_the_config_overrides_them(tmp_path):
    from serve.models import PRESETS

    wan = AppConfig.model_validate({"engine": {"preset": "wan2.1-t2v"}})
    assert wan.request_limits == PRESETS["wan2.1-t2v"].limits and wan.request_limits.max_tokens_per_video == 75_600
    tuned = AppConfig.model_validate({"engine": {"preset": "tiny"}, "limits": {"max_steps": 12}, "model_name": "m"})
    assert tuned.request_limits.max_steps == 12 and tuned.served_model == "m"
    assert tuned.request_limits.max_tokens_per_video == PRESETS["tiny"].limits.max_tokens_per_video
    jobs = AppConfig.model_validate({"jobs": {"data_dir": str(tmp_path / "d")}}).jobs
    assert jobs.store == f"sqlite:///{tmp_path / 'd' / 'jobs.db'}" and jobs.results == str(tmp_path / "d" / "results")
