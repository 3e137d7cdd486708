"""infra/: the KubeRay manifests, the Serve config inside the RayService, the Ingress, the
Prometheus scrape configs, the Grafana dashboard and the Dockerfile agree with each other and with
the code (ServeParams, the CLI, the metric names the Serve app exports). No cluster, no network:
schemas and cross-checks only, in a few seconds."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import REPO_ROOT

from scbert_platform.cli import build_parser
from scbert_platform.params import Params, ParamsError

INFRA = REPO_ROOT / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMA = INFRA / "schemas" / "kuberay-v1-subset.yaml"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
METRICS_PORT = 8080  # every Ray node's metrics export port
SERVE_PORT = 8000
IMPORT_PATH = "scbert_serve.app:build"
GPU = "nvidia.com/gpu"

# What the Serve app exports (Prometheus names, Ray's `ray_` prefix); ray_serve_* are Serve's own.
_HISTOGRAMS = (
    "ray_scbert_request_latency_seconds",
    "ray_scbert_batch_cells",
    "ray_scbert_batch_requests",
)
SCBERT_METRICS = {
    "ray_scbert_requests_total",
    "ray_scbert_cells_annotated_total",
    "ray_scbert_predicted_total",
    "ray_scbert_unassigned_total",
    "ray_scbert_model_info",
} | {f"{name}_{part}" for name in _HISTOGRAMS for part in ("bucket", "sum", "count")}


# --- loading ----------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_manifests() -> dict[str, dict[str, Any]]:
    """``{kind: manifest}`` of infra/kuberay/ (one manifest of each kind)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in documents(path):
            assert doc["kind"] not in found, f"two {doc['kind']} manifests"
            found[doc["kind"]] = doc
    assert sorted(found) == sorted(KUBERAY_KINDS)
    return found


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The RayClusterSpec of a RayCluster, RayJob or RayService."""
    key = {"RayCluster": "", "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    spec = manifest["spec"]
    return spec[key[manifest["kind"]]] if key[manifest["kind"]] else spec


def groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(name, group)`` for the head group and every worker group."""
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in the first container of a group's pod template."""
    return group["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def quantity(value: str | float) -> float:
    """A Kubernetes quantity as a number: "500m" -> 0.5, "8Gi" -> 8 * 2**30, "2" -> 2."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    suffixes |= {f"{s}i": 1024.0 ** (i + 1) for i, s in enumerate("KMGTPE")}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match[2] in {"", *suffixes}, f"not a quantity: {value!r}"
    return float(match[1]) * suffixes.get(match[2], 1.0)


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(kuberay_manifests()["RayService"]["spec"]["serveConfigV2"])


def serve_args() -> dict[str, Any]:
    (app,) = serve_config()["applications"]
    return app["args"]


# --- YAML and the KubeRay schema --------------------------------------------------------------


def test_every_yaml_parses() -> None:
    paths = yaml_files()
    assert len(paths) >= 7
    for path in paths:
        assert documents(path), f"{path} is empty"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(validator: jsonschema.Draft202012Validator, manifest: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]


@pytest.mark.parametrize("kind", KUBERAY_KINDS)
def test_kuberay_manifest_fits_schema(
    kind: str, validator: jsonschema.Draft202012Validator
) -> None:
    assert schema_errors(validator, kuberay_manifests()[kind]) == []


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _misspell_cluster_config(m: dict[str, Any]) -> None:
    _rename(m["spec"], "rayClusterConfig", "rayClusterConf")


def _misspell_min_replicas(m: dict[str, Any]) -> None:
    _rename(m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0], "minReplicas", "minReplica")


def _numeric_ray_start_param(m: dict[str, Any]) -> None:
    m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1


def _misplaced_resources(m: dict[str, Any]) -> None:
    container = ray_container(m["spec"]["rayClusterConfig"]["headGroupSpec"])
    container["resources"]["request"] = container["resources"].pop("requests")


def _env_value_and_secret(m: dict[str, Any]) -> None:
    container = ray_container(m["spec"]["rayClusterConfig"]["headGroupSpec"])
    env_of(container)["SCBERT_API_TOKEN"]["value"] = "s3cret"


def _wrong_api_version(m: dict[str, Any]) -> None:
    m["apiVersion"] = "ray.io/v1alpha1"


@pytest.mark.parametrize(
    "break_it",
    [
        _misspell_cluster_config,
        _misspell_min_replicas,
        _numeric_ray_start_param,
        _misplaced_resources,
        _env_value_and_secret,
        _wrong_api_version,
    ],
)
def test_schema_refuses_broken_manifest(
    break_it: Any, validator: jsonschema.Draft202012Validator
) -> None:
    manifest = copy.deepcopy(kuberay_manifests()["RayService"])
    break_it(manifest)
    assert schema_errors(validator, manifest), f"{break_it.__name__} was accepted"


# --- the Serve config in the RayService -------------------------------------------------------


def serve_config_problems(config: dict[str, Any]) -> list[str]:
    """Ray Serve's own schema (pinned Ray), plus unknown keys, which that schema ignores."""
    with warnings.catch_warnings():  # Ray's pydantic models warn on import (pydantic 2)
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    def fields(model: Any) -> set[str]:
        return set(getattr(model, "model_fields", None) or model.__fields__)

    try:
        ServeDeploySchema.model_validate(config)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        return [str(error)]
    problems = [f"unknown key {k!r}" for k in set(config) - fields(ServeDeploySchema)]
    http = config.get("http_options", {})
    problems += [f"unknown http_options key {k!r}" for k in set(http) - fields(HTTPOptionsSchema)]
    for app in config.get("applications", []):
        unknown = set(app) - fields(ServeApplicationSchema)
        problems += [f"unknown application key {k!r}" for k in unknown]
    return problems


def test_serve_config_is_a_serve_config() -> None:
    assert serve_config_problems(serve_config()) == []


def test_serve_config_checker_refuses_unknown_keys() -> None:
    config = serve_config()
    config["applications"][0]["import_pth"] = config["applications"][0].pop("import_path")
    assert serve_config_problems(config)
    config = serve_config()
    config["http_options"]["prot"] = SERVE_PORT
    assert serve_config_problems(config)


def test_serve_app_is_ours_and_args_are_serve_params() -> None:
    config = serve_config()
    (app,) = config["applications"]
    assert app["import_path"] == IMPORT_PATH
    serve = Params.from_dict({"serve": app["args"]}).serve  # unknown keys or types raise
    assert serve.model.startswith("models:/") and serve.model.endswith("@champion")
    assert (serve.host, serve.port) == ("0.0.0.0", SERVE_PORT)
    assert config["http_options"] == {"host": serve.host, "port": serve.port}
    assert app["route_prefix"] == serve.route_prefix
    assert serve.metrics_port == METRICS_PORT
    assert 1 <= serve.min_replicas <= serve.max_replicas
    assert serve.replica_gpus == 1


def test_serve_args_typo_is_refused() -> None:
    args = dict(serve_args())
    args["max_replica"] = args.pop("max_replicas")
    with pytest.raises(ParamsError, match="max_replica"):
        Params.from_dict({"serve": args})


# --- resources and wiring ---------------------------------------------------------------------


def gpu_problems(spec: dict[str, Any]) -> list[str]:
    """A group's nvidia.com/gpu request, limit and rayStartParams num-gpus must agree."""
    problems = []
    for name, group in groups(spec):
        resources = ray_container(group).get("resources", {})
        limit = quantity(resources.get("limits", {}).get(GPU, 0))
        request = quantity(resources.get("requests", {}).get(GPU, limit))
        num_gpus = quantity(group["rayStartParams"].get("num-gpus", limit))
        if not limit == request == num_gpus:
            problems.append(f"{name}: {GPU} limit {limit}, request {request}, num-gpus {num_gpus}")
    return problems


@pytest.mark.parametrize("kind", KUBERAY_KINDS)
def test_gpu_requests_match_ray_start_params(kind: str) -> None:
    spec = cluster_spec(kuberay_manifests()[kind])
    assert gpu_problems(spec) == []
    assert GPU not in ray_container(spec["headGroupSpec"])["resources"]["limits"]
    workers = spec["workerGroupSpecs"]
    assert workers and all(quantity(g["rayStartParams"]["num-gpus"]) >= 1 for g in workers)
    for group in workers:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_gpu_check_catches_a_mismatch() -> None:
    spec = copy.deepcopy(cluster_spec(kuberay_manifests()["RayService"]))
    spec["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "2"
    assert gpu_problems(spec)


def test_serve_replicas_fit_the_worker_groups() -> None:
    serve = Params.from_dict({"serve": serve_args()}).serve
    spec = cluster_spec(kuberay_manifests()["RayService"])
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    capacity = 0
    for group in spec["workerGroupSpecs"]:
        limits = ray_container(group)["resources"]["limits"]
        per_node = quantity(limits.get(GPU, 0)) // serve.replica_gpus
        per_node = min(per_node, quantity(limits["cpu"]) // serve.replica_cpus)
        capacity += int(per_node) * group["maxReplicas"]
    assert capacity >= serve.max_replicas, "the autoscaler cannot place max_replicas replicas"


def test_production_keeps_two_replicas_and_answers_a_lost_one_with_503() -> None:
    """One replica lost (a node, the OOM killer) and another serves meanwhile; the proxies on
    every node carry the middleware that turns the lost request into 503 + Retry-After."""
    from scbert_platform.cluster import SERVE_PROXY_ENV

    serve = Params.from_dict({"serve": serve_args()}).serve
    spec = cluster_spec(kuberay_manifests()["RayService"])
    assert serve.min_replicas >= 2
    gpu_workers = sum(g["minReplicas"] for g in spec["workerGroupSpecs"])
    assert gpu_workers >= serve.min_replicas  # one GPU replica per worker
    for name, group in groups(spec):
        env = env_of(ray_container(group))
        assert env[SERVE_PROXY_ENV[0]]["value"] == SERVE_PROXY_ENV[1], name


def test_request_limits_are_written_out_and_fit_a_worker_pod() -> None:
    """The cluster serves with explicit request limits (the same as params.yaml's), and a worker
    pod holds its replicas at their worst: bodies of max_body_mb buffered for every request in
    flight, plus one .h5ad being parsed at a few times max_decoded_mb (parsing peaks at ~2x its
    decoded size: tests/test_h5ad_body.py)."""
    args = serve_args()
    limits = ("max_cells_per_request", "max_genes", "max_body_mb", "max_decoded_mb")
    repo = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["serve"]
    assert {key: args[key] for key in limits} == {key: repo[key] for key in limits}
    serve = Params.from_dict({"serve": args}).serve
    worst = serve.max_ongoing_requests * serve.max_body_mb + 4 * serve.max_decoded_mb
    for group in cluster_spec(kuberay_manifests()["RayService"])["workerGroupSpecs"]:
        resources = ray_container(group)["resources"]["limits"]
        per_node = min(
            quantity(resources.get(GPU, 0)) // serve.replica_gpus,
            quantity(resources["cpu"]) // serve.replica_cpus,
        )
        assert quantity(resources["memory"]) >= per_node * worst * 2**20, group["groupName"]


@pytest.mark.parametrize("kind", KUBERAY_KINDS)
def test_every_node_exports_metrics_on_8080(kind: str) -> None:
    for name, group in groups(cluster_spec(kuberay_manifests()[kind])):
        assert group["rayStartParams"].get("metrics-export-port") == str(METRICS_PORT), name
        ports = {p.get("name"): p["containerPort"] for p in ray_container(group)["ports"]}
        assert ports.get("metrics") == METRICS_PORT, name
        if kind == "RayService":
            assert ports.get("serve") == SERVE_PORT, name


@pytest.mark.parametrize("kind", KUBERAY_KINDS)
def test_pods_reach_mlflow_and_serve_pods_get_the_token_from_a_secret(kind: str) -> None:
    for name, group in groups(cluster_spec(kuberay_manifests()[kind])):
        env = env_of(ray_container(group))
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http"), name
        if kind == "RayService":
            token = env["SCBERT_API_TOKEN"]
            assert "value" not in token, f"{name}: the API token must come from a Secret"
            assert token["valueFrom"]["secretKeyRef"]["key"], name


def test_one_image_and_one_ray_version() -> None:
    manifests = kuberay_manifests().values()
    versions = {cluster_spec(m)["rayVersion"] for m in manifests}
    images = {ray_container(g)["image"] for m in manifests for _, g in groups(cluster_spec(m))}
    assert versions == {dockerfile_args()["RAY_VERSION"]}
    assert len(images) == 1, images


def test_rayjob_entrypoint_is_a_valid_scbert_command() -> None:
    job = kuberay_manifests()["RayJob"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "scbert"
    args = build_parser().parse_args(words[1:])  # unknown verbs or flags exit here
    Params().override(args.overrides)  # and --set names must be parameters
    spec = cluster_spec(job)
    mounts = {
        name: {m["mountPath"] for m in ray_container(g).get("volumeMounts", [])}
        for name, g in groups(spec)
    }
    for path in (args.shards, args.spec, args.params):
        assert any(path.startswith(f"{mount}/") for mount in mounts["head"]), path
    for name, paths in mounts.items():  # shards and checkpoints: the same storage everywhere
        assert "/data" in paths, name
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_ingress_terminates_tls_in_front_of_the_serve_service() -> None:
    (ingress,) = documents(INFRA / "k8s" / "ingress.yaml")
    assert ingress["kind"] == "Ingress"
    spec = ingress["spec"]
    (tls,) = spec["tls"]
    assert tls["secretName"]
    service = kuberay_manifests()["RayService"]["metadata"]["name"]
    for rule in spec["rules"]:
        assert rule["host"] in tls["hosts"]
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == f"{service}-serve-svc"  # the Service KubeRay creates
            assert backend["port"]["number"] == SERVE_PORT
    body = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    max_body_mb = Params.from_dict({"serve": serve_args()}).serve.max_body_mb
    assert quantity(body.upper() + "i") >= max_body_mb * 2**20, "nginx would refuse big bodies"


# --- Prometheus and Grafana -------------------------------------------------------------------


def test_prometheus_scrapes_ray_pods_on_8080() -> None:
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
    keeps = {
        rule["source_labels"][0]: rule["regex"]
        for rule in job["relabel_configs"]
        if rule.get("action") == "keep"
    }
    assert keeps["__meta_kubernetes_pod_container_port_number"] == str(METRICS_PORT)
    assert keeps["__meta_kubernetes_pod_label_ray_io_is_ray_node"] == "yes"
    copied = {r["source_labels"][0] for r in job["relabel_configs"] if "target_label" in r}
    assert {"__meta_kubernetes_pod_label_ray_io_cluster"} <= copied
    assert {"__meta_kubernetes_pod_label_ray_io_node_type"} <= copied


def test_local_prometheus_scrapes_8080() -> None:
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.local.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert targets and all(t.endswith(f":{METRICS_PORT}") for t in targets)


PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
    "clamp_min", "clamp_max", "topk", "bottomk", "abs", "and", "or", "unless", "bool", "offset",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (enough of PromQL for our dashboards)."""
    expr = re.sub(r"label_values\(\s*([^,)]+).*?\)", r"\1", expr)  # Grafana: label_values(m, l)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"(?<![\w.])[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?", "", expr)  # numbers
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL_WORDS


def unknown_metrics(expr: str) -> set[str]:
    names = promql_metric_names(expr)
    assert names, f"no metric in {expr!r}"
    return {n for n in names if n not in SCBERT_METRICS and not n.startswith("ray_serve_")}


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def test_grafana_queries_read_only_exported_metrics() -> None:
    dashboard = json.loads((INFRA / "grafana" / "scbert-serving.json").read_text())
    exprs = dashboard_queries(dashboard)
    for expr in exprs:
        assert unknown_metrics(expr) == set(), expr
    read = set().union(*map(promql_metric_names, exprs))
    wanted = {"ray_scbert_request_latency_seconds_bucket", "ray_scbert_batch_cells_bucket"}
    wanted |= {"ray_scbert_requests_total", "ray_scbert_cells_annotated_total"}
    wanted |= {"ray_scbert_predicted_total", "ray_scbert_unassigned_total"}
    assert wanted <= read
    assert any(name.startswith("ray_serve_") for name in read)  # replicas
    (app,) = serve_config()["applications"]
    filtered = {m for expr in exprs for m in re.findall(r'application="([^"]*)"', expr)}
    assert filtered == {app["name"]}, "Serve panels must select the RayService's application"
    variables = {var["name"] for var in dashboard["templating"]["list"]}
    assert "model_version" in variables
    assert any("$model_version" in expr for expr in exprs)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_promql_check_catches_a_misspelt_metric() -> None:
    good = (
        "histogram_quantile(0.95, sum by (le, route) (rate("
        'ray_scbert_request_latency_seconds_bucket{model_version=~"$v"}[5m])))'
    )
    assert promql_metric_names(good) == {"ray_scbert_request_latency_seconds_bucket"}
    assert unknown_metrics(good.replace("latency_seconds", "latency_second")) == {
        "ray_scbert_request_latency_second_bucket"
    }
    assert unknown_metrics("sum(rate(scbert_requests_total[1m]))") == {"scbert_requests_total"}


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments dropped."""
    text = (INFRA / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = [line.strip().split(None, 1) for line in joined.splitlines() if line.strip()]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
    return args


def test_dockerfile_installs_torch_before_the_project() -> None:
    steps = dockerfile_instructions()
    args = dockerfile_args()
    base = args["BASE_IMAGE"]
    assert base.startswith(f"rayproject/ray:{args['RAY_VERSION']}-py311-")
    assert steps[0][0] == "ARG" and any(i == "FROM" for i, _ in steps)
    runs = [rest for instruction, rest in steps if instruction == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "TORCH_SPEC" in r and "pip install" in r)
    project = next(i for i, r in enumerate(runs) if "/tmp/scbert-platform" in r and "pip" in r)
    assert torch_step < project
    assert re.fullmatch(r"torch==[0-9.]+", args["TORCH_SPEC"])
    assert "==${RAY_VERSION}" in runs[project]  # pip may not move Ray off the base image's


def test_dockerfile_copies_every_package_and_exposes_serve_and_metrics() -> None:
    steps = dockerfile_instructions()
    copied = {word for i, rest in steps if i == "COPY" for word in rest.split()}
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert {"pyproject.toml", "README.md", *folders} <= copied
    exposed = {int(port) for i, rest in steps if i == "EXPOSE" for port in rest.split()}
    assert {SERVE_PORT, METRICS_PORT} <= exposed


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {
        line.strip()
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "data", "runs", "mlartifacts", "mlruns.db"} <= patterns
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    needed = {
        "pyproject.toml",
        "README.md",
        *pyproject["tool"]["setuptools"]["package-dir"].values(),
    }
    assert not needed & patterns
