"""Static checks of docker/, docker-compose.yml and k8s/ against the code they deploy.

No Docker engine runs here, so these tests prove what can be proved without one: every
environment variable the manifests set is a valid ``Settings`` field with a valid value,
every command is a real ``xmodal`` subcommand, every path the Dockerfile copies exists, and
Prometheus scrapes the ports the processes actually listen on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import COMMANDS
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = set(COMMANDS)  # the CLI's own table, so a new or renamed command is seen here


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((REPO / "k8s" / "base").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(__import__("os").environ):
        if key.startswith("XMODAL_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings()


def test_compose_services_and_env_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = _compose()
    services = compose["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)
    for name in ("api", "worker"):
        svc = services[name]
        assert svc["command"][0] in SUBCOMMANDS, f"{name}: unknown subcommand {svc['command']}"
        settings = _settings_from_env(svc["environment"], monkeypatch)
        assert settings.redis_url == "redis://redis:6379/0"
        assert not settings.embedded
        assert (REPO / svc["build"]["dockerfile"]).is_file()
    api_settings = _settings_from_env(services["api"]["environment"], monkeypatch)
    assert api_settings.worker.embedded is False, "API replicas must not run their own worker"


def test_k8s_env_and_args_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "StatefulSet", "Deployment", "Service"} <= kinds
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "xmodal-config"
    )
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    xmodal_containers = [
        c
        for w in workloads
        for c in w["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("xmodal")
    ]
    assert len(xmodal_containers) == 2
    for container in xmodal_containers:
        assert container["args"][0] in SUBCOMMANDS
        env = dict(config["data"])
        env.update({e["name"]: e.get("value", "pod-name") for e in container.get("env", [])})
        settings = _settings_from_env(env, monkeypatch)
        assert settings.redis_url is not None
    api = next(c for c in xmodal_containers if c["args"][0] == "serve")
    probes = {api["readinessProbe"]["httpGet"]["path"], api["livenessProbe"]["httpGet"]["path"]}
    assert probes == {"/readyz", "/healthz"}


def test_dockerfile_copies_existing_paths_and_runs_the_cli() -> None:
    text = (REPO / "docker" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:  # --from: a build stage's path
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies missing path {src}"
    assert 'ENTRYPOINT ["xmodal"]' in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'xmodal = "service.cli:main"' in pyproject


def test_prometheus_scrapes_the_ports_processes_listen_on() -> None:
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    prom = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    ports = {job["job_name"]: job["dns_sd_configs"][0]["port"] for job in prom["scrape_configs"]}
    assert ports["xmodal-api"] == defaults.port
    assert ports["xmodal-worker"] == defaults.worker.metrics_port


def test_grafana_dashboard_queries_metrics_the_service_exports() -> None:
    dashboard_path = REPO / "docker" / "grafana" / "dashboards" / "xmodal.json"
    dashboard = json.loads(dashboard_path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 6
    from prometheus_client import REGISTRY

    import service.metrics  # noqa: F401  (registers the metrics)

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = set()
    for metric in REGISTRY.collect():
        exported.update(metric.name + suffix for suffix in suffixes.get(metric.type, ("",)))
    for expr in exprs:
        for name in re.findall(r"\b(xmodal_[a-z0-9_]+)", expr):
            assert name in exported, f"dashboard queries {name}, which the service does not export"
