# glm-serve container image.
#   CPU (default target):  docker build -t glm-serve:0.1.0 .
#   CUDA:                  docker build --target cuda -t glm-serve:0.1.0-cuda .
# Base images are build arguments so a registry mirror (or a locally imported base) can stand in.
# The last stage is the default target, so the CPU image comes last.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---------------------------------------------------------------- CUDA: build the venv
# The torch wheel carries its own CUDA libraries (PyPI's torch 2.14 is built for CUDA 13.0); the CUDA
# base adds the NVIDIA_* variables the container toolkit reads to inject the host driver and to refuse
# a driver too old for that CUDA version, so keep its version in step with torch's.
FROM ${CUDA_BASE_IMAGE} AS cuda-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Distribution python3; pinning exact Ubuntu package versions would break with every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
# No constraint file: pyproject's torch range takes PyPI's CUDA build.
# pip is removed afterwards: the runtime image installs nothing.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install . && /opt/venv/bin/pip uninstall -y pip

# ---------------------------------------------------------------- CUDA: runtime
FROM ${CUDA_BASE_IMAGE} AS cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
ARG APP_UID=10001
# Fixed UID in group 0 with a group-writable home: works as built and under OpenShift's random UIDs.
RUN useradd --uid "${APP_UID}" --gid 0 --home-dir /home/glm-serve --create-home --no-log-init glm-serve \
 && chmod -R g=u /home/glm-serve
COPY --from=cuda-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HOME=/home/glm-serve PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    GLM_SERVE_HOST=0.0.0.0 GLM_SERVE_PORT=8000 \
    GLM_SERVE_DEVICE=cuda GLM_SERVE_DTYPE=bfloat16
# DEVICE=cuda (not auto): a CUDA image started without a GPU should fail, not crawl on the CPU.
USER ${APP_UID}
WORKDIR /home/glm-serve
EXPOSE 8000
ENTRYPOINT ["glm-serve"]

# ---------------------------------------------------------------- CPU: build the venv
FROM ${BASE_IMAGE} AS cpu-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# PyPI's plain torch is a multi-GB CUDA build; the CPU wheel lives on PyTorch's index. Pass an empty
# TORCH_INDEX_URL (and PIP_FIND_LINKS to a wheel folder) to build without reaching that index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip's own settings, so a PyPI mirror, a local wheel folder or a proxy CA works without edits; unset
# unless passed, and they live only in this build stage.
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY model ./model
COPY service ./service
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints-cpu.txt . \
 && /opt/venv/bin/pip uninstall -y pip

# ---------------------------------------------------------------- CPU: runtime (default target)
FROM ${BASE_IMAGE} AS cpu
ARG APP_UID=10001
RUN useradd --uid "${APP_UID}" --gid 0 --home-dir /home/glm-serve --create-home --no-log-init glm-serve \
 && chmod -R g=u /home/glm-serve
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH HOME=/home/glm-serve PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    GLM_SERVE_HOST=0.0.0.0 GLM_SERVE_PORT=8000
USER ${APP_UID}
WORKDIR /home/glm-serve
EXPOSE 8000
# No HEALTHCHECK: Kubernetes probes /health and /ready (deploy/k8s).
ENTRYPOINT ["glm-serve"]
