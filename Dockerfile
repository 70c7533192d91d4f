# Headrace's image: `docker build -t headrace .` from the repository root.
# Two stages: dependencies are installed into a venv in the first, and only that venv is
# copied onto a clean slim base, so nothing used to build (pip caches, sources) ships.
# Every dependency installs from a wheel; the compiled parts are Headrace's own span
# recorder (server/headrace/telemetry/_fastspans.c: optional, but without it each span's start
# and end run in Python, about 1.7x the instructions) and OTLP span encoder (_fastotlp.c:
# optional, without it spans are pickled to the exporter process and encoded there), built in
# the first stage, which alone has a compiler.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Debian's current gcc of the release the base image pins: not pinned again here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/headrace
COPY pyproject.toml README.md ./
COPY server ./server
COPY configs ./configs
RUN /opt/headrace/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
# A fixed, unprivileged user; the Kubernetes manifests run as the same uid.
RUN groupadd --system --gid 10001 headrace \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin headrace
COPY --from=build /opt/headrace /opt/headrace
ENV PATH=/opt/headrace/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# gRPC (Open Inference Protocol) and Prometheus /metrics (when metrics.enabled).
EXPOSE 8800 8802
# Docker's own check; Kubernetes ignores it and uses the gRPC probes of the Deployment
# (configs/kubernetes/headrace-deployment.yaml). "liveness" is SERVING while the process
# runs, whatever the models' readiness.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:8800'); sys.exit(g.HealthStub(c).Check(h.HealthCheckRequest(service='liveness'), timeout=4).status != h.HealthCheckResponse.SERVING)"]
# `headrace serve` runs one worker process per available core (cgroup CPU quota included)
# under a supervisor that forwards SIGTERM, so it can be PID 1; set server.workers
# (HEADRACE_SERVER__WORKERS) to the CPU request in Kubernetes.
ENTRYPOINT ["headrace"]
CMD ["serve"]
