"""docker-compose.yml, loaded with a Compose-spec parser and checked against the repo and code.

``compose-spec`` (PyPI, Rust bindings of the Compose specification) parses and validates the
file (YAML merge keys applied, as Compose does); on top of that these tests check what a schema
cannot: every reference resolves (services, volumes, networks, bind-mounted paths, the
Dockerfiles), every ``XMODAL_*`` variable is a valid ``Settings`` field with a valid value,
every command is a real ``xmodal`` subcommand whose arguments parse, Redis runs with AOF on a
named volume, Prometheus loads the alert rules, Grafana is provisioned, and the ``gpu``
profile reserves a GPU for the CUDA worker.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import COMMANDS
from service.settings import Settings
from tests.deploy_env import unknown_xmodal_vars

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
XMODAL_SERVICES = ("api", "api-2", "worker", "worker-gpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as the Compose-spec parser resolved and validated it."""
    compose_spec = pytest.importorskip("compose_spec", reason="pip install compose-spec")
    from compose_spec.compose_spec import PyOptions

    inner = PyOptions(apply_merge=True).from_yaml(COMPOSE.read_text())
    parsed = compose_spec.PyCompose(inner)
    parsed.validate()  # references: networks, volumes, configs, secrets
    parsed.to_spec()  # the full Compose-spec model (pydantic) accepts every field
    data: dict[str, Any] = parsed.to_dict()
    return data


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    assert unknown_xmodal_vars(env) == [], "unknown XMODAL_* settings"
    for key in list(os.environ):
        if key.startswith("XMODAL_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings(_env_file=None)  # type: ignore[call-arg]


def _named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """target -> named volume of a service's short-syntax volumes (bind mounts left out)."""
    out: dict[str, str] = {}
    for spec in service.get("volumes", []):
        source, _, rest = str(spec).partition(":")
        if rest and not source.startswith((".", "/")):
            out[rest.split(":")[0]] = source
    return out


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    out = []
    for spec in service.get("volumes", []):
        source, _, rest = str(spec).partition(":")
        if source.startswith("."):
            out.append(((REPO / source).resolve(), rest.split(":")[0]))
    return out


def test_parser_sees_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "api", "api-2", "worker", "worker-gpu", "prometheus", "grafana"} <= set(
        services
    )
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for network in svc.get("networks", {}) or {}:
            assert network in compose.get("networks", {}), f"{name}: undeclared network"


def test_volumes_are_named_declared_and_used(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = {v for svc in compose["services"].values() for v in _named_volumes(svc).values()}
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert declared <= used, f"declared but unused volumes: {declared - used}"
    # Each API replica owns its index volume (galleries are not shared between processes).
    api_volumes = [_named_volumes(compose["services"][n])["/data"] for n in ("api", "api-2")]
    assert len(set(api_volumes)) == 2
    for svc in compose["services"].values():
        for path, _target in _bind_mounts(svc):
            assert path.exists(), f"bind mount source {path} does not exist"


def test_images_are_pinned_and_built_from_existing_dockerfiles(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{name}: image {image!r} must have a pinned tag"
        if "build" in svc:
            assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert compose["services"]["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"


@pytest.mark.parametrize("name", XMODAL_SERVICES)
def test_xmodal_services_run_real_commands_with_valid_settings(
    name: str, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = compose["services"][name]
    command, *args = svc["command"]
    assert command in COMMANDS, f"{name}: unknown subcommand {command}"
    module = importlib.import_module(f"service.commands.{command}")
    module.parse_args(args)  # argparse exits (SystemExit) on an unknown flag
    settings = _settings(svc["environment"], monkeypatch)
    assert settings.redis_url is not None and not settings.embedded
    host = settings.redis_url.split("//", 1)[1].split(":", 1)[0]
    assert host in compose["services"], f"{name}: Redis host {host} is not a service"
    assert compose["services"][host]["image"].startswith("redis:")
    assert "redis" in svc["depends_on"]
    media_root = str(settings.ingest.media_root)
    assert _named_volumes(svc)[media_root] == "media", (
        f"{name}: {media_root} must be the media volume"
    )
    if command == "serve":
        assert settings.worker.embedded is False, "API replicas must not run their own worker"
        assert "api" in svc["networks"]["default"]["aliases"]
    else:
        hc = svc["healthcheck"]["test"]
        assert f"127.0.0.1:{settings.worker.metrics_port}/metrics" in hc[-1]
        assert (REPO / "docker" / Path(hc[2]).name).is_file()


def test_redis_keeps_an_append_only_file_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] in ("always", "everysec")
    assert _named_volumes(redis)["/data"] in compose["volumes"]
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_gpu_profile_reserves_a_gpu_for_the_cuda_worker(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert all(
        "gpu" not in svc.get("profiles", []) for n, svc in services.items() if n != "worker-gpu"
    )
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert _settings(gpu["environment"], monkeypatch).model.device == "cuda"
    assert _settings(services["worker"]["environment"], monkeypatch).model.device == "cpu"
    # scraped by the same job as the CPU workers
    assert gpu["networks"]["default"]["aliases"] == ["worker"]


def test_prometheus_loads_the_config_and_alert_rules_it_mounts(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    mounts = {target: path for path, target in _bind_mounts(prom)}
    config_target = "/etc/prometheus/prometheus.yml"
    assert mounts[config_target] == REPO / "docker" / "prometheus.yml"
    assert f"--config.file={config_target}" in prom["command"]
    config = yaml.safe_load(mounts[config_target].read_text())
    rule_files = config["rule_files"]
    assert rule_files, "Prometheus must load the alert rules"
    for rule_file in rule_files:
        # rule_files are relative to the config file's directory inside the container
        target = str(Path(config_target).parent / rule_file)
        host = next(
            (
                src / Path(target).relative_to(t)
                for t, src in mounts.items()
                if target.startswith(t + "/")
            ),
            None,
        )
        assert host is not None and host.is_file(), f"rule file {rule_file} is not mounted"
        assert host == REPO / "docker" / "prometheus" / "alerts.yml"
        assert "groups" in yaml.safe_load(host.read_text())
    scrape_hosts = {
        name
        for job in config["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for name in sd["names"]
    }
    aliases = set(compose["services"]) | {
        a
        for s in compose["services"].values()
        for a in (s.get("networks") or {}).get("default", {}).get("aliases", [])
    }
    assert scrape_hosts <= aliases, f"Prometheus scrapes unknown hosts {scrape_hosts - aliases}"


def test_grafana_is_provisioned_with_the_datasource_and_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {target: path for path, target in _bind_mounts(grafana)}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = [
        ds
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for ds in yaml.safe_load(f.read_text())["datasources"]
    ]
    prom = next(ds for ds in datasources if ds["type"] == "prometheus")
    assert prom["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]
    providers = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    dashboards_target = providers[0]["options"]["path"]
    dashboards = mounts[dashboards_target]
    assert sorted(dashboards.glob("*.json")), f"no dashboard JSON in {dashboards}"
    assert "grafana-data" in _named_volumes(grafana).values()
