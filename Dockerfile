# The MetaNet service: the package with its serving extras and the shipped weights, run as the
# non-root user `metanet` (uid 10001), the task store on the volume /data, listening on port 8000.
#
#   CPU (default):  docker build -t metanet-service .
#   GPU:            docker build -t metanet-service:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#   run:            docker run -p 8000:8000 -v metanet-data:/data metanet-service
#                   docker run --gpus all -p 8000:8000 -v metanet-data:/data metanet-service:cuda
#
# Build arguments:
#   BASE_IMAGE       a Debian or Ubuntu image. One without Python (the CUDA runtime images) gets
#                    python3 from apt-get; it must be 3.11 or newer. Every step calls `python3`.
#   TORCH_INDEX_URL  where torch comes from: the CPU-only build (default) or a CUDA one (.../cu130)
#   TORCH_VERSION    the torch release, installed first so no later version range pulls another build
#   WHEELS_DIR       a directory of the build context; when it holds wheels, everything is installed
#                    from them with --no-index and the build needs no network (docker/wheels/README.md)
#
# Settings are METANET_* environment variables (docs/operations.md, "Settings"): the image sets
# METANET_HOST=0.0.0.0, METANET_PORT=8000 and METANET_DATA_DIR=/data; pass others with `-e`
# (API keys: METANET_API_KEYS, or METANET_API_KEYS_FILE naming a mounted file).

ARG BASE_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------------------ base
FROM ${BASE_IMAGE} AS base
RUN set -eu; \
    if ! command -v python3 >/dev/null; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), "needs Python >= 3.11, not " + sys.version'

# --------------------------------------------------------------------------------------- builder
FROM base AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG WHEELS_DIR=docker/wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
COPY ${WHEELS_DIR}/ /wheels/
WORKDIR /src

# torch first, so it is the build TORCH_INDEX_URL names. From wheels, a CPU build where .../whl/cuXXX
# asks for CUDA (or the reverse) stops the build. Its C++ headers, test programs and protoc go
# (about 190 MB): they serve C++ extensions and torch.compile, which the service does not use.
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
        pip install --no-index --find-links /wheels "torch==${TORCH_VERSION}"; \
        build="$(python3 -c 'import torch; print(torch.__version__.partition("+")[2])')"; \
        asked="${TORCH_INDEX_URL%/}"; \
        case "$asked" in */whl/*) asked="${asked##*/whl/}";; *) asked="";; esac; \
        case "$build:$asked" in \
            cpu:cpu|*:) ;; \
            cpu:*|*:cpu) \
                echo "torch ${TORCH_VERSION}+${build:-cuda} in ${WHEELS_DIR}: not the $asked build" >&2; \
                exit 1;; \
        esac; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi; \
    torch="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')"; \
    rm -rf "$torch/test" "$torch/include"; \
    find "$torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +

# Then the dependencies, read from pyproject.toml, so that a change to the code does not redo them.
COPY pyproject.toml README.md ./
RUN set -eu; \
    python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["serve"]))' > /tmp/requirements.txt; \
    if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; else set --; fi; \
    pip install "$@" -r /tmp/requirements.txt

# Then the package with its serving extras; not editable, so the weights (package data) travel
# inside the venv and /src stays behind.
COPY model/ model/
COPY service/ service/
COPY metanet_client/ metanet_client/
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheels; else set --; fi; \
    pip install "$@" ".[serve]"; \
    pip check; \
    python3 -c 'from importlib.resources import files; assert (files("model") / "weights/config.json").is_file()'

# ---------------------------------------------------------------------------------------- runtime
FROM base AS runtime
LABEL org.opencontainers.image.title="metanet-service" \
      org.opencontainers.image.description="Few-shot image classification over HTTP (Meta Networks)" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 metanet \
    && useradd --system --uid 10001 --gid metanet --create-home --home-dir /home/metanet \
        --shell /usr/sbin/nologin metanet \
    && mkdir -p /data && chown metanet:metanet /data
COPY --from=builder /opt/venv /opt/venv

# MALLOC_ARENA_MAX: glibc's per-thread malloc arenas otherwise make resident memory climb in steps
# under concurrent load (bounded, but it reads like a leak; see bench/README.md, soak).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    METANET_HOST=0.0.0.0 \
    METANET_PORT=8000 \
    METANET_DATA_DIR=/data
# The SQLite task store (tasks.sqlite3 and its WAL); empty when METANET_STORE_URL names a Redis.
VOLUME ["/data"]
EXPOSE 8000
WORKDIR /home/metanet
USER metanet

# /healthz: 200 while the process lives (orchestrators route traffic on /readyz instead).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METANET_PORT', '8000'), timeout=4)"]

# Exec form: no shell in between, so `docker stop`'s SIGTERM reaches the server, which drains
# in-flight requests (METANET_SHUTDOWN_TIMEOUT_S) and closes the store.
CMD ["metanet", "serve"]
