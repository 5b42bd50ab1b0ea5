"""Deployment checks: the rendered Kubernetes objects, the Dockerfile, and the metric names that the
dashboard, the alert rules and the autoscaler query.

Rendering needs `kubectl kustomize`. deploy/check.sh renders each overlay once, validates the files
and points DEPLOY_RENDERED_DIR at them, so these tests read exactly what was validated; elsewhere the
tests render with the `kubectl` on PATH, and skip when there is none (DEPLOY_REQUIRE_TOOLS=1 turns
that skip into a failure). Metric names are checked against DESIGN.md §2 now; DEPLOY_METRICS_URL
(a live /metrics) adds the same check against what a running server exports.
"""

import json
import os
import re
import shutil
import subprocess
import urllib.request
from functools import cache
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "glm-serve"
REQUIRE_TOOLS = os.environ.get("DEPLOY_REQUIRE_TOOLS") == "1"

# DESIGN.md §2, "Metrics": every series glm-serve exports, by family name and type.
DESIGN_METRICS = {
    "glm_serve:num_requests_running": "gauge",
    "glm_serve:num_requests_waiting": "gauge",
    "glm_serve:kv_cache_usage_perc": "gauge",
    "glm_serve:num_preemptions": "counter",
    "glm_serve:prompt_tokens": "counter",
    "glm_serve:generation_tokens": "counter",
    "glm_serve:request_success": "counter",
    "glm_serve:admission_rejections": "counter",
    "glm_serve:time_to_first_token_seconds": "histogram",
    "glm_serve:inter_token_latency_seconds": "histogram",
    "glm_serve:request_time_per_output_token_seconds": "histogram",
    "glm_serve:e2e_request_latency_seconds": "histogram",
    "glm_serve:request_queue_time_seconds": "histogram",
    "glm_serve:spec_decode_num_drafts": "counter",
    "glm_serve:spec_decode_num_draft_tokens": "counter",
    "glm_serve:spec_decode_num_accepted_tokens": "counter",
    "glm_serve:spec_decode_num_accepted_tokens_per_pos": "counter",
    "glm_serve:prefix_cache_queries": "counter",
    "glm_serve:prefix_cache_hits": "counter",
}
# Series Prometheus makes itself while scraping; queries may use them too.
SCRAPE_SERIES = {"up"}
# DESIGN.md §2, "Command line and settings": the flags a GLM_SERVE_* variable may set.
DESIGN_FLAGS = {
    "model",
    "served-model-name",
    "host",
    "port",
    "device",
    "dtype",
    "max-model-len",
    "max-num-seqs",
    "max-num-batched-tokens",
    "kv-cache-tokens",
    "num-speculative-tokens",
    "max-queue-size",
    "api-key",
    "shutdown-timeout",
    "log-level",
    "log-format",
    "enable-prefix-caching",
    "prefix-caching-hash-algo",
}
DRAIN_MARGIN_S = 5  # time to close sockets and exit after the drain


# ------------------------------------------------------------------ metric names


def family_sample_names(name, kind):
    """The sample names a family of this type shows in the text format."""
    if kind == "counter":
        return {name + "_total"}
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    return {name}


def design_sample_names():
    return set().union(*(family_sample_names(n, k) for n, k in DESIGN_METRICS.items()))


