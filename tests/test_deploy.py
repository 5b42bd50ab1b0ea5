"""Deployment checks: the rendered Kubernetes objects, the Dockerfile, and the metric names that the
dashboard, the alert rules and the autoscaler query.

Rendering needs `kubectl kustomize`. deploy/check.sh renders each overlay once, validates the files
and points DEPLOY_RENDERED_DIR at them, so these tests read exactly what was validated; elsewhere the
tests render with the `kubectl` on PATH, and skip when there is none (DEPLOY_REQUIRE_TOOLS=1 turns
that skip into a failure).

The manifests are checked against the server they run, not against restated literals: every metric a query
names is one the server's metrics code exports (DEPLOY_METRICS_URL, a live /metrics, adds the same check against
a running server); every probe path is a route of the app, and each probe answers as its role needs while the
server drains; the grace period covers preStop, the drain and the server's own exit timeouts; every GLM_SERVE_*
setting is a flag; image tags follow the package version. The checks that need the server's own dependencies
(FastAPI, pydantic) skip in deploy/check.sh's tools venv and run in `make test`.
"""

import json
import os
import re
import shutil
import subprocess
import tomllib
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

# Series Prometheus makes itself while scraping; queries may use them too.
SCRAPE_SERIES = {"up"}


# ------------------------------------------------------------------ metric names


def family_sample_names(name, kind):
    """The sample names a family of this type shows in the text format."""
    if kind == "counter":
        return {name + "_total"}
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    return {name}


@cache
def server_sample_names():
    """Every sample name the server's metrics code exports (service/metrics.py), engine series included."""
    from prometheus_client import generate_latest

    from service.engine.outputs import EngineStats
    from service.metrics import ServiceMetrics

    stats = EngineStats(spec_accepted_per_pos=[1])  # one draft position, so the labelled family has a sample
    metrics = ServiceMetrics("m", 4096, stats=lambda: stats)
    return exposition_sample_names(generate_latest(metrics.registry).decode())


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


def test_queries_name_only_exported_metrics():
    assert unknown_metrics(shipped_queries(), server_sample_names()) == set()


def test_metric_check_can_fail():
    assert unknown_metrics(["rate(glm_serve:no_such_metric_total[5m])"], server_sample_names()) == {
        ("glm_serve:no_such_metric_total", "rate(glm_serve:no_such_metric_total[5m])")}


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


def server_flags():
    """The flags of the server's parser, without the leading dashes (each reads GLM_SERVE_<FLAG>)."""
    pytest.importorskip("pydantic_settings")
    from service.settings import build_parser

    return {opt[2:] for action in build_parser()._actions for opt in action.option_strings if opt.startswith("--")}


def test_settings_are_known_flags(objects):
    env = {e["name"] for e in container(objects)["env"] if e["name"].startswith("GLM_SERVE_")}
    flags = server_flags()
    for key in set(settings(objects)) | env:
        assert key.startswith("GLM_SERVE_"), key
        assert key.removeprefix("GLM_SERVE_").lower().replace("_", "-") in flags, key


