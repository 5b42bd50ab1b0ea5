#!/usr/bin/env bash
# A real Prometheus scrapes a real glm-serve on loopback: after N chat completions, PromQL must
# return exactly the token and request counts the completions reported, and every alert rule must
# evaluate without error against the live series. Needs Debian's prometheus (installed if missing).
# Also runs tests/test_deploy.py's live variant: every metric the dashboard, alerts and autoscaler
# query must be on this server's /metrics.
#   deploy/prometheus-smoke.sh        (after `make setup-test`: .venv's glm-serve and pytest)
# SMOKE_SERVER_CMD replaces the server command (it must read GLM_SERVE_HOST and GLM_SERVE_PORT);
# SMOKE_PYTHON the Python with pytest, pyyaml and prometheus-client.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${SMOKE_PORT:-18001}
PROM_PORT=${SMOKE_PROM_PORT:-19090}
REQUESTS=${SMOKE_REQUESTS:-3}
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-300}
read -r -a SERVER_CMD <<<"${SMOKE_SERVER_CMD:-.venv/bin/glm-serve}"
PYTHON=${SMOKE_PYTHON:-.venv/bin/python}

command -v prometheus >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

WORK=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[prometheus-smoke %(%T)T] %s\n' -1 "$*"; }

GLM_SERVE_HOST=127.0.0.1 GLM_SERVE_PORT=$PORT "${SERVER_CMD[@]}" >"$WORK/server.log" 2>&1 &
server_pid=$!
pids+=("$server_pid")

# The shipped local config and rules, pointed at this port and scraping every second.
cp deploy/prometheus/alerts.yml "$WORK/"
sed -e "s/127.0.0.1:8000/127.0.0.1:$PORT/" -e 's/_interval: 15s/_interval: 1s/' \
  deploy/prometheus/local.yml >"$WORK/prometheus.yml"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
pids+=("$!")

t0=$SECONDS
until [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ready") == 200 ]]; do
  kill -0 "$server_pid" 2>/dev/null || { cat "$WORK/server.log" >&2; echo "server exited" >&2; exit 1; }
  ((SECONDS - t0 < READY_TIMEOUT)) || { tail -50 "$WORK/server.log" >&2; echo "not ready" >&2; exit 1; }
  sleep 1
done
log "server ready after $((SECONDS - t0)) s"

model=$(curl -sS "http://127.0.0.1:$PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
for ((i = 0; i < REQUESTS; i++)); do
  curl -sS --fail-with-body --max-time 300 "http://127.0.0.1:$PORT/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Count to $i\"}], \"max_tokens\": 6, \"temperature\": 0}"
  echo
done >"$WORK/replies.jsonl"

# What PromQL must find, from the completions' own usage figures.
python3 - "$WORK" "$REQUESTS" "$PROM_PORT" <<'EOF'
import json, sys, time, urllib.parse, urllib.request
work, requests, prom = sys.argv[1], int(sys.argv[2]), sys.argv[3]
usage = [json.loads(line)["usage"] for line in open(f"{work}/replies.jsonl")]
want = {
    'sum(glm_serve:request_success_total{job="glm-serve"})': requests,
    'sum(glm_serve:prompt_tokens_total{job="glm-serve"})': sum(u["prompt_tokens"] for u in usage),
    'sum(glm_serve:generation_tokens_total{job="glm-serve"})': sum(u["completion_tokens"] for u in usage),
}

def get(path):
    with urllib.request.urlopen(f"http://127.0.0.1:{prom}{path}", timeout=5) as r:
        return json.load(r)["data"]

deadline, got = time.time() + 60, {}
while time.time() < deadline:
    try:
        got = {q: get("/api/v1/query?query=" + urllib.parse.quote(q))["result"] for q in want}
        got = {q: float(r[0]["value"][1]) if r else None for q, r in got.items()}
        rules = [r for g in get("/api/v1/rules")["groups"] for r in g["rules"]]
        if got == want and rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
    except OSError:
        pass  # Prometheus still starting
    time.sleep(1)
for q, v in want.items():
    print(f"{q} = {got.get(q)} (want {v})")
assert got == want, "PromQL does not show what the requests caused"
bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
assert not bad, f"rules failing on live series: {bad}"
print(f"{len(rules)} alert rules evaluated on live series, all healthy")
EOF

DEPLOY_METRICS_URL="http://127.0.0.1:$PORT/metrics" DEPLOY_REQUIRE_TOOLS=1 \
  "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest tests/test_deploy.py -k live_metrics

# SIGTERM drains and exits 0 (the contract the Kubernetes preStop and grace period rely on).
kill -TERM "$server_pid"
code=0
wait "$server_pid" || code=$?
[[ $code == 0 ]] || { tail -20 "$WORK/server.log" >&2; echo "server exit code after SIGTERM: $code" >&2; exit 1; }
log "SIGTERM -> exit 0; OK"
