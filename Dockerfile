# syntax=docker/dockerfile:1
# d2v serving images: d2v-serve (gRPC on 50051, HTTP/JSON on 8080, Prometheus metrics on 9090) on ONNX Runtime,
# without torch. One image recipe, two flavours picked by the FLAVOR build argument (docs/deploy.md):
#
#   docker build -t d2v-serve:gpu .                               # default: CUDA execution provider, CPU fallback
#   docker build --build-arg FLAVOR=cpu -t d2v-serve:cpu .        # CPU only: plain onnxruntime, smaller
#   docker run --gpus all -p 50051:50051 -p 8080:8080 -v "$PWD/models:/models:ro" d2v-serve:gpu
#
# Behind a TLS-intercepting proxy, give pip the CA bundle that trusts it as a build secret (never stored in the
# image): docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt ...
#
# Models: mount a folder of d2v ONNX files at /models (read-only is fine). When /models is absent or holds no
# *.onnx, the demo models bundled in the package are served (deploy/docker-entrypoint.sh). Extra `docker run`
# arguments go to d2v-serve; an explicit --models wins.
# GPU flavour: onnxruntime-gpu from PyPI is built for CUDA 13 + cuDNN 9, so the base is CUDA 13 (host driver >= 580
# and the NVIDIA Container Toolkit); the install step fails the build if the two CUDA majors ever drift apart.
# The image runs as uid 10001 and writes nothing outside /tmp, so a read-only root filesystem works.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG FLAVOR=gpu

# ---- builder: the project's wheel --------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# The context is whitelisted by .dockerignore: the packages, pyproject.toml, README and the deploy scripts.
COPY . .
# A throwaway venv brings pip, so a base without pip (a Debian python3 + python3-venv) works too.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca-bundle \
    python3 -m venv /tmp/pip \
    && PYTHON=/tmp/pip/bin/python sh deploy/build-wheel.sh /src /wheels

# ---- the two bases: what differs between the flavours ------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ARG PYTHON_IMAGE
LABEL org.opencontainers.image.description="data2vec contextualized embeddings over gRPC and HTTP/JSON on ONNX Runtime (CPU)" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

FROM ${CUDA_IMAGE} AS base-gpu
ARG CUDA_IMAGE
LABEL org.opencontainers.image.description="data2vec contextualized embeddings over gRPC and HTTP/JSON on ONNX Runtime (CUDA, CPU fallback)" \
      org.opencontainers.image.base.name="${CUDA_IMAGE}"
# Ubuntu's python3 (3.12 on 24.04); versions follow the pinned base tag, and security updates are wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# ---- install: the serving venv, on the flavour's base ------------------------------------------------------------
# The GPU base sets CUDA_VERSION, so install-serving.sh installs onnxruntime-gpu and checks its CUDA against the
# image's; otherwise it installs plain onnxruntime. No bytecode, no pip, no cache: serve copies the venv alone.
# The base is a stage of this file (base-cpu or base-gpu), whose tags are pinned above.
# hadolint ignore=DL3006
FROM base-${FLAVOR} AS install
COPY --from=builder /wheels /wheels
COPY deploy/install-serving.sh deploy/check-cuda.sh /usr/local/lib/d2v/
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca-bundle \
    PYTHONDONTWRITEBYTECODE=1 sh /usr/local/lib/d2v/install-serving.sh /opt/d2v /wheels

# ---- serve: the image (the default target) -----------------------------------------------------------------------
# The same base again, as install's: the venv's interpreter is the base's python3.
# hadolint ignore=DL3006
FROM base-${FLAVOR} AS serve
ARG FLAVOR
ARG D2V_VERSION=0.1.0
LABEL org.opencontainers.image.title="d2v-serve" \
      org.opencontainers.image.version="${D2V_VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      ai.d2v.flavor="${FLAVOR}"
# No bytecode ships in the image (about 30 MB): Python compiles what it imports into /tmp on first use.
ENV PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    PYTHONPYCACHEPREFIX=/tmp/pycache \
    PATH=/opt/d2v/bin:${PATH} \
    D2V_PROBE_TARGET=localhost:50051
COPY --from=install /opt/d2v /opt/d2v
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/lib/d2v/
RUN groupadd --system --gid 10001 d2v \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin d2v \
    && mkdir -p /models
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 8080 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["d2v-healthcheck", "--timeout", "4"]
ENTRYPOINT ["/usr/local/lib/d2v/docker-entrypoint.sh"]
CMD []
