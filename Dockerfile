# BlueMarble image: the control plane, the shard node and bluemarblectl in one slim image.
#
#   docker build -t bluemarble:0.1.0 .                                  # from python:3.12-slim
#   ../shared/tools/container build -t bluemarble:dev -f Dockerfile .   # here: local Debian base
#   docker run --rm bluemarble:0.1.0                                    # prints bluemarblectl --help
#   docker run --rm bluemarble:0.1.0 bluemarble-controlplane --listen 0.0.0.0:7000 --etcd etcd:2379
#
# Two stages: the builder makes a wheel of the project and installs it with its runtime
# dependencies into a venv (/opt/venv); the final stage is the base with Python and that
# venv only: no compiler, no pip, no build tools, no sources. It runs as uid/gid 10001
# (numeric, so Kubernetes' runAsNonRoot can check it); /data (the node's data dir, a PVC in
# the chart) is owned by that user, and nothing else needs to be writable (the chart runs it
# with a read-only root filesystem and an emptyDir /tmp).
#
# BASE: python:3.12-slim by default. Where no registry is reachable, a plain Debian bookworm
# image works too (its python3 is 3.11, which the project supports): Python is installed
# from Debian's packages when the base has none. Both stages use the same BASE, so the
# venv's interpreter path (/usr/local/bin or /usr/bin) exists in the final stage.
ARG BASE=python:3.12-slim

FROM ${BASE} AS builder
RUN command -v python3 >/dev/null || (apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*)
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first, read from pyproject.toml alone: a change to the sources rebuilds only
# the small wheel layer below, not this one (the slow one: grpcio, protobuf, opentelemetry).
# The "ca" secret is a CA bundle for a TLS-intercepting proxy, where there is one (the
# local build script passes it); elsewhere it is absent and pip uses its own.
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca,required=false \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --requirement /tmp/requirements.txt
# The sources (the generated gRPC stubs are committed under bluemarble/v1) -> a wheel ->
# the venv, without touching the dependencies installed above; then pip check proves the
# wheel's own requirements are all met, and pip itself leaves the venv.
COPY README.md ./
COPY bluemarble ./bluemarble
COPY controlplane ./controlplane
COPY shardnode ./shardnode
RUN --mount=type=secret,id=ca,required=false \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps /wheels/bluemarble-*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
    && /opt/venv/bin/bluemarblectl --help >/dev/null

FROM ${BASE}
# Python (and CA certificates, for an OTLP collector or etcd behind a public CA) when the
# base has none; python:3.12-slim has both.
RUN command -v python3 >/dev/null || (apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/*)
RUN groupadd --system --gid 10001 bluemarble \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
         --shell /usr/sbin/nologin bluemarble \
    && mkdir -p /data \
    && chown 10001:10001 /data \
    && chmod 0750 /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BLUEMARBLE_DATA_DIR=/data
WORKDIR /data
USER 10001:10001
# Ports by convention (the chart's): control plane gRPC 7000, node gRPC 7101, metrics 9100.
# Every process listens on 127.0.0.1 unless told --listen 0.0.0.0:PORT.
EXPOSE 7000 7101 9100
# No entry point: the chart (and docker run) name the program. Without one, the image
# explains itself instead of starting a server.
CMD ["bluemarblectl", "--help"]
ARG BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="bluemarble" \
      org.opencontainers.image.description="BlueMarble shard control plane for MMORPG game servers: bluemarble-controlplane, bluemarble-node, bluemarblectl" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE}"
