"""docker-compose.yml, its Dockerfile and Prometheus config, checked without a Docker engine."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.infra.settings import Settings, env_var_names, load_settings
from recstream.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = "/var/lib/recstream"
INFRASTRUCTURE = {"kafka", "redis", "prometheus", "grafana"}
DAEMONS = ("stream", "lander", "serving", "scheduler")

# The port each daemon's settings say it listens on.
CONFIGURED_PORT: dict[str, Callable[[Settings], int]] = {
    "stream": lambda s: s.stream.trainer_metrics_port,
    "lander": lambda s: s.stream.lander_metrics_port,
    "serving": lambda s: s.serving.port,
    "scheduler": lambda s: s.nightly.metrics_port,
}
CONFIGURED_HOST: dict[str, Callable[[Settings], str]] = {
    "stream": lambda s: s.stream.metrics_host,
    "lander": lambda s: s.stream.metrics_host,
    "serving": lambda s: s.serving.host,
    "scheduler": lambda s: s.nightly.metrics_host,
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings, from either compose syntax (map or list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each volume, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
        else:
            source, target, *mode = volume.split(":")
            mounts.append((source, target, "ro" in mode[0].split(",") if mode else False))
    return mounts


def exposed(services: dict[str, dict[str, Any]], name: str) -> set[str]:
    return {f"{name}:{port}" for port in services[name].get("expose", [])}


def test_services_are_the_infrastructure_and_the_daemons(services: dict[str, Any]) -> None:
    assert set(services) == INFRASTRUCTURE | set(DAEMONS)


def test_every_image_is_pinned_to_a_tag(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service["image"]
        if "@sha256:" in image:
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned to a tag"


def test_daemons_share_one_build_and_one_image(services: dict[str, Any]) -> None:
    builds = {json.dumps(services[name]["build"], sort_keys=True) for name in DAEMONS}
    images = {services[name]["image"] for name in DAEMONS}
    assert builds == {json.dumps(".")}
    assert len(images) == 1


def test_daemons_keep_state_on_the_shared_volume_at_recstream_home(
        services: dict[str, Any]) -> None:
    sources = set()
    for name in DAEMONS:
        assert environment(services[name])["RECSTREAM_HOME"] == STATE_DIR, name
        mounted = {source for source, target, _ in volume_mounts(services[name])
                   if target == STATE_DIR}
        assert len(mounted) == 1, f"{name}: no volume at {STATE_DIR}"
        sources |= mounted
    assert len(sources) == 1, f"daemons mount different state volumes: {sources}"


def test_daemons_have_a_healthcheck(services: dict[str, Any]) -> None:
    for name in DAEMONS:
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), name


def test_serving_health_is_its_healthz_endpoint(services: dict[str, Any]) -> None:
    assert "/healthz" in " ".join(services["serving"]["healthcheck"]["test"])


@pytest.mark.parametrize("name", ["stream", "lander", "scheduler"])
def test_daemon_health_is_the_healthz_of_its_metrics_endpoint(services: dict[str, Any],
                                                               name: str) -> None:
    settings = load_settings(environment(services[name]))
    port = CONFIGURED_PORT[name](settings)
    assert f":{port}/healthz" in " ".join(services[name]["healthcheck"]["test"])


def test_daemons_restart_unless_stopped(services: dict[str, Any]) -> None:
    for name in DAEMONS:
        assert services[name].get("restart") == "unless-stopped", name


def test_daemons_wait_for_healthy_kafka_and_redis(services: dict[str, Any]) -> None:
    for name in DAEMONS:
        depends = services[name].get("depends_on", {})
        for dependency in ("kafka", "redis"):
            assert depends.get(dependency, {}).get("condition") == "service_healthy", (
                f"{name} does not wait for a healthy {dependency}")


def test_kafka_and_redis_have_healthchecks(services: dict[str, Any]) -> None:
    assert services["kafka"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_published_ports_bind_loopback_only(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port!r}"


def test_recstream_variables_are_known_settings(services: dict[str, Any]) -> None:
    known = set(env_var_names())
    for name, service in services.items():
        unknown = {key for key in environment(service)
                   if key.startswith("RECSTREAM_")} - known
        assert not unknown, f"{name}: unknown settings {sorted(unknown)}"


@pytest.mark.parametrize("name", DAEMONS)
def test_daemon_environment_passes_settings_validation(
        services: dict[str, Any], name: str) -> None:
    settings = load_settings(environment(services[name]))
    assert settings.kafka.bootstrap == "kafka:9092"
    assert settings.redis.url == "redis://redis:6379/0"


@pytest.mark.parametrize("name", sorted(CONFIGURED_HOST))
def test_daemon_listens_on_all_interfaces_in_its_container(
        services: dict[str, Any], name: str) -> None:
    assert CONFIGURED_HOST[name](load_settings(environment(services[name]))) == "0.0.0.0"


@pytest.mark.parametrize("name", sorted(CONFIGURED_PORT))
def test_daemon_exposes_the_port_its_settings_name(services: dict[str, Any], name: str) -> None:
    port = CONFIGURED_PORT[name](load_settings(environment(services[name])))
    assert exposed(services, name) == {f"{name}:{port}"}


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, _, _ in volume_mounts(service):
            if not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_prometheus_config_is_mounted_read_only(services: dict[str, Any]) -> None:
    mounts = volume_mounts(services["prometheus"])
    assert ("./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml",
            True) in mounts


def test_grafana_mounts_provisioning_and_dashboards(services: dict[str, Any]) -> None:
    sources = {source for source, _, _ in volume_mounts(services["grafana"])}
    assert {"./deploy/grafana/provisioning", "./deploy/grafana/dashboards"} <= sources


def test_prometheus_scrapes_exactly_the_daemons_exposed_ports(
        services: dict[str, Any], prometheus: dict[str, Any]) -> None:
    targets = [target for job in prometheus["scrape_configs"]
               for static in job.get("static_configs", []) for target in static["targets"]]
    declared = set().union(*(exposed(services, name) for name in DAEMONS))
    assert sorted(targets) == sorted(declared)


def test_prometheus_scrapes_every_15_seconds(prometheus: dict[str, Any]) -> None:
    assert prometheus["global"]["scrape_interval"] == "15s"


def test_dockerfile_installs_pinned_torch_before_the_project(dockerfile: list[str]) -> None:
    runs = [line for line in dockerfile if line.startswith("RUN ")]
    torch = next(i for i, line in enumerate(runs) if "torch==2.13.0" in line)
    project = next(i for i, line in enumerate(runs) if re.search(r"pip install \.(\s|$)", line))
    assert torch < project


def test_dockerfile_runs_as_a_non_root_user(dockerfile: list[str]) -> None:
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_entrypoint_is_recstream(dockerfile: list[str]) -> None:
    entrypoints = [line for line in dockerfile if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoints[-1].removeprefix("ENTRYPOINT ")) == ["recstream"]


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "var", ".git"} <= ignored


@pytest.mark.parametrize("name", DAEMONS)
def test_daemon_command_is_a_recstream_subcommand(services: dict[str, Any], name: str) -> None:
    command = services[name]["command"]
    try:
        args = build_parser().parse_args(command)
    except SystemExit:
        pytest.fail(f"{name}: `recstream {' '.join(command)}` is not a valid command")
    assert args.command == command[0]
