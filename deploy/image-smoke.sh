#!/usr/bin/env bash
# Build the CPU image without a Docker engine, run it, and check that it serves.
#   deploy/image-smoke.sh [build|run|all]      (default: all; run as root on Debian 12)
# SMOKE_MODEL_DIR=DIR serves a host checkpoint instead of the shipped model (files readable by UID 10001).
# Build: podman (buildah inside) with --isolation chroot and --network host, FROM a Debian base made
# with mmdebstrap + `podman import`, and the CPU torch wheel pip already has on disk mounted into the
# build, so nothing but PyPI and Debian is reached. Run: the container on loopback, then /ready,
# /v1/models, one chat completion, and SIGTERM -> exit 0 (the drain contract).
set -euo pipefail
cd "$(dirname "$0")/.."

PHASE=${1:-all}
WORK=${SMOKE_DIR:-/var/tmp/glm-serve-smoke}
BASE_IMAGE=${SMOKE_BASE_IMAGE:-localhost/glm-serve-base:bookworm}
IMAGE=${SMOKE_IMAGE:-localhost/glm-serve:smoke}
PORT=${SMOKE_PORT:-18000}
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-600}
NAME=glm-serve-smoke
HOST_CA=/etc/ssl/certs/ca-certificates.crt
# This machine kind runs containers as root with runc and cgroupfs (no systemd), and refuses rlimits
# above its own: podman's defaults (nofile/nproc 1M) fail with "error setting rlimit".
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
ULIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)

log() { printf '[image-smoke %(%T)T] %s\n' -1 "$*"; }

install_tools() {
  local missing=()
  for t in podman buildah mmdebstrap runc curl; do command -v "$t" >/dev/null || missing+=("$t"); done
  if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

make_base() {
  if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then log "base $BASE_IMAGE exists"; return; fi
  mkdir -p "$WORK"
  # The host's own apt sources (a file argument is pasted into the chroot), so a mirror set up here
  # is used as it is; python3 3.11 matches the cp311 torch wheel.
  local sources=()
  [[ -f /etc/apt/sources.list.d/debian.sources ]] && sources=(/etc/apt/sources.list.d/debian.sources)
  log "mmdebstrap bookworm -> $WORK/base.tar"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/base.tar" "${sources[@]}"
  "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$WORK/base.tar" "$BASE_IMAGE" >/dev/null
  rm -f "$WORK/base.tar"
}

build() {
  install_tools
  make_base
  # pip's configured find-links/index already hold the CPU torch wheel; copy it out for the build.
  local torch_req wheels="$WORK/wheels"
  torch_req=$(grep -E '^torch==' constraints-cpu.txt)
  mkdir -p "$wheels"
  python3 -m pip download --quiet "$torch_req" --no-deps -d "$wheels" 2>"$WORK/pip-download.log" \
    || { cat "$WORK/pip-download.log" >&2; exit 1; }
  log "building $IMAGE (target cpu) from $BASE_IMAGE"
  # buildah 1.28 then warns the PIP_* args were "not consumed": it looks only at the last stage.
  local t0=$SECONDS
  nice -n 10 "${PODMAN[@]}" build --isolation chroot --network host "${ULIMITS[@]}" \
    --target cpu -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL= \
    --build-arg PIP_FIND_LINKS=/wheels \
    --build-arg PIP_CERT=/etc/host-ca.crt \
    -v "$wheels:/wheels:ro" -v "$HOST_CA:/etc/host-ca.crt:ro" \
    .
  log "built in $((SECONDS - t0)) s: $("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes"
}

http() { curl -sS --max-time "${2:-30}" "http://127.0.0.1:$PORT$1"; }

run() {
  "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
  trap '"${PODMAN[@]}" logs --tail 50 "$NAME" >&2 || true; "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
  # SMOKE_MODEL_DIR serves that checkpoint instead of the one shipped in the image.
  local model_args=()
  [[ -z ${SMOKE_MODEL_DIR:-} ]] || model_args=(-v "$SMOKE_MODEL_DIR:/models/smoke:ro" -e GLM_SERVE_MODEL=/models/smoke)
  # Read-only root and tmpfs for /tmp and $HOME, as the Kubernetes manifests run it; loopback only.
  "${PODMAN[@]}" run -d --name "$NAME" --network host "${ULIMITS[@]}" \
    --read-only --tmpfs /tmp --tmpfs /home/glm-serve:mode=1777 "${model_args[@]}" \
    -e GLM_SERVE_HOST=127.0.0.1 -e GLM_SERVE_PORT="$PORT" "$IMAGE" >/dev/null
  log "container started; waiting for /ready (up to $READY_TIMEOUT s)"
  local t0=$SECONDS
  until [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ready") == 200 ]]; do
    [[ $("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$NAME") == true ]] || { echo "container exited" >&2; exit 1; }
    ((SECONDS - t0 < READY_TIMEOUT)) || { echo "not ready after $READY_TIMEOUT s" >&2; exit 1; }
    sleep 2
  done
  local uid
  uid=$("${PODMAN[@]}" exec "$NAME" id -u)
  [[ $uid != 0 ]] || { echo "container runs as root" >&2; exit 1; }
  # The Kubernetes preStop hook runs `sleep` inside the image.
  "${PODMAN[@]}" exec "$NAME" sleep 0 || { echo "no sleep binary for the preStop hook" >&2; exit 1; }
  log "ready after $((SECONDS - t0)) s, running as uid $uid"
  local model reply
  model=$(http /v1/models | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
  reply=$(curl -sS --fail-with-body --max-time 300 "http://127.0.0.1:$PORT/v1/chat/completions" \
    -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 8, \"temperature\": 0}")
  python3 - "$reply" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
choice = r["choices"][0]
assert r["object"] == "chat.completion", r
assert isinstance(choice["message"]["content"], str), r
assert choice["finish_reason"] in ("stop", "length"), r
assert r["usage"]["completion_tokens"] >= 1, r
print("chat completion:", repr(choice["message"]["content"]), r["usage"])
EOF
  # Read the whole body first: `curl | grep -q` fails under pipefail when grep exits before curl has written all.
  local metrics
  metrics=$(http /metrics)
  grep -q '^glm_serve:num_requests_running' <<<"$metrics" || { echo "/metrics lacks glm_serve:num_requests_running" >&2; exit 1; }
  # SIGTERM, then the server drains and must exit 0 (podman stop sends SIGKILL only after -t).
  "${PODMAN[@]}" stop -t 60 "$NAME" >/dev/null
  local code
  code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$NAME")
  [[ $code == 0 ]] || { echo "exit code after SIGTERM: $code" >&2; exit 1; }
  log "SIGTERM -> exit 0"
  trap - EXIT
  "${PODMAN[@]}" rm -f "$NAME" >/dev/null
}

case $PHASE in
  build) build ;;
  run) run ;;
  all) build; run ;;
  *) echo "usage: $0 [build|run|all]" >&2; exit 2 ;;
esac
log "$PHASE: OK"
