# syntax=docker/dockerfile:1
# Multi-stage: build wheels (the connector's carries the shipped mappings), install them into a slim
# runtime without build tools. The daemon is the default command; one-off commands run as
#   docker run --rm -v ./config:/etc/cosell:ro -v cosell-state:/var/lib/cosell IMAGE sync --connection acme
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY connector ./connector
COPY mappings ./mappings
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[postgres]'

FROM python:3.11-slim
# A fixed non-root uid, so that a state volume or secret files can be owned by it on the host.
RUN useradd --system --uid 10001 --home-dir /var/lib/cosell cosell \
 && mkdir -p /var/lib/cosell /etc/cosell && chown cosell /var/lib/cosell
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels 'cosell[postgres]' \
 && rm -rf /wheels
# The config is mounted read-only over /etc/cosell; the example stays visible when nothing is mounted.
COPY config/example.yaml /etc/cosell/example.yaml
ENV COSELL_CONFIG=/etc/cosell/cosell.yaml \
    COSELL_DATA_DIR=/var/lib/cosell \
    COSELL_LOG__FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER cosell
VOLUME ["/var/lib/cosell"]
# /healthz, /readyz, /metrics (http.port)
EXPOSE 9464
# No curl in slim images: the health check is the image's own Python. It asks /healthz (process
# alive), not /readyz, so a database outage does not get the container restarted in a loop.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('COSELL_HTTP__PORT', '9464'), timeout=4)"]
ENTRYPOINT ["cosell"]
# SIGTERM (docker stop) lets the run in flight finish for up to --grace seconds (default 20); give
# `docker stop -t 30` / compose stop_grace_period: 30s so the container is not killed first.
CMD ["run"]