def exposition_sample_names(text):
    """Sample names in a /metrics page, including families declared but without samples yet
    (a labelled metric before its first observation)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= family_sample_names(family.name, family.type)
    return names


_PROMQL_NOT_METRICS = {
    # keywords and binary operators
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    # aggregation operators (they may stand before `by (...)`, so are not always followed by "(")
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}


def promql_metric_names(expr):
    """The metric names a PromQL expression (or Grafana label_values query) selects."""
    expr = re.sub(r"\blabel_values\((.*),\s*\w+\s*\)", r"\1", expr)  # Grafana: label_values(sel, label)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)  # label lists
    expr = re.sub(r"\boffset\s+-?\w+", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1).lower() not in _PROMQL_NOT_METRICS:
            names.add(m.group(1))
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (le) (rate(glm_serve:a_bucket{m=~"$x"}[$__rate_interval])))',
            {"glm_serve:a_bucket"},
        ),
        (
            "sum by (position) (rate(a_total[5m])) / ignoring (position) group_left sum(rate(b_total[5m]))",
            {"a_total", "b_total"},
        ),
        ('up{job="glm-serve"} == 0 and on (pod) vector(1) offset 5m', {"up"}),
        (
            'label_values(glm_serve:num_requests_running{namespace=~"$ns"}, model_name)',
            {"glm_serve:num_requests_running"},
        ),
        ("1 + sum(rate(glm_serve_typo[1m])) * 2e3 > bool 0.5", {"glm_serve_typo"}),
    ],
)
def test_promql_metric_names(expr, names):
    assert promql_metric_names(expr) == names


def test_exposition_sample_names_reads_prometheus_client_output():
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Gauge("glm_serve:num_requests_waiting", "", ["model_name"], registry=registry).labels("m").set(3)
    prometheus_client.Counter("glm_serve:prompt_tokens", "", ["model_name"], registry=registry).labels("m").inc()
    prometheus_client.Histogram("glm_serve:e2e_request_latency_seconds", "", ["model_name"], registry=registry)
    text = prometheus_client.generate_latest(registry).decode()
    names = exposition_sample_names(text)
    assert {"glm_serve:num_requests_waiting", "glm_serve:prompt_tokens_total"} <= names
    # Declared, no observation yet: still counts as exported.
    assert {"glm_serve:e2e_request_latency_seconds_bucket", "glm_serve:e2e_request_latency_seconds_count"} <= names


# ------------------------------------------------------------------ the queries we ship


def dashboard():
    return json.loads((DEPLOY / "grafana" / "glm-serve.json").read_text())


def dashboard_queries():
    d = dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_rules():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def autoscaler_queries(objects):
    return [t["metadata"]["query"] for o in objects if o["kind"] == "ScaledObject" for t in o["spec"]["triggers"]]


def shipped_queries():
    queries = dashboard_queries() + [r["expr"] for r in alert_rules()]
    for overlay in OVERLAYS:
        queries += autoscaler_queries(rendered(overlay))
    return queries


def unknown_metrics(queries, exported):
    return {(n, q) for q in queries for n in promql_metric_names(q) if n not in exported | SCRAPE_SERIES}


def test_queries_name_only_design_metrics():
    assert unknown_metrics(shipped_queries(), design_sample_names()) == set()


def test_queries_name_only_live_metrics():
    url = os.environ.get("DEPLOY_METRICS_URL")
    if not url:
        pytest.skip("set DEPLOY_METRICS_URL to a running glm-serve's /metrics")
    with urllib.request.urlopen(url, timeout=10) as response:
        exported = exposition_sample_names(response.read().decode())
    assert unknown_metrics(shipped_queries(), exported) == set()


def test_dashboard_covers_the_serving_signals():
    used = set().union(*map(promql_metric_names, dashboard_queries()))
    wanted = {
        f"glm_serve:{name}"
        for name in [
            "time_to_first_token_seconds_bucket",
            "inter_token_latency_seconds_bucket",
            "e2e_request_latency_seconds_bucket",
            "generation_tokens_total",
            "num_requests_waiting",
            "num_requests_running",
            "kv_cache_usage_perc",
            "num_preemptions_total",
            "spec_decode_num_accepted_tokens_per_pos_total",
            "prefix_cache_hits_total",
            "prefix_cache_queries_total",
        ]
    }
    assert wanted - used == set()


def test_dashboard_is_importable():
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "namespace", "model_name"} <= variables
    for p in d["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'model_name=~"$model_name"' in t["expr"] or "up{" in t["expr"], p["title"]


def test_alerts_cover_the_failures_named_in_the_issue():
    rules = {r["alert"]: r for r in alert_rules()}
    named = "GlmServeEngineStalled GlmServeQueueGrowing GlmServeSpecAcceptanceCollapsed GlmServeHighErrorRate"
    assert set(named.split()) <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert 'job="glm-serve"' in rule["expr"], name


def test_k8s_scrape_config_matches_service():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    service = one(rendered("cpu"), "Service")
    assert job["job_name"] == service["metadata"]["name"]  # the ServiceMonitor's job label
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [NAMESPACE]
    keep = job["relabel_configs"][0]
    assert keep["action"] == "keep"
    label, port = service["metadata"]["labels"]["app.kubernetes.io/name"], service["spec"]["ports"][0]["name"]
    assert keep["regex"] == f"{label};{port}"


# ------------------------------------------------------------------ rendered manifests


@cache
def rendered(overlay):
    rendered_dir = os.environ.get("DEPLOY_RENDERED_DIR")
    if rendered_dir:
        text = (Path(rendered_dir) / f"{overlay}.yaml").read_text()
    else:
        kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
        if not kubectl:
            if REQUIRE_TOOLS:
                pytest.fail("kubectl not found")
            pytest.skip("kubectl not found: run deploy/check.sh")
        text = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return [o for o in yaml.safe_load_all(text) if o]


def one(objects, kind):
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def pod_spec(objects):
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects):
    (c,) = pod_spec(objects)["containers"]
    return c


def settings(objects):
    """The GLM_SERVE_* settings the container gets from its ConfigMap."""
    (ref,) = container(objects)["envFrom"]
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref["configMapRef"]["name"]]
    return cm["data"]


@pytest.fixture(params=OVERLAYS)
def objects(request):
    return rendered(request.param)


def test_overlay_has_every_object_in_the_namespace(objects):
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "ScaledObject", "Service", "ServiceMonitor"]
    )
    for o in objects:
        assert o["metadata"].get("namespace") == NAMESPACE, (o["kind"], o["metadata"])


def test_settings_are_known_flags(objects):
    for key in settings(objects):
        assert key.startswith("GLM_SERVE_"), key
        assert key.removeprefix("GLM_SERVE_").lower().replace("_", "-") in DESIGN_FLAGS, key


def test_api_key_comes_from_a_secret(objects):
    env = {e["name"]: e for e in container(objects)["env"]}
    ref = env["GLM_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert "GLM_SERVE_API_KEY" not in settings(objects)


def test_probes(objects):
    c = container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(settings(objects)["GLM_SERVE_PORT"])
    probes = {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: (p["httpGet"]["path"], p["httpGet"]["port"]) for k, p in probes.items()} == {
        "startupProbe": ("/health", "http"),
        "readinessProbe": ("/ready", "http"),
        # Never /ready: it turns 503 while draining, and liveness would then kill a draining pod.
        "livenessProbe": ("/health", "http"),
    }
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # weight loading
    for probe in probes.values():
        assert probe["timeoutSeconds"] < probe["periodSeconds"]


def test_security_context(objects):
    pod, c = pod_spec(objects), container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert pod["securityContext"]["runAsGroup"] == 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not c["securityContext"].get("privileged", False)
    assert pod["automountServiceAccountToken"] is False
    # Service links would set GLM_SERVE_PORT=tcp://... from the Service named glm-serve.
    assert pod["enableServiceLinks"] is False


def test_scratch_volumes(objects):
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container(objects)["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert mounts["/dev/shm"]["emptyDir"]["sizeLimit"]
    assert "emptyDir" in mounts["/home/glm-serve"]  # $HOME: caches, on a read-only root


def test_drain_timing(objects):
    pod, c = pod_spec(objects), container(objects)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    shutdown_timeout = int(settings(objects)["GLM_SERVE_SHUTDOWN_TIMEOUT"])
    assert pre_stop >= 5  # endpoints and load balancers need a few seconds to drop the pod
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + shutdown_timeout + DRAIN_MARGIN_S


def test_resources(objects):
    resources = container(objects)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_autoscaler_scales_the_deployment_on_queue_depth(objects):
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    scaled = one(objects, "ScaledObject")
    assert "replicas" not in deployment["spec"]  # owned by the autoscaler
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert float(trigger["metadata"]["threshold"]) > 0
    query = trigger["metadata"]["query"]
    assert promql_metric_names(query) == {"glm_serve:num_requests_waiting"}
    assert f'namespace="{deployment["metadata"]["namespace"]}"' in query
    assert f'service="{service["metadata"]["name"]}"' in query


def test_selectors_match(objects):
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector, labels):
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(one(objects, "Service")["spec"]["selector"], pod_labels)
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}


def test_cpu_overlay():
    objects = rendered("cpu")
    c = container(objects)
    assert c["image"].endswith(":0.1.0")
    assert settings(objects)["GLM_SERVE_DEVICE"] == "cpu"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]


def test_gpu_overlay():
    objects = rendered("gpu")
    c = container(objects)
    assert c["image"].endswith("-cuda")
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(objects)["tolerations"]
    assert settings(objects)["GLM_SERVE_DEVICE"] == "cuda"
    assert settings(objects)["GLM_SERVE_DTYPE"] == "bfloat16"


# ------------------------------------------------------------------ Dockerfile


def dockerfile_stages():
    """{stage name: [instruction lines]} with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            stages[m.group(1)] = []
        if stages:
            stages[next(reversed(stages))].append(line)
    return stages


def dockerfile_uid():
    (uid,) = set(re.findall(r"^ARG APP_UID=(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    return int(uid)


def test_dockerfile_runtime_stages():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu"  # the last stage is the default target
    # Probes belong to Kubernetes.
    assert not [line for lines in stages.values() for line in lines if line.upper().startswith("HEALTHCHECK")]
    for name in ("cpu", "cuda"):
        lines = stages[name]
        text = "\n".join(lines)
        assert re.search(r"useradd --uid \"\$\{APP_UID\}\" --gid 0 ", text), name
        assert [line for line in lines if line.startswith("USER ")][-1] == "USER ${APP_UID}", name
        assert "GLM_SERVE_HOST=0.0.0.0" in text and "GLM_SERVE_PORT=8000" in text, name
        assert 'ENTRYPOINT ["glm-serve"]' in lines, name
        assert "EXPOSE 8000" in lines, name
        assert not any(line.startswith(("ARG PIP_", "ENV PIP_")) for line in lines), name  # build stages only


def test_dockerignore_is_an_allow_list():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"
    assert not any(p.startswith("!") and (".venv" in p or ".git" in p or "tests" in p) for p in patterns)
