"""deploy/: the container, compose, Kubernetes, Prometheus and Grafana files, checked without building or running
any of them (no Docker daemon here).

* Kubernetes manifests against the API schemas of one fixed version with kubernetes-validate in strict mode
  (unknown fields fail), plus the references between them (selectors, port names, ConfigMap, volume, HPA target).
* compose.yaml against the Compose Specification's JSON schema (vendored beside it), plus services, ports,
  volumes, settings, health checks and the Prometheus scrape targets.
* promtool: ``check rules``, ``check config``, ``test rules`` (and that the rule tests fail when an alert is broken).
* Every metric name (and label name) used by the Grafana dashboard, the alert rules, their tests, the HPA and the
  prometheus-adapter rule is one the code really exports: the exposition text of ``ServerMetrics`` and
  ``EdgeMetrics``, rendered in-process.
* Every environment variable given to a daemon is a field of its settings class, with a valid value.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow  # promtool, compose and container checks (about 17 s)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_SCHEMA = DEPLOY / "compose" / "compose-spec.schema.json"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "container" / "Dockerfile.dockerignore"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "splitinfer.json"

# The newest Kubernetes whose schemas kubernetes-validate 1.37.0 ships (it works offline).
K8S_VERSION = "1.37"
# Kinds kubernetes-validate has no schema for; each is checked structurally below instead.
NOT_SCHEMA_VALIDATED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "a CRD of the Prometheus Operator; kubernetes-validate only "
                                                    "has the schemas of built-in kinds",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomize's build file, not an API object",
}
# Labels Prometheus attaches when scraping (compose: job, instance; Kubernetes service discovery: the rest).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
DAEMONS = {"cloud-1": "cloud", "cloud-2": "cloud", "edge": "edge"}
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def _k8s_objects() -> dict[tuple[str, str], dict]:
    objs = {}
    for path in _k8s_files():
        for doc in _yaml_docs(path):
            objs[(doc["kind"], doc["metadata"]["name"] if "metadata" in doc else path.name)] = doc
    return objs


def _cloud_config() -> dict[str, str]:
    return _k8s_objects()[("ConfigMap", "splitinfer-cloud-config")]["data"]


def _deployment() -> dict:
    return _k8s_objects()[("Deployment", "splitinfer-cloud")]


def _container() -> dict:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    return container


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _listening_ports(name: str, service: dict) -> set[int]:
    """The container ports a compose service listens on (daemons: from their settings; images: known)."""
    env = _env(service)
    if DAEMONS.get(name) == "cloud":
        return {int(env["SPLITINFER_CLOUD_PORT"]), int(env["SPLITINFER_CLOUD_METRICS_PORT"])}
    if DAEMONS.get(name) == "edge":
        return {int(env["SPLITINFER_EDGE_PORT"])}
    return {"prometheus": {9090}, "grafana": {3000}}[name]


def _metrics_port(name: str, service: dict) -> int:
    env = _env(service)
    return int(env["SPLITINFER_CLOUD_METRICS_PORT"] if DAEMONS[name] == "cloud" else env["SPLITINFER_EDGE_PORT"])


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        assert m.start() == pos, f"bad duration {text!r}"
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    assert pos == len(text) and pos > 0, f"bad duration {text!r}"
    return total


def _bind_mounts(service: dict) -> dict[str, tuple[Path, bool]]:
    """target -> (absolute source, read-only) for the bind mounts of a compose service (long syntax only)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict) and v.get("type") == "bind":
            out[v["target"]] = ((COMPOSE.parent / v["source"]).resolve(), bool(v.get("read_only")))
    return out