def test_api_key_comes_from_a_secret(objects):
    env = {e["name"]: e for e in container(objects)["env"]}
    ref = env["GLM_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert "GLM_SERVE_API_KEY" not in settings(objects)


@cache
def probe_answers(paths):
    """{path: (status of a GET while serving, while draining)} from the real app around the fake engine
    (tests/service_fixtures.py), in process. An unknown path answers 404."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from service.api.app import build_app
    from service.settings import Settings
    from tests.service_fixtures import FakeAsyncEngine, shared_fake_model_dir

    model_dir = shared_fake_model_dir()
    app = build_app(Settings(model=model_dir), FakeAsyncEngine(model_dir), model_dir, "m")
    with TestClient(app) as client:
        serving = {path: client.get(path).status_code for path in paths}
        app.state.ctx.queue.begin_drain()
        draining = {path: client.get(path).status_code for path in paths}
    return {path: (serving[path], draining[path]) for path in paths}


def probes(objects):
    c = container(objects)
    return {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


def test_probes_use_the_http_port(objects):
    c = container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(settings(objects)["GLM_SERVE_PORT"])
    for kind, probe in probes(objects).items():
        assert probe["httpGet"]["port"] == "http", kind
        assert probe["timeoutSeconds"] < probe["periodSeconds"], kind
    startup = probes(objects)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # weight loading


def test_probes_name_real_routes_that_answer_as_their_role_needs(objects):
    paths = {kind: p["httpGet"]["path"] for kind, p in probes(objects).items()}
    monitor = {e["path"] for e in one(objects, "ServiceMonitor")["spec"]["endpoints"]}
    answers = probe_answers(tuple(sorted(set(paths.values()) | monitor)))
    # Every path is a route (no 404), and a loaded, serving pod passes every probe and can be scraped.
    assert all(serving == 200 for serving, _ in answers.values()), answers
    # Draining: readiness fails (out of rotation), liveness holds (a draining pod must not be killed), and startup
    # asks what liveness asks.
    assert answers[paths["readinessProbe"]][1] == 503, answers
    assert answers[paths["livenessProbe"]][1] == 200, answers
    assert paths["startupProbe"] == paths["livenessProbe"]


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


@cache
def server_exit_after_drain_s():
    """Seconds the server may still take after its drain deadline: the grace for aborted streams to end
    (service/server.py) plus the graceful-shutdown timeout that `serve()` gives uvicorn (service/cli.py), both
    read from the code."""
    pytest.importorskip("fastapi")
    import service.cli
    import service.server
    from service.settings import Settings
    from tests.service_fixtures import FakeAsyncEngine, shared_fake_model_dir

    captured = {}

    class Capture:
        started = True

        def __init__(self, config, ctx, shutdown_timeout):
            captured["config"] = config

        def run(self):
            pass

    real, service.cli.DrainingServer = service.cli.DrainingServer, Capture
    try:
        model_dir = shared_fake_model_dir()
        service.cli.serve(Settings(model=model_dir), FakeAsyncEngine(model_dir), model_dir, "m")
    finally:
        service.cli.DrainingServer = real
    return service.server._ABORT_GRACE_S + captured["config"].timeout_graceful_shutdown


def shutdown_timeout_s(objects):
    """GLM_SERVE_SHUTDOWN_TIMEOUT from the ConfigMap, else the server's default."""
    value = settings(objects).get("GLM_SERVE_SHUTDOWN_TIMEOUT")
    if value is None:
        pytest.importorskip("pydantic_settings")
        from service.settings import Settings

        return Settings.model_fields["shutdown_timeout"].default
    return float(value)


def test_drain_timing(objects):
    pod, c = pod_spec(objects), container(objects)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 5  # endpoints and load balancers need a few seconds to drop the pod
    # SIGTERM comes after preStop; then the drain, then the server's own exit timeouts, all before SIGKILL.
    grace, drained = pod["terminationGracePeriodSeconds"], pre_stop + shutdown_timeout_s(objects)
    assert grace > drained, (grace, drained)
    needed = drained + server_exit_after_drain_s()  # skips here without the server's dependencies
    assert grace >= needed, (grace, needed)


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


def package_version():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def image_name():
    """The image the base Deployment names; overlays set only its tag."""
    base = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    (c,) = base["spec"]["template"]["spec"]["containers"]
    return c["image"]


def test_cpu_overlay():
    objects = rendered("cpu")
    c = container(objects)
    assert c["image"] == f"{image_name()}:{package_version()}"
    assert settings(objects)["GLM_SERVE_DEVICE"] == "cpu"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]


