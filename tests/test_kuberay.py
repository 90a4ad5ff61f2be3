"""The cluster manifests. The KubeRay RayService (cluster/rayservice.yaml) passes KubeRay's RayService CRD (a copy of
its schema under tests/data) and the operator's own rules, with no field the operator ignores; it carries the same
Serve config as the GPU Serve YAML, which Ray Serve's schema and the app's config accept, with the head's GCS fault
tolerance in Redis and GPU worker groups that have room for the planned replicas. The Ray cluster launcher's
cluster.yaml passes Ray's schema and names every node's image."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppConfig

ROOT = Path(__file__).parent.parent
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
SERVE_YAML = ROOT / "deployments" / "configs" / "gpu.yaml"


# KubeRay's RayService CRD (tests/data: v1.7.0's openAPIV3Schema, descriptions and status left out).
CRD_SCHEMA = ROOT / "tests" / "data" / "kuberay-rayservice-v1.7.0.schema.json"
# Fields the CRD still lists that the operator has ignored since KubeRay 1.1 (kuberay#1685).
IGNORED_FIELDS = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
INITIALIZING_TIMEOUT = "ray.io/initializing-timeout"


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def strict(schema: dict) -> dict:
    """The CRD's schema as `kubectl apply` enforces it (field validation Strict, kubectl's default): an object
    rejects fields its schema does not list, unless it keeps unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema.setdefault("additionalProperties", False)
    return schema


def crd_errors(document: dict) -> list[str]:
    """Where `document` breaks the RayService CRD's schema or the operator's own rules, one line each."""
    from jsonschema import Draft7Validator

    validator = Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text())))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
              for e in validator.iter_errors(document)]
    errors += [f"spec.{field}: ignored by the operator since KubeRay 1.1"
               for field in IGNORED_FIELDS & set(document.get("spec", {}))]
    # The operator's check of the annotation (ray-operator/controllers/ray/utils/validation.go): a positive Go
    # duration ("30m", "1h30m") or a positive whole number of seconds.
    timeout = document.get("metadata", {}).get("annotations", {}).get(INITIALIZING_TIMEOUT)
    if timeout is not None and not re.fullmatch(r"(?:[1-9]\d*|(?:\d+(?:\.\d+)?(?:h|m|s|ms|us|ns))+)", str(timeout)):
        errors.append(f"metadata.annotations.{INITIALIZING_TIMEOUT}: {timeout!r} is not a Go duration or seconds")
    return errors


def test_manifest_matches_the_rayservice_crd():
    document = manifest()
    assert crd_errors(document) == []
    assert document["metadata"]["annotations"][INITIALIZING_TIMEOUT]  # what replaces the ignored thresholds


@pytest.mark.parametrize("break_it, where", [
    (lambda d: d["spec"].update(serveConfig="{}"), "spec: Additional properties"),  # a field the CRD lacks
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="2"), "replicas: '2' is not"),
    (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].pop("template"), "'template' is a required"),
    (lambda d: d["spec"].update(serviceUnhealthySecondThreshold=900), "ignored by the operator"),
    (lambda d: d["metadata"]["annotations"].update({INITIALIZING_TIMEOUT: "half an hour"}), "not a Go duration"),
], ids=["unknown-field", "wrong-type", "missing-required", "ignored-field", "bad-timeout"])
def test_crd_check_finds_a_broken_manifest(break_it, where):
    document = manifest()
    break_it(document)
    errors = crd_errors(document)
    assert any(where in error for error in errors), errors


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


def test_cluster_launcher_config_names_every_node_image():
    """cluster.yaml passes Ray's own launcher schema, and no node type is left to Ray 2.60's default AMI (an
    end-of-life Deep Learning AMI): each names an AMI ID or an SSM parameter that EC2 resolves to one."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    for name, node_type in config["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/\S+", image), (name, image)