def _settings_env(monkeypatch, env: dict[str, str]) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(("SPLITINFER_CLOUD_", "SPLITINFER_EDGE_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _check_cloud_env(monkeypatch, env: dict[str, str]):
    from cloud_server.settings import CloudSettings

    fields = set(CloudSettings.model_fields)
    unknown = [k for k in env if k.startswith("SPLITINFER_CLOUD_") and k[17:].lower() not in fields]
    assert not unknown, f"not CloudSettings fields: {unknown}"
    _settings_env(monkeypatch, {k: v for k, v in env.items() if k.startswith("SPLITINFER_CLOUD_")})
    return CloudSettings()


def _check_edge_env(monkeypatch, env: dict[str, str]):
    from edge_agent.settings import EdgeSettings

    fields = set(EdgeSettings.model_fields)
    unknown = [k for k in env if k.startswith("SPLITINFER_EDGE_") and k[16:].lower() not in fields]
    assert not unknown, f"not EdgeSettings fields: {unknown}"
    _settings_env(monkeypatch, {k: v for k, v in env.items() if k.startswith("SPLITINFER_EDGE_")})
    return EdgeSettings.load()


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitinfer", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


# ---- metric names: what the code exports, and what a PromQL expression uses --------------------------------------


def _exported(text: str) -> dict[str, set[str] | None]:
    """Series name -> label names seen (None when the family has no sample yet) from exposition text."""
    names: dict[str, set[str] | None] = {}
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m.groups()
        if name.endswith("_created"):
            continue
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}.get(kind, ("",))
        for suffix in suffixes:
            names.setdefault(name + suffix, None)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                names[sample.name] = (names[sample.name] or set()) | set(sample.labels)
    return names


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str] | None]:
    """Every series name the server and the edge agent export, with their label names."""
    from cloud_server.metrics import ServerMetrics
    from edge_agent.metrics import STAGES, EdgeMetrics

    server = ServerMetrics("m")
    edge = EdgeMetrics()
    # Labelled families show their labels only once a child exists; the server creates its children up front.
    edge.duration.labels(stage=STAGES[0])
    edge.declare_exits([4])
    edge.set_operating_point(9, "uint8-affine")
    names = _exported(server.render().decode())
    names.update(_exported(edge.render().decode()))
    names["up"] = set()  # written by Prometheus for every target
    return names


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "Inf", "NaN"}


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every vector selector in a PromQL expression (or series string)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries, Grafana's $__rate_interval included
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    found = []

    def matcher(m: re.Match) -> str:
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        found.append((m.group(1) or "", labels))
        return " "

    s = re.sub(r"(?<![\w:.$])([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}", matcher, s)
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", s):
        if m.group(1) not in _KEYWORDS:
            found.append((m.group(1), set()))
    return found


def _grouping_labels(expr: str) -> set[str]:
    """Label names in by/without/on/ignoring/group_left/group_right clauses."""
    lists = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
    return {label.strip() for labels in lists for label in labels.split(",") if label.strip()}


def _metric_problems(exprs: dict[str, str], exported: dict[str, set[str] | None]) -> list[str]:
    """What is wrong with the metric and label names of ``exprs`` (where -> expression); empty when all is real."""
    problems = []
    for where, expr in exprs.items():
        selectors = _selectors(expr)
        available = set(TARGET_LABELS)
        for name, _ in selectors:
            available |= exported.get(name) or set()
        if _grouping_labels(expr) - available:
            problems.append(f"{where}: grouping by label(s) {sorted(_grouping_labels(expr) - available)} that "
                            f"none of its metrics has ({expr!r})")
        for name, labels in selectors:
            if name not in exported:
                problems.append(f"{where}: {name or '{...}'!r} is not a metric the daemons export ({expr!r})")
                continue
            known = exported[name]
            if labels and known is None:
                problems.append(f"{where}: labels of {name} unknown: create a child in the `exported` fixture")
            elif labels - (known or set()) - TARGET_LABELS - {"__name__"}:
                problems.append(f"{where}: {name} has no label(s) {sorted(labels - (known or set()))}")
    return problems


def _dashboard_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _dashboard_exprs() -> dict[str, str]:
    exprs = {}
    for p in _dashboard_panels(json.loads(DASHBOARD.read_text())):
        for t in p.get("targets", []):
            exprs[f"dashboard panel {p['title']!r} {t['refId']}"] = t["expr"]
    return exprs


def _rule_exprs() -> dict[str, str]:
    return {f"rule {r.get('alert') or r.get('record')}": r["expr"]
            for g in yaml.safe_load((PROM / "rules.yaml").read_text())["groups"] for r in g["rules"]}


