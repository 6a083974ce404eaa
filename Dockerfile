# syntax=docker/dockerfile:1
# The gateway image: `gateway run` on the config at /etc/gateway/gateway.yaml
# (mount your own there), secrets and DSNs from the environment. See
# deploy/README.md. Build from the repository root:
#   docker build -t gateway:dev .

# The Python the test suite runs on; bookworm pinned so a rebuild does not
# silently move to another Debian release.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: wheels for the gateway and every dependency ---------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# Dependencies first, read from pyproject.toml itself: this layer is rebuilt only
# when they change, not on every source edit.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip wheel --wheel-dir /wheels --requirement requirements.txt

# README.md is the package's long description: the build needs it.
COPY README.md ./
COPY gateway/ gateway/
RUN pip wheel --no-deps --wheel-dir /wheels .

# -- runtime: the installed wheels and nothing else ----------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="API gateway for metered assessment APIs: bearer keys, rate limits and prepaid credits."

# No .pyc writes at run time (the root file system is read-only in Kubernetes),
# logs unbuffered so they reach `docker logs` at once.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric id: Kubernetes' runAsNonRoot can only verify a numeric USER,
# and the manifests' runAsUser matches it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-log-init \
        --home-dir /var/lib/gateway --create-home --shell /usr/sbin/nologin gateway

# The wheels are bind-mounted from the builder, never copied, so they leave no
# layer behind; --no-index installs exactly what the builder resolved. pip and
# its helpers go afterwards: nothing installs packages at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels gateway \
    && pip uninstall --yes pip setuptools wheel

# The default config: the edge tier, every secret from the environment
# (GATEWAY_ADMIN_TOKEN, GATEWAY_STORAGE, GATEWAY_POSTGRES_LISTEN_DSN,
# GATEWAY_LIMITER...). Mounting a file here replaces it.
COPY deploy/config/edge.yaml /etc/gateway/gateway.yaml
# Management commands (`gateway teams create ...`) run in the container find the
# same file without --config.
ENV GATEWAY_CONFIG=/etc/gateway/gateway.yaml

# Writable only for a SQLite store (a relative sqlite:/// path lands here);
# mount a volume on it if you use one.
WORKDIR /var/lib/gateway
USER 10001:10001

# public, status (/healthz, /readyz, /metrics), admin (on 127.0.0.1 unless the config says otherwise)
EXPOSE 8080 9091 9090

# What the gateway handles: fail /readyz, wait, stop accepting, drain, flush, exit 0.
STOPSIGNAL SIGTERM

# Liveness from the status listener, with the standard library: the image has no
# curl. urlopen raises on a refused connection and on any non-2xx answer, so the
# exit code is the verdict. Set GATEWAY_HEALTHCHECK_URL if status.listen moves.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('GATEWAY_HEALTHCHECK_URL', 'http://127.0.0.1:9091/healthz'), timeout=2)"]

ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/gateway/gateway.yaml"]