def test_gpu_overlay():
    objects = rendered("gpu")
    c = container(objects)
    assert c["image"] == f"{image_name()}:{package_version()}-cuda"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(objects)["tolerations"]
    assert settings(objects)["GLM_SERVE_DEVICE"] == "cuda"
    assert settings(objects)["GLM_SERVE_DTYPE"] == "bfloat16"
    # GLM-5-FP8 on one 8-GPU node: TP = the GPUs the pod gets, the cache as deploy/memory_plan.py sizes it.
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert int(settings(objects)["GLM_SERVE_TENSOR_PARALLEL_SIZE"]) == gpus == 8
    cfg = json.loads((DEPLOY / "glm5-fp8" / "config.json").read_text())
    want = memory_plan().plan(cfg, gpus, "fp8", memory_plan().H200_MIB, memory_plan().RESERVE_GIB)
    assert int(settings(objects)["GLM_SERVE_KV_CACHE_TOKENS"]) == want["kv_cache_tokens"]
    assert int(settings(objects)["GLM_SERVE_MAX_MODEL_LEN"]) == cfg["max_position_embeddings"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert settings(objects)["GLM_SERVE_MODEL"].startswith(mounts["/models"]["mountPath"] + "/")


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


# ------------------------------------------------------------------ multi-node (LeaderWorkerSet)


@cache
def memory_plan():
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_plan", DEPLOY / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lws_pods(objects):
    lws = one(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return lws, lws["leaderTemplate"], lws["workerTemplate"]


def test_multinode_leader_and_workers():
    objects = rendered("multinode")
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "LeaderWorkerSet", "Service"]
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in objects)
    lws, leader, worker = lws_pods(objects)
    assert lws["restartPolicy"] == "RecreateGroupOnPodRestart"  # one dead rank restarts the group
    (lc,), (wc,) = leader["spec"]["containers"], worker["spec"]["containers"]
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    for c in (lc, wc):  # both read the generated ConfigMap by its hashed name
        assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [cm["metadata"]["name"]]
    conf = cm["data"]
    flags_known = server_flags()
    for key in conf:
        assert key.removeprefix("GLM_SERVE_").lower().replace("_", "-") in flags_known, key

    def flags(c):
        args = c["args"]
        return dict(zip(args[::2], args[1::2], strict=True))

    lf, wf = flags(lc), flags(wc)
    assert lf["--node-rank"] == "0" and wf["--node-rank"] == "$(LWS_WORKER_INDEX)"
    for f in (lf, wf):
        assert f["--nnodes"] == "$(LWS_GROUP_SIZE)" and f["--master-addr"] == "$(LWS_LEADER_ADDRESS)"
    assert lf["--master-port"] == wf["--master-port"]
    assert {p["name"]: p["containerPort"] for p in lc["ports"]}["dist"] == int(lf["--master-port"])
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in (lc, wc)]
    assert gpus[0] == gpus[1] and lws["size"] * gpus[0] == int(conf["GLM_SERVE_TENSOR_PARALLEL_SIZE"])
    assert "ports" not in wc and "readinessProbe" not in wc  # headless: no HTTP server on workers
    assert {k: lc[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe", "livenessProbe")} == {
        "startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    pre_stop = int(lc["lifecycle"]["preStop"]["exec"]["command"][1])
    assert leader["spec"]["terminationGracePeriodSeconds"] >= (
        pre_stop + int(conf["GLM_SERVE_SHUTDOWN_TIMEOUT"]) + server_exit_after_drain_s())
    for pod, c in ((leader, lc), (worker, wc)):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == dockerfile_uid()
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["image"].endswith("-cuda")
    # The Service reaches the leader (API server) only.
    selector = one(objects, "Service")["spec"]["selector"]
    assert all(leader["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert not all(worker["metadata"]["labels"].get(k) == v for k, v in selector.items())
    # Cache sized by the plan for bf16 GLM-5 over size x 8 GPUs.
    cfg = {k: v for k, v in json.loads((DEPLOY / "glm5-fp8" / "config.json").read_text()).items()
           if k != "quantization_config"}
    want = memory_plan().plan(cfg, lws["size"] * gpus[0], "bf16", memory_plan().H200_MIB, memory_plan().RESERVE_GIB)
    assert want["fits"] and int(conf["GLM_SERVE_KV_CACHE_TOKENS"]) == want["kv_cache_tokens"]


def test_crd_validation_catches_what_kubernetes_would_reject():
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_crds", DEPLOY / "validate_crds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    schemas = module.crd_schemas(sorted((DEPLOY / "k8s" / "crds").glob("*.yaml")))
    good = one(rendered("multinode"), "LeaderWorkerSet")
    assert module.problems([good], schemas) == (1, [])
    bad = json.loads(json.dumps(good))
    bad["spec"]["leaderWorkerTemplate"]["size"] = "two"
    bad["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["argz"] = []
    wrong_version = {**good, "apiVersion": "leaderworkerset.x-k8s.io/v9"}
    checked, found = module.problems([bad, wrong_version], schemas)
    text = "\n".join(found)
    assert checked == 1 and len(found) == 3, text
    assert "'two' is not of type 'integer'" in text and "'argz' was unexpected" in text and "/v9" in text


def test_memory_plan_reproduces_glm5_figures():
    """GLM-5's published size (744B without the MTP layer), and TP 8 bf16 not fitting an H200."""
    cfg = json.loads((DEPLOY / "glm5-fp8" / "config.json").read_text())
    mp = memory_plan()
    fp8 = mp.plan(cfg, 8, "fp8", mp.H200_MIB, mp.RESERVE_GIB)
    assert round(fp8["total_params_b"] - fp8["mtp_params_b"], 1) == 743.9
    assert fp8["kv_bytes_per_token"] == 2 * (512 + 64 + 128) * 79
    assert 85 < fp8["weight_gib_per_gpu"] < 95 and fp8["fits"]
    assert not mp.plan(cfg, 8, "bf16", mp.H200_MIB, mp.RESERVE_GIB)["fits"]
