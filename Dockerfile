# syntax=docker/dockerfile:1.7
#
# gpu-matrix-service images. Targets:
#   runtime      (default) CUDA runtime image, CUDA C library built by nvcc, runs on NVIDIA GPUs:
#                  docker build -t gpu-matrix-service .
#                  docker run --gpus all -p 8000:8000 gpu-matrix-service
#   runtime-cpu  slim Python image for hosts without GPUs (NumPy backend):
#                  docker build --target runtime-cpu -t gpu-matrix-service:cpu .
#
# Python: the nvidia/cuda images ship no Python 3.11+, so uv installs a managed CPython
# (python-build-standalone) into /opt/python in the build stage, and the runtime stage copies
# that directory together with the virtual environment in /opt/venv, whose interpreter links
# to it. Same paths in both stages, no deadsnakes PPA, no apt Python.
#
# CUDA_VERSION: 12.x runs on drivers >= 525 (CUDA 12 minor-version compatibility); set it to a
# 13.x release (drivers >= 580) to build with CUDA 13. The runtime stage must use the same
# version as the build stage: the kernel library opens that release's cuBLAS at start-up.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
ARG PYTHON_VERSION=3.12
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------------------------
# build: locked dependencies with uv, then the CUDA C library with nvcc.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build
ARG PYTHON_VERSION
# nvcc needs a host C++ compiler; the devel image may not carry one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /uvx /usr/local/bin/
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PYTHON=${PYTHON_VERSION} \
    UV_PROJECT_ENVIRONMENT=/opt/venv
RUN --mount=type=cache,target=/root/.cache/uv uv python install "${PYTHON_VERSION}"
WORKDIR /src
# Dependencies first, in a layer of their own that changes only with uv.lock.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --locked --no-dev --no-install-project
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
# The project itself, as a wheel (not editable): the runtime stage needs /opt/venv only.
RUN --mount=type=cache,target=/root/.cache/uv uv sync --locked --no-dev --no-editable
ENV PATH=/opt/venv/bin:${PATH}
# Builds libgms_kernels.so into the installed package, where the cuda backend looks first,
# and the C reader of small uploads beside it (no compiler in the runtime image).
RUN gpu-matrix-service build-kernels && gpu-matrix-service build-native

# ---------------------------------------------------------------------------------------------
# build-cpu: the same locked environment on the slim image's own Python, no CUDA toolkit.
FROM python:${PYTHON_VERSION}-slim AS build-cpu
# A C compiler for the reader of small uploads (build-native below).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /uvx /usr/local/bin/
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --locked --no-dev --no-install-project
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/uv uv sync --locked --no-dev --no-editable
RUN /opt/venv/bin/gpu-matrix-service build-native

# ---------------------------------------------------------------------------------------------
# runtime-cpu: NumPy backend only, for hosts without GPUs.
FROM python:${PYTHON_VERSION}-slim AS runtime-cpu
# A numeric USER below, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 gms \
    && useradd --system --uid 10001 --gid 10001 --create-home gms
COPY --from=build-cpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    GMS_HOST=0.0.0.0 \
    GMS_BACKEND=cpu \
    PORT=8000
USER 10001:10001
WORKDIR /home/gms
EXPOSE 8000
# No curl in the image: the venv's Python asks /health/ready (urlopen raises on a 503).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('GMS_PORT', os.environ.get('PORT', '8000')), timeout=4)"]
CMD ["gpu-matrix-service", "serve"]

# ---------------------------------------------------------------------------------------------
# runtime (the default target): the CUDA runtime image carries cuBLAS, which the kernel
# library opens at start-up; the static CUDA runtime is inside the library itself.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime
RUN groupadd --system --gid 10001 gms \
    && useradd --system --uid 10001 --gid 10001 --create-home gms
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    GMS_HOST=0.0.0.0 \
    PORT=8000 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/gms
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('GMS_PORT', os.environ.get('PORT', '8000')), timeout=4)"]
CMD ["gpu-matrix-service", "serve"]