def _adapter_rules() -> list[dict]:
    cm = _k8s_objects()[("ConfigMap", "splitinfer-prometheus-adapter-config")]
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def _adapter_exprs() -> dict[str, str]:
    """The adapter's queries with its Go templates filled in as the adapter would."""
    out = {}
    for i, rule in enumerate(_adapter_rules()):
        series = _selectors(rule["seriesQuery"])[0][0]
        out[f"adapter rule {i} seriesQuery"] = rule["seriesQuery"]
        out[f"adapter rule {i} metricsQuery"] = (
            rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="splitinfer",pod=~"splitinfer-cloud-.*"')
            .replace("<<.GroupBy>>", "pod"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# tools


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: it comes with Debian's `prometheus` package, which `make setup` "
                    "installs when run as root (or: apt-get install prometheus)")
    return path


def _promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("path", _k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_manifest_validates_strictly(path):
    docs = _yaml_docs(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in NOT_SCHEMA_VALIDATED:
            continue  # reason in NOT_SCHEMA_VALIDATED; checked structurally in the tests below
        try:
            validated = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{path.name}: {exc.message}; add it to NOT_SCHEMA_VALIDATED only with a reason")
        assert validated == K8S_VERSION


def test_k8s_strict_validation_rejects_unknown_fields():
    doc = copy.deepcopy(_deployment())
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = ""
    with pytest.raises(kubernetes_validate.ValidationError, match="servce"):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    hpa = copy.deepcopy(_k8s_objects()[("HorizontalPodAutoscaler", "splitinfer-cloud")])
    hpa["spec"]["metrics"][0]["pods"]["target"]["type"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


def test_k8s_kustomization_lists_every_top_level_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    top = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == top
    for name in kust["resources"]:
        for doc in _yaml_docs(K8S / name):
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace", kust["namespace"]) == kust["namespace"], name
    image = _container()["image"]
    assert [i["name"] for i in kust["images"]] == [image.split(":")[0]]
    assert kust["images"][0]["newTag"] == image.split(":")[1]


def test_k8s_configmap_holds_valid_cloud_settings(monkeypatch):
    config = _cloud_config()
    s = _check_cloud_env(monkeypatch, config)
    assert s.host == "0.0.0.0"
    assert str(s.bundle or s.model_repository) == "/bundle"
    # Documented (commented) options must be real settings too.
    commented = re.findall(r"#\s*(SPLITINFER_CLOUD_[A-Z0-9_]+):", (K8S / "configmap.yaml").read_text())
    from cloud_server.settings import CloudSettings

    assert commented and all(k[17:].lower() in CloudSettings.model_fields for k in commented), commented


def test_k8s_deployment_runs_the_server_safely():
    dep = _deployment()
    pod = dep["spec"]["template"]["spec"]
    c = _container()
    config = _cloud_config()
    # The image's entrypoint is `splitinfer`; args are a real sub-command.
    assert c["args"] == ["cloud", "serve"]
    # Settings and bundle.
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == ["splitinfer-cloud-config"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    bundle_dir = config.get("SPLITINFER_CLOUD_BUNDLE") or config["SPLITINFER_CLOUD_MODEL_REPOSITORY"]
    (bundle_mount,) = [m for m in mounts.values() if m["mountPath"] == bundle_dir]
    assert bundle_mount["readOnly"] is True
    claim = volumes[bundle_mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in _k8s_objects()
    assert set(mounts) <= set(volumes)
    assert any(m["mountPath"] == "/tmp" for m in mounts.values())  # the only writable path
    # Non-root, read-only root file system, no capabilities, no privilege escalation.
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == _dockerfile_user()
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"] and "add" not in csc["capabilities"]
    # Service links would set SPLITINFER_CLOUD_PORT=tcp://... (Service splitinfer-cloud) and break the settings.
    assert pod["enableServiceLinks"] is False
    # Resources, with well-formed quantities.
    for kind in ("requests", "limits"):
        for res, value in c["resources"][kind].items():
            assert QUANTITY.match(str(value)), f"{kind}.{res}: {value!r}"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    # Ports and probes: gRPC health on the gRPC port the settings configure.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(config["SPLITINFER_CLOUD_PORT"]),
                     "metrics": int(config["SPLITINFER_CLOUD_METRICS_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe
        assert c[probe].get("grpc", {}).get("service", "") == ""  # the server's overall health
    # SIGTERM drains for GRACE_S; the pod must not be killed before that is over.
    grace = float(config["SPLITINFER_CLOUD_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= grace + 10
    assert "lifecycle" not in c  # no preStop: the server drains on SIGTERM
    # Prometheus annotations point at the metrics port.
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == ports["metrics"]


def _labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_services_pdb_and_servicemonitor_select_the_server_pods():
    objs = _k8s_objects()
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(_deployment()["spec"]["selector"]["matchLabels"], pod_labels)
    port_names = {p["name"] for p in _container()["ports"]}
    services = [o for (kind, _), o in objs.items() if kind == "Service"]
    assert services
    for svc in services:
        assert _labels_match(svc["spec"]["selector"], pod_labels), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names and p["name"] == p["targetPort"], p
    main = objs[("Service", "splitinfer-cloud")]
    assert {p["name"]: p["port"] for p in main["spec"]["ports"]} == {"grpc": 8001, "metrics": 8002}
    pdb = objs[("PodDisruptionBudget", "splitinfer-cloud")]
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]), "the API accepts one of the two"
    # ServiceMonitor (not schema-validated): scrapes the Service port named "metrics".
    sm = objs[("ServiceMonitor", "splitinfer-cloud")]
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {"selector", "endpoints", "jobLabel", "namespaceSelector"}
    assert _labels_match(sm["spec"]["selector"]["matchLabels"], main["metadata"]["labels"])
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert ep["port"] in {p["name"] for p in main["spec"]["ports"]} and ep["path"] == "/metrics"
        _duration_s(ep["interval"])


def test_k8s_hpa_scales_on_a_real_metric_served_by_the_adapter(exported):
    objs = _k8s_objects()
    hpa = objs[("HorizontalPodAutoscaler", "splitinfer-cloud")]["spec"]
    dep = _deployment()
    assert hpa["scaleTargetRef"] == {"apiVersion": dep["apiVersion"], "kind": dep["kind"],
                                     "name": dep["metadata"]["name"]}
    assert "replicas" not in dep["spec"]  # the HPA owns it
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name in exported, f"HPA metric {name} is not exported by the server"
    # prometheus-adapter exposes it under exactly that name, per pod and namespace.
    exposed = []
    for rule in _adapter_rules():
        (series, labels), = _selectors(rule["seriesQuery"])
        assert {"namespace", "pod"} <= labels
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        as_ = rule["name"]["as"].replace("${1}", r"\1")
        exposed.append(re.sub(rule["name"]["matches"], as_, series))
    assert name in exposed
    assert not _metric_problems(_adapter_exprs(), exported)
    # The target sits well below the admission limit; the PDB leaves a pod up at minReplicas.
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue" and QUANTITY.match(str(target["averageValue"]))
    assert float(target["averageValue"]) < int(_cloud_config()["SPLITINFER_CLOUD_MAX_INFLIGHT"])
    pdb = objs[("PodDisruptionBudget", "splitinfer-cloud")]["spec"]
    assert hpa["minReplicas"] >= 2 and pdb["maxUnavailable"] < hpa["minReplicas"] <= hpa["maxReplicas"]


def test_k8s_bundle_loader_mounts_the_same_claim():
    pod = _k8s_objects()[("Pod", "splitinfer-bundle-loader")]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"splitinfer-bundle"}
    assert pod["securityContext"]["runAsUser"] == _dockerfile_user()  # files readable by the server


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.endswith("\\"):
            buf += raw[:-1] + " "
            continue
        buf += raw
        op, _, rest = buf.strip().partition(" ")
        lines.append((op.upper(), rest.strip()))
        buf = ""
    return lines


def _dockerfile_user() -> int:
    (user,) = [rest for op, rest in _dockerfile() if op == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit(), "USER must be numeric so Kubernetes' runAsNonRoot can check it"
    return int(uid)


def _dockerignore_excludes(rel: str) -> bool:
    """Docker's .dockerignore semantics (last matching pattern wins; a pattern also matches parents)."""
    excluded = False
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]")
        parts = rel.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerfile_builds_one_non_root_image_for_both_daemons():
    from cloud_server.settings import CloudSettings
    from edge_agent.settings import EdgeSettings

    ins = _dockerfile()
    froms = [rest.split()[0] for op, rest in ins if op == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert [json.loads(rest) for op, rest in ins if op == "ENTRYPOINT"] == [list(pyproject["project"]["scripts"])]
    assert [json.loads(rest) for op, rest in ins if op == "CMD"] == [["cloud", "serve"]]
    exposed = {int(p) for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert exposed == {8001, 8002, 8080}
    assert exposed == {CloudSettings.model_fields["port"].default, CloudSettings.model_fields["metrics_port"].default,
                       EdgeSettings.model_fields["port"].default}
    assert _dockerfile_user() > 0
    # torch is installed first from a CPU index; its version must be the project's pin.
    (torch_pin,) = [d for d in pyproject["project"]["optional-dependencies"]["torch"] if re.match(r"torch\s*==", d)]
    args = dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)
    assert args["TORCH_VERSION"] == torch_pin.split("==")[1].strip()
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert "torch==${TORCH_VERSION}" in runs and 'pip install ".[cloud,edge]"' in runs and "pip check" in runs
    # Inside a container the daemons listen on every interface and read the bundle from /bundle.
    env = " ".join(rest for op, rest in ins if op == "ENV")
    for setting in ("SPLITINFER_CLOUD_HOST=0.0.0.0", "SPLITINFER_EDGE_HOST=0.0.0.0", "SPLITINFER_CLOUD_BUNDLE=/bundle",
                    "SPLITINFER_EDGE_BUNDLE=/bundle"):
        assert setting in env


def test_dockerfile_copies_what_pip_needs_and_the_context_allows_it():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = []
    for op, rest in _dockerfile():
        if op == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the build context (the repository root)"
        assert not _dockerignore_excludes(src), f"COPY {src} is excluded by {DOCKERIGNORE.name}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= set(sources)
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert sorted(packages) == sorted(s for s in sources if (ROOT / s).is_dir())
    for pkg in packages:  # every source file of the packages reaches the build
        for f in (ROOT / pkg).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts:
                assert not _dockerignore_excludes(str(f.relative_to(ROOT))), f
    for rel in (".venv/bin/python", "runs/bundle/plan.json", "tests/conftest.py", ".git/HEAD",
                "splitinfer/__pycache__/cli.cpython-311.pyc"):
        assert _dockerignore_excludes(rel), rel


@pytest.mark.parametrize("command", [["cloud", "serve"], ["edge", "run"]])
def test_container_commands_exist(command):
    res = _run_cli([*command, "--help"])
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------------------------------------------
# compose


def test_compose_matches_the_compose_spec_schema():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(_compose())]
    assert not errors, errors
    broken = _compose()
    broken["services"]["edge"]["portz"] = ["8080:8080"]
    assert list(validator.iter_errors(broken)), "the schema must reject unknown keys"


def test_compose_services_images_ports_and_mounts():
    services = _compose()["services"]
    assert set(services) == {"cloud-1", "cloud-2", "edge", "prometheus", "grafana"}
    images = set()
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
        for spec in svc.get("ports", []):
            host_ip, host_port, container_port = str(spec).split(":")
            assert host_ip == "127.0.0.1", f"{name}: publish on loopback only ({spec})"
            assert int(container_port) in _listening_ports(name, svc), f"{name}: nothing listens on {spec}"
            int(host_port)
        for port in svc.get("expose", []):
            assert int(port) in _listening_ports(name, svc), f"{name}: exposes {port}"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        if name in DAEMONS:
            build = svc["build"]
            assert (COMPOSE.parent / build["context"]).resolve() == ROOT
            assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
            images.add(svc["image"])
            assert svc["command"][0] == DAEMONS[name]
            assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and "/tmp" in svc["tmpfs"]
            source, read_only = _bind_mounts(svc)["/bundle"]
            assert read_only and source == ROOT / "runs" / "bundle"
        else:
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", svc["image"]), f"{name}: pin the image version"
    assert len(images) == 1, "one image for both daemons"
    commands = [svc["command"] for n, svc in services.items() if n in DAEMONS]
    assert commands == [["cloud", "serve"]] * 2 + [["edge", "run"]]


def test_compose_daemon_settings(monkeypatch):
    services = _compose()["services"]
    cloud_ports = {}
    for name in ("cloud-1", "cloud-2"):
        env = _env(services[name])
        s = _check_cloud_env(monkeypatch, env)
        assert s.host == "0.0.0.0" and str(s.bundle) == "/bundle"
        assert _duration_s(services[name]["stop_grace_period"]) >= s.grace_s + 10
        cloud_ports[name] = s.port
    from edge_agent.settings import parse_address

    env = _env(services["edge"])
    s = _check_edge_env(monkeypatch, env)
    assert s.host == "0.0.0.0" and str(s.bundle) == "/bundle"
    assert _duration_s(services["edge"]["stop_grace_period"]) >= s.grace_s + 10
    # SPLITINFER_EDGE_SERVER: HOST:PORT, or (soon) a comma-separated list of them; each a cloud service's gRPC port.
    for address in env["SPLITINFER_EDGE_SERVER"].split(","):
        host, port = parse_address(address)
        assert host in cloud_ports and port == cloud_ports[host], address


def _serve_grpc_health() -> tuple[grpc.Server, health.HealthServicer, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, port


def _healthcheck_code(service: dict, port: int, real_port: int) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    code = test[3]
    assert f"127.0.0.1:{real_port}" in code
    return code.replace(f"127.0.0.1:{real_port}", f"127.0.0.1:{port}")


def test_compose_cloud_healthcheck_speaks_grpc_health():
    services = _compose()["services"]
    server, servicer, port = _serve_grpc_health()
    try:
        for name in ("cloud-1", "cloud-2"):
            code = _healthcheck_code(services[name], port, int(_env(services[name])["SPLITINFER_CLOUD_PORT"]))
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert ok.returncode == 0, ok.stderr
            servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            draining = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert draining.returncode != 0
    finally:
        server.stop(None)


def test_compose_edge_healthcheck_uses_readyz():
    state = {"code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(state["code"] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        edge = _compose()["services"]["edge"]
        code = _healthcheck_code(edge, httpd.server_address[1], int(_env(edge)["SPLITINFER_EDGE_PORT"]))
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
        state["code"] = 503
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode != 0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_prometheus_scrapes_every_daemon_of_the_compose_file():
    services = _compose()["services"]
    prom = services["prometheus"]
    (config_flag,) = [a for a in prom["command"] if a.startswith("--config.file=")]
    config_path = config_flag.split("=", 1)[1]
    mounts = _bind_mounts(prom)
    (target,) = [t for t in mounts if config_path.startswith(t + "/")]
    assert mounts[target][0] / config_path[len(target) + 1:] == PROM / "prometheus.yml"
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    scraped: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        assert set(job) <= {"job_name", "metrics_path", "static_configs", "scrape_interval"}, job["job_name"]
        for sc in job["static_configs"]:
            for t in sc["targets"]:
                host, port = t.rsplit(":", 1)
                if host == "localhost":
                    assert job["job_name"] == "prometheus" and int(port) in _listening_ports("prometheus", prom)
                    continue
                assert host in services, f"scrape target {t}: no compose service {host}"
                assert int(port) == _metrics_port(host, services[host]), f"scrape target {t}: not its /metrics port"
                assert job.get("metrics_path", "/metrics") == "/metrics"
                scraped.setdefault(job["job_name"], set()).add(host)
    assert scraped == {"splitinfer-cloud": {"cloud-1", "cloud-2"}, "splitinfer-edge": {"edge"}}
    # Alert rules select these jobs.
    assert all(job.startswith("splitinfer-") for job in scraped)


def test_grafana_provisioning_matches_compose_and_prometheus(exported):
    services = _compose()["services"]
    mounts = _bind_mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning"][0] == GRAFANA / "provisioning"
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host in services and int(port) in _listening_ports(host, services[host]) and ds["type"] == "prometheus"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "splitinfer.yaml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert mounts[dash_dir][0] == DASHBOARD.parent
    home = _env(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARD.parent / Path(home).relative_to(dash_dir)).is_file()
    dashboard = json.loads(DASHBOARD.read_text())
    panels = _dashboard_panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        assert p["datasource"]["uid"] == ds["uid"], p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds["uid"] and t["expr"].strip()
            # Legend labels survive the query: in its by() list, or on its series when it does not aggregate.
            legend = set(re.findall(r"{{\s*(\w+)\s*}}", t.get("legendFormat", "")))
            grouped = set(re.findall(r"\bby\s*\(([^)]*)\)", t["expr"]))
            if grouped:
                kept = {x.strip() for g in grouped for x in g.split(",")}
            else:
                kept = TARGET_LABELS | {x for n, _ in _selectors(t["expr"]) for x in exported.get(n) or set()}
            assert legend <= kept, f"panel {p['title']!r}: legend {legend - kept} not in the result"
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    # The dashboard graphs both daemons.
    used = {name for expr in _dashboard_exprs().values() for name, _ in _selectors(expr)}
    assert any(n.startswith("splitinfer_server_") for n in used) and any(n.startswith("splitinfer_edge_") for n in used)


# ---------------------------------------------------------------------------------------------------------------
# metric names


def test_every_metric_used_is_exported_by_the_code(exported):
    tests = yaml.safe_load((PROM / "rules_test.yaml").read_text())
    series = {f"rules_test series {s['series']}": s["series"]
              for t in tests["tests"] for s in t["input_series"]}
    exprs = {**_dashboard_exprs(), **_rule_exprs(), **_adapter_exprs(), **series}
    problems = _metric_problems(exprs, exported)
    assert not problems, "\n".join(problems)
    # The metrics the brief names are there (the check above is not vacuous).
    for name in ("splitinfer_server_requests_total", "splitinfer_server_request_duration_seconds_bucket",
                 "splitinfer_server_inflight_requests", "splitinfer_edge_requests_total"):
        assert name in exported


@pytest.mark.parametrize("expr", [
    "sum(rate(splitinfer_server_request_total[5m]))",  # _requests_total
    'histogram_quantile(0.99, sum by (le) (rate(splitinfer_server_request_duration_seconds[5m])))',  # no _bucket
    'sum(rate(splitinfer_edge_requests_total{outcom="fallback"}[$__rate_interval]))',  # label typo
    "sum by (outcom) (rate(splitinfer_edge_requests_total[5m]))",  # label typo in a grouping
    "splitinfr_server_inflight_requests",
    'rate(splitinfer_server_requests_total{code!="OK"}[5m]) / rate(splitinfer_server_requests[5m])',
])
def test_a_wrong_metric_or_label_name_is_caught(exported, expr):
    assert _metric_problems({"x": expr}, exported)


def test_dashboard_and_adapter_queries_parse_as_promql(promtool, tmp_path):
    exprs = {**_dashboard_exprs(), **_adapter_exprs()}
    rules = [{"record": f"splitinfer:check:{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, expr in enumerate(exprs.values())]
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    res = _promtool(promtool, "check", "rules", path)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------------------------
# Prometheus rules and config


def test_promtool_check_rules(promtool):
    res = _promtool(promtool, "check", "rules", PROM / "rules.yaml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_config(promtool):
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (PROM / rule_file).is_file(), rule_file  # relative to the config file, as Prometheus resolves it
    res = _promtool(promtool, "check", "config", PROM / "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rules.yaml" in res.stdout  # the rule file was found and checked too


def test_promtool_rule_unit_tests_pass(promtool):
    res = _promtool(promtool, "test", "rules", PROM / "rules_test.yaml")
    assert res.returncode == 0, res.stdout + res.stderr


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "rules.yaml").read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_cover_the_brief_and_are_unit_tested():
    alerts = _alerts()
    exprs = " ".join(a["expr"] for a in alerts)
    for needle in ('splitinfer_server_requests_total{code!="OK"}', "splitinfer_server_request_duration_seconds_bucket",
                   'code="RESOURCE_EXHAUSTED"', 'outcome="fallback"', "up{"):
        assert needle in exprs, needle
    for a in alerts:
        assert a["labels"]["severity"] in {"warning", "critical"}, a["alert"]
        assert {"summary", "description"} <= set(a["annotations"]), a["alert"]
        _duration_s(a["for"])
    cases = [c for t in yaml.safe_load((PROM / "rules_test.yaml").read_text())["tests"] for c in t["alert_rule_test"]]
    for a in alerts:
        mine = [c for c in cases if c["alertname"] == a["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{a['alert']}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{a['alert']}: no case where it stays quiet"


@pytest.mark.parametrize("mutation", ["never fires", "no threshold"])
def test_rule_unit_tests_fail_when_an_alert_is_broken(promtool, tmp_path, mutation):
    text = (PROM / "rules.yaml").read_text()
    shutil.copy(PROM / "rules_test.yaml", tmp_path / "rules_test.yaml")
    for alert in _alerts():
        doc = yaml.safe_load(text)
        for g in doc["groups"]:
            for r in g["rules"]:
                if r.get("alert") == alert["alert"]:
                    if mutation == "never fires":
                        r["expr"] = "vector(1) == 0"
                    else:  # fires for the quiet series too
                        r["expr"] = re.sub(r"\s*(>|==)\s*[0-9.]+\s*$", "", r["expr"].strip())
                        assert r["expr"] != alert["expr"].strip()
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
        res = _promtool(promtool, "test", "rules", tmp_path / "rules_test.yaml")
        assert res.returncode != 0, f"{alert['alert']} {mutation}: the rule tests still pass"
