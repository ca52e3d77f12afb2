# dicomweb-gateway: one uvicorn worker per container (the storage SCP port, the in-process
# single-flight and pynetdicom's process-global config need it); scale out with replicas.
#
#   docker build -t dicomweb-gateway .
#   docker run --rm -p 8080:8080 -p 11112:11112 -v dwg-spool:/var/spool/dicomweb-gateway \
#       -v "$PWD/gateway.yaml:/etc/dicomweb-gateway/gateway.yaml:ro" dicomweb-gateway
#
# The mounted config needs `http.host: 0.0.0.0` and, for C-MOVE, `gateway.dimse_host: 0.0.0.0`
# (loopback is unreachable from outside the container) and `spool.path: /var/spool/dicomweb-gateway`. Without an `auth` section the gateway
# refuses a non-loopback address: append
# `serve --config /etc/dicomweb-gateway/gateway.yaml --allow-unauthenticated` to `docker run` only
# behind an authenticating proxy. Change the port with GATEWAY_HTTP__PORT (or http.port), not
# --port, so that the HEALTHCHECK probes the port the gateway serves.
#
# OpenTelemetry traces are off (the image carries the SDK; off, it is never imported). Turn them on
# in the mounted config (`tracing.enabled: true`, `tracing.endpoint: http://collector:4318/v1/traces`)
# or with `-e GATEWAY_TRACING__ENABLED=true -e GATEWAY_TRACING__ENDPOINT=...`; a collector's token
# goes in a variable that `tracing.headers_env` names (e.g. `-e GATEWAY_TRACING__HEADERS_ENV=OTLP_HEADERS
# -e OTLP_HEADERS=authorization=Bearer%20<token>`), never in the config file. No ENV default is set
# here: an image variable would override the mounted config.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The same lock as the demo and the SBOM (sbom/runtime.cdx.json describes exactly this): exact
# versions with sha256 hashes, binary wheels only, installed as the whole closure without resolving
# (--no-deps; scripts/venv.sh says why) and checked, then the project itself the same way (its
# build backend is in the lock too).
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: -r requirements/runtime.txt \
    && pip check
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY translators ./translators
COPY cache ./cache
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_CONFIG=/etc/dicomweb-gateway/gateway.yaml
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /etc/dicomweb-gateway /var/spool/dicomweb-gateway \
    && chown gateway:gateway /var/spool/dicomweb-gateway
COPY --from=build /opt/venv /opt/venv
USER 10001:10001

# The config's spool.path; the spool is a cache (emptied of instances at start), not state.
VOLUME ["/var/spool/dicomweb-gateway"]
# 8080 HTTP (http.port), 11112 DIMSE storage SCP for C-MOVE (gateway.dimse_port),
# 8081 replica-to-replica endpoint (cluster.internal_port; never publish it outside the cluster).
EXPOSE 8080 11112 8081

# No curl in the slim image: probe /healthz with Python, on the host and port the config serves.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; from gateway.settings import load_settings; h = load_settings().http; host = '127.0.0.1' if h.host in ('0.0.0.0', '::', '') else h.host; host = f'[{host}]' if ':' in host else host; sys.exit(0 if urllib.request.urlopen(f'http://{host}:{h.port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["dicomweb-gateway"]
CMD ["serve", "--config", "/etc/dicomweb-gateway/gateway.yaml"]
