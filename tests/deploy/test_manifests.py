"""docker/compose.yaml, docker/nginx.conf and docker/k8s/ agree with the service: every METANET_*
variable is a setting with a valid value, and ports, probes, the store URL and timeouts line up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.http.routes import probes
from service.settings import Settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"
K8S = DOCKER / "k8s"
REPLICAS = ("metanet-1", "metanet-2")


def settings_from(env: dict[str, Any]) -> Settings:
    """The Settings these METANET_* variables make; fails on an unknown name or a bad value."""
    fields = {}
    for name, value in env.items():
        assert name.startswith("METANET_"), name
        field = name.removeprefix("METANET_").lower()
        assert field in Settings.model_fields, f"{name} is not a setting of service/settings.py"
        fields[field] = str(value)
    return Settings(**fields)


def duration_s(value: str) -> float:
    """Compose durations: 30s, 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


def redis_options(command: list[str]) -> dict[str, str]:
    assert command[0] == "redis-server", command
    return {flag.removeprefix("--"): value for flag, value in zip(command[1::2], command[2::2], strict=True)}


def assert_durable(options: dict[str, str]) -> None:
    """Append-only file fsynced on every write: what SQLite's synchronous=FULL gives."""
    assert options["appendonly"] == "yes"
    assert options["appendfsync"] == "always"


# ----------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    return (DOCKER / "nginx.conf").read_text()


def metanet_env(service: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in service["environment"].items() if k.startswith("METANET_")}


def test_compose_runs_two_identical_replicas_with_valid_settings(compose) -> None:
    services = compose["services"]
    assert services[REPLICAS[0]] == services[REPLICAS[1]]
    env = metanet_env(services[REPLICAS[0]])
    settings = settings_from(env)
    assert settings.host == "0.0.0.0"  # reachable from nginx's container
    assert settings.store_url is not None
    assert services[REPLICAS[0]]["depends_on"]["redis"]["condition"] == "service_healthy"
    # docker stops a replica with SIGTERM, then SIGKILL after the grace period: let requests drain.
    assert duration_s(services[REPLICAS[0]]["stop_grace_period"]) > settings.shutdown_timeout_s


def test_compose_replicas_use_the_compose_redis_and_it_persists_every_write(compose) -> None:
    settings = settings_from(metanet_env(compose["services"][REPLICAS[0]]))
    url = urlsplit(settings.store_url)
    redis = compose["services"]["redis"]
    options = redis_options(redis["command"])
    assert url.scheme == "redis" and url.hostname == "redis"
    assert (url.port or 6379) == int(options.get("port", 6379))
    assert_durable(options)
    assert any(volume.endswith(":/data") for volume in redis["volumes"])  # redis' image works in /data


