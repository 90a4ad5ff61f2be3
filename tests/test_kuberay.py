"""The KubeRay RayService manifest (cluster/rayservice.yaml) carries the same Serve config as the GPU Serve YAML,
which Ray Serve's schema and the app's config accept, with the head's GCS fault tolerance in Redis and GPU worker
groups that have room for the planned replicas."""

from __future__ import annotations

from pathlib import Path

import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppConfig

ROOT = Path(__file__).parent.parent
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
SERVE_YAML = ROOT / "deployments" / "configs" / "gpu.yaml"


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_serve_config_v2_is_the_serve_yaml_and_serve_accepts_it():
    spec = manifest()["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    assert serve_config == yaml.safe_load(SERVE_YAML.read_text())
    (application,) = ServeDeploySchema.model_validate(serve_config).applications
    AppConfig.model_validate(application.args)


def test_gcs_fault_tolerance_uses_redis_with_a_secret_password():
    cluster = manifest()["spec"]["rayClusterConfig"]
    options = cluster["gcsFaultToleranceOptions"]
    assert options["redisAddress"] and options["redisPassword"]["valueFrom"]["secretKeyRef"]["key"]
    assert cluster["rayVersion"] == ray.__version__


def test_gpu_worker_groups_hold_the_planned_replicas():
    cluster = manifest()["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"sketch-gpu", "render-gpu"}

    def gpus(group: dict, count: str) -> int:
        (container,) = group["template"]["spec"]["containers"]
        return group[count] * int(container["resources"]["limits"]["nvidia.com/gpu"])

    args = AppConfig.model_validate(yaml.safe_load(SERVE_YAML.read_text())["applications"][0]["args"])
    sketch = args.sketcher.autoscaling.max_replicas * args.sketcher.resources.num_gpus
    assert gpus(groups["sketch-gpu"], "replicas") >= sketch
    side = args.renderer.resources.num_gpus + args.encoder.resources.num_gpus + args.decoder.resources.num_gpus
    assert gpus(groups["render-gpu"], "replicas") >= side
    assert all(gpus(g, "maxReplicas") >= gpus(g, "replicas") for g in groups.values())
