"""k8s/: the kustomize base and the cpu / gpu overlays, rendered and validated.

Rendering: ``kubectl kustomize`` (or a ``kustomize`` binary) when one is installed, and always a
small Python renderer (resources, components, namespace, labels, images, strategic-merge
patches) that must agree with it, so the checks still run where neither binary exists. Every
rendered object of a built-in kind passes ``kubernetes-validate --strict`` (offline OpenAPI
schemas, PyPI); the CRDs (ServiceMonitor, KEDA ScaledObject) get structural checks. Then the
references: probes, Services -> pods -> named ports, HPA / PDB targets, env valid for
``Settings`` (ConfigMap + Secret + container env), real subcommands, the GPU patch, Redis AOF.
``checkov`` runs on the rendered overlays when it is installed (its findings are fixed, or
skipped in the manifests with a reason).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import COMMANDS
from service.settings import Settings
from tests.deploy_env import unknown_xmodal_vars

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
TARGETS = {"base": K8S, "cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name"}

Obj = dict[str, Any]


# --- a small kustomize -----------------------------------------------------------------------


def _merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge for what these manifests patch: maps recursively, named lists by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        field = MERGE_KEYS[key]
        merged = [copy.deepcopy(p) for p in patch]
        index = {item[field]: i for i, item in enumerate(merged)}
        for item in base:
            if item[field] in index:
                merged[index[item[field]]] = _merge(item, merged[index[item[field]]], None)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def _containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def _render_py(root: Path) -> list[Obj]:
    kust = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs: list[Obj] = []
    for res in kust.get("resources", []):
        path = root / res
        if path.is_dir():
            docs.extend(_render_py(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for comp in kust.get("components", []):
        comp_root = root / comp
        comp_k = yaml.safe_load((comp_root / "kustomization.yaml").read_text())
        assert comp_k["kind"] == "Component"
        docs.extend(
            d
            for r in comp_k.get("resources", [])
            for d in yaml.safe_load_all((comp_root / r).read_text())
            if d
        )
    if "namespace" in kust:
        for d in docs:
            if d["kind"] != "Namespace":
                d["metadata"]["namespace"] = kust["namespace"]
    for p in kust.get("patches", []):
        patch = yaml.safe_load((root / p["path"]).read_text())
        for i, d in enumerate(docs):
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"]):
                docs[i] = _merge(d, patch)
    for label in kust.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kust.get("images", []):
        for d in docs:
            for c in _containers(d):
                name = (
                    c["image"].split("@")[0].rsplit(":", 1)[0] if ":" in c["image"] else c["image"]
                )
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _render_bin(root: Path) -> list[Obj] | None:
    cmd = _kustomize_cmd()
    if cmd is None:
        return None
    out = subprocess.run([*cmd, str(root)], capture_output=True, text=True, check=True, timeout=60)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _normalized(docs: list[Obj]) -> list[str]:
    def norm(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        if isinstance(x, list):
            items = [norm(v) for v in x]
            if items and all(isinstance(v, dict) and "name" in v for v in items):
                items.sort(key=lambda v: str(v["name"]))
            return items
        return x

    return sorted(json.dumps(norm(d), sort_keys=True) for d in docs)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    name = str(request.param)
    return name, _render_py(TARGETS[name])


def _one(docs: list[Obj], kind: str, name: str) -> Obj:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_python_renderer_agrees_with_kustomize(name: str) -> None:
    real = _render_bin(TARGETS[name])
    if real is None:
        pytest.skip("no kustomize or kubectl binary; the Python renderer alone is checked")
    assert _normalized(_render_py(TARGETS[name])) == _normalized(real)


def test_every_builtin_object_passes_kubernetes_validate(rendered: tuple[str, list[Obj]]) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import SchemaNotFoundError

    _, docs = rendered
    version = kv.latest_version()
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    assert len(builtin) >= 14
    for d in builtin:
        try:
            kv.validate(d, version, strict=True)
        except SchemaNotFoundError as exc:  # pragma: no cover - a kind we did not expect
            pytest.fail(f"{d['kind']}/{d['metadata']['name']}: no schema ({exc})")
        except kv.ValidationError as exc:
            pytest.fail(
                f"{d['kind']}/{d['metadata']['name']} invalid: {exc.message} at {list(exc.path)}"
            )
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "xmodal", d["metadata"]["name"]


def test_base_has_every_object_the_deployment_needs(rendered: tuple[str, list[Obj]]) -> None:
    _, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {
        ("Namespace", "xmodal"),
        ("ConfigMap", "xmodal-config"),
        ("Secret", "xmodal-api-keys"),
        ("StatefulSet", "api"),
        ("Service", "api"),
        ("Service", "api-headless"),
        ("HorizontalPodAutoscaler", "api"),
        ("PodDisruptionBudget", "api"),
        ("Deployment", "worker"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("ServiceMonitor", "xmodal"),
    }
    assert expected <= kinds, f"missing: {expected - kinds}"


def test_api_statefulset_probes_and_own_volume(rendered: tuple[str, list[Obj]]) -> None:
    _, docs = rendered
    api = _one(docs, "StatefulSet", "api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    assert port_names["http"] == Settings(_env_file=None).port  # type: ignore[call-arg]
    claims = {c["metadata"]["name"] for c in api["spec"]["volumeClaimTemplates"]}
    data_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert data_mount["name"] in claims, "each replica needs its own data volume"
    headless = _one(docs, "Service", api["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert "nvidia.com/gpu" not in json.dumps(api), "API replicas run on CPU"


def test_services_hpa_pdb_select_real_pods(rendered: tuple[str, list[Obj]]) -> None:
    _, docs = rendered
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]

    def pods_for(selector: dict[str, str]) -> list[Obj]:
        return [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]

    for svc in (d for d in docs if d["kind"] == "Service"):
        targets = pods_for(svc["spec"]["selector"])
        assert len(targets) == 1, (
            f"Service {svc['metadata']['name']} selects {len(targets)} workloads"
        )
        names = {p["name"] for c in _containers(targets[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (
                f"{svc['metadata']['name']}: no port {port['targetPort']}"
            )
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert len(pods_for(pdb["spec"]["selector"]["matchLabels"])) == 1
    hpa = _one(docs, "HorizontalPodAutoscaler", "api")
    ref = hpa["spec"]["scaleTargetRef"]
    _one(docs, ref["kind"], ref["name"])
    assert (
        hpa["spec"]["minReplicas"]
        >= 2
        > _one(docs, "PodDisruptionBudget", "api")["spec"]["minAvailable"]
    )


def test_env_is_valid_settings_and_commands_exist(
    rendered: tuple[str, list[Obj]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, docs = rendered
    xmodal = [
        (w, c)
        for w in docs
        if w["kind"] in ("StatefulSet", "Deployment")
        for c in _containers(w)
        if c["image"].startswith("xmodal")
    ]
    assert {c["args"][0] for _, c in xmodal} == {"serve", "worker"}
    for workload, container in xmodal:
        command, *args = container["args"]
        assert command in COMMANDS
        importlib.import_module(f"service.commands.{command}").parse_args(args)
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            obj = _one(docs, kind, ref["name"])
            env.update(obj.get("data") or obj.get("stringData") or {})
        for entry in container.get("env", []):
            if "valueFrom" in entry:
                assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                env[entry["name"]] = workload["metadata"]["name"] + "-pod"
            else:
                env[entry["name"]] = entry["value"]
        assert unknown_xmodal_vars(env) == [], f"{workload['metadata']['name']}: unknown settings"
        for key in list(os.environ):
            if key.startswith("XMODAL_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.redis_url == "redis://redis:6379/0"
        _one(docs, "Service", "redis")
        assert settings.auth.read_keys and settings.auth.write_keys or command == "worker"
        if command == "serve":
            assert settings.worker.embedded is False
        else:
            metrics_port = next(p for p in container["ports"] if p["name"] == "metrics")
            assert metrics_port["containerPort"] == settings.worker.metrics_port
            assert container["livenessProbe"]["httpGet"]["port"] == "metrics"


def test_worker_device_per_overlay(rendered: tuple[str, list[Obj]]) -> None:
    name, docs = rendered
    worker = _one(docs, "Deployment", "worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    if name == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["XMODAL_MODEL__DEVICE"] == "cuda"
        assert container["image"] == "xmodal-cuda:0.1.0"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        assert "XMODAL_WORKER__CONSUMER" in env, "the patch must keep the base env"
        assert (REPO / "docker" / "Dockerfile.cuda").is_file()
    else:
        assert "nvidia.com/gpu" not in json.dumps(worker)
        assert env["XMODAL_MODEL__DEVICE"] == "cpu"
        assert container["image"] == "xmodal:0.1.0"
        assert worker["spec"]["replicas"] == (2 if name == "cpu" else 1)


def test_images_are_pinned(rendered: tuple[str, list[Obj]]) -> None:
    _, docs = rendered
    for d in docs:
        for c in _containers(d):
            tag = c["image"].rsplit(":", 1)[-1] if ":" in c["image"] else ""
            assert tag and tag != "latest", f"{d['metadata']['name']}: unpinned image {c['image']}"


def test_redis_keeps_an_aof_on_its_claim(rendered: tuple[str, list[Obj]]) -> None:
    _, docs = rendered
    redis = _one(docs, "StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == data_dir)
    assert mount["name"] in {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}


def test_service_monitor_scrapes_api_and_workers(rendered: tuple[str, list[Obj]]) -> None:
    _, docs = rendered
    monitor = _one(docs, "ServiceMonitor", "xmodal")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s
        for s in docs
        if s["kind"] == "Service" and selector.items() <= s["metadata"].get("labels", {}).items()
    ]
    assert {s["metadata"]["name"] for s in services} == {"api", "worker-metrics"}
    port_names = {p["name"] for s in services for p in s["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["xmodal"]


def test_keda_component_scales_workers_on_the_ingest_stream(tmp_path: Path) -> None:
    import inspect

    from service.queue import RedisStreamQueue

    stream_default = inspect.signature(RedisStreamQueue).parameters["stream"].default
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(TARGETS["gpu"], tmp_path)],
                "components": [os.path.relpath(K8S / "components" / "keda", tmp_path)],
            }
        )
    )
    docs = _render_py(tmp_path)
    real = _render_bin(tmp_path)
    if real is not None:
        assert _normalized(docs) == _normalized(real)
    scaled = _one(docs, "ScaledObject", "worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    _one(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["stream"] == stream_default
    host, port = trigger["metadata"]["address"].split(":")
    assert host == "redis.xmodal.svc.cluster.local" and int(port) == 6379
    assert int(trigger["metadata"]["streamLength"]) > 0
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]


def test_checkov_finds_nothing_unexplained(tmp_path: Path) -> None:
    checkov = shutil.which("checkov")
    if checkov is None:
        pytest.skip("checkov not installed (pip install checkov, best in its own venv)")
    files = []
    for name in ("cpu", "gpu"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(_render_py(TARGETS[name])))
        files += ["-f", str(path)]
    result = subprocess.run(
        [
            checkov,
            *files,
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--quiet",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [c for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert failed == [], [(c["check_id"], c["resource"]) for c in failed]
    skipped = [c for r in reports for c in r.get("results", {}).get("skipped_checks", [])]
    assert all(c.get("suppress_comment") for c in skipped), "every skip needs a reason"