def test_compose_healthcheck_probes_readyz_on_the_replica_port(compose) -> None:
    service = compose["services"][REPLICAS[0]]
    settings = settings_from(metanet_env(service))
    check = " ".join(service["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.port}/readyz" in check
    assert "/readyz" in {route.path for route in probes.routes}


def test_nginx_upstreams_are_the_compose_replicas_on_their_port(compose, nginx_conf) -> None:
    port = settings_from(metanet_env(compose["services"][REPLICAS[0]])).port
    servers = re.findall(r"^\s*server (\S+?):(\d+) ", nginx_conf, re.M)
    assert servers == [(name, str(port)) for name in REPLICAS]
    assert re.search(r"^\s*hash \$metanet_task consistent;", nginx_conf, re.M)
    assert re.search(r"^\s*proxy_next_upstream error timeout", nginx_conf, re.M)
    assert set(compose["services"]["nginx"]["depends_on"]) == set(REPLICAS)


def test_nginx_listens_on_the_published_port_and_takes_the_largest_body(compose, nginx_conf) -> None:
    listen = re.findall(r"^\s*listen (\d+);", nginx_conf, re.M)
    assert len(listen) == 1
    nginx = compose["services"]["nginx"]
    assert [p.split(":")[-1] for p in nginx["ports"]] == listen
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    limit = re.search(r"^\s*client_max_body_size (\d+)m;", nginx_conf, re.M)
    assert limit and int(limit.group(1)) * 1024 * 1024 > Settings().max_body_bytes


# -------------------------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of docker/k8s/base by (kind, name)."""
    objects = {}
    for path in sorted((K8S / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


@pytest.fixture(scope="module")
def config(k8s) -> Settings:
    return settings_from(k8s[("ConfigMap", "metanet-config")]["data"])


def container(k8s) -> dict[str, Any]:
    (only,) = k8s[("Deployment", "metanet")]["spec"]["template"]["spec"]["containers"]
    return only


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    files = [p.name for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml"]
    assert sorted(listed) == sorted(files)
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"] == ["base"]


def test_deployment_takes_its_settings_from_the_configmap(k8s, config) -> None:
    pod = container(k8s)
    refs = [source.get("configMapRef", {}).get("name") for source in pod["envFrom"]]
    assert "metanet-config" in refs
    settings_from({env["name"]: env["value"] for env in pod.get("env", [])})
    assert config.host == "0.0.0.0"
    assert pod["command"] == ["metanet", "serve"]


def test_deployment_port_and_probes_match_the_service(k8s, config) -> None:
    pod = container(k8s)
    ports = {port["name"]: port["containerPort"] for port in pod["ports"]}
    assert ports == {"http": config.port}
    routes = {route.path for route in probes.routes}
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        assert pod[probe]["httpGet"] == {"path": path, "port": "http"}, probe
        assert path in routes


def test_deployment_has_resources_and_drains_before_it_is_killed(k8s, config) -> None:
    pod = container(k8s)
    assert {"cpu", "memory"} <= set(pod["resources"]["requests"])
    assert "memory" in pod["resources"]["limits"]
    spec = k8s[("Deployment", "metanet")]["spec"]["template"]["spec"]
    pause = int(pod["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_timeout_s + pause


def test_service_ingress_and_hpa_point_at_the_deployment(k8s) -> None:
    deployment = k8s[("Deployment", "metanet")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s[("Service", "metanet")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]
    hpa = k8s[("HorizontalPodAutoscaler", "metanet")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "metanet"}
    assert hpa["minReplicas"] >= 2
    for (kind, _), ingress in k8s.items():
        if kind == "Ingress":
            for path in ingress["spec"]["rules"][0]["http"]["paths"]:
                assert path["backend"]["service"] == {"name": "metanet", "port": {"name": "http"}}


def test_the_store_url_names_the_redis_service_and_redis_persists_every_write(k8s, config) -> None:
    url = urlsplit(config.store_url)
    service = k8s[("Service", url.hostname)]
    assert [port["port"] for port in service["spec"]["ports"]] == [url.port or 6379]
    redis = k8s[("StatefulSet", url.hostname)]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (pod,) = redis["spec"]["template"]["spec"]["containers"]
    options = redis_options(pod["args"])
    assert_durable(options)
    assert [m["mountPath"] for m in pod["volumeMounts"]] == [options["dir"]]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == pod["volumeMounts"][0]["name"]
    assert [port["containerPort"] for port in pod["ports"]] == [int(options.get("port", 6379))]


def test_the_gpu_overlay_adds_one_gpu_to_the_service_container(k8s) -> None:
    overlay = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../base"]
    (patch_ref,) = overlay["patches"]
    patch = yaml.safe_load((K8S / "gpu" / patch_ref["path"]).read_text())
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", "metanet")
    (pod,) = patch["spec"]["template"]["spec"]["containers"]
    assert pod["name"] == container(k8s)["name"]
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings_from({e["name"]: e["value"] for e in pod["env"]}).device == "cuda"


def test_compose_and_kubernetes_run_the_same_command(compose, k8s) -> None:
    assert compose["services"][REPLICAS[0]]["command"] == container(k8s)["command"] == ["metanet", "serve"]
