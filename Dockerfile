# syntax=docker/dockerfile:1
# Multi-stage: build a wheel (which carries the shipped mappings), install it into a slim runtime.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY connector ./connector
COPY mappings ./mappings
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[postgres]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/cosell cosell \
 && mkdir -p /var/lib/cosell /etc/cosell && chown cosell /var/lib/cosell
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels cosell psycopg \
 && rm -rf /wheels
COPY config/example.yaml /etc/cosell/example.yaml
ENV COSELL_CONFIG=/etc/cosell/cosell.yaml \
    COSELL_DATA_DIR=/var/lib/cosell \
    COSELL_LOG__FORMAT=json
USER cosell
VOLUME ["/var/lib/cosell"]
EXPOSE 9464
ENTRYPOINT ["cosell"]
# The daemon (`run`) and its /healthz HEALTHCHECK arrive with the daemon issue; until then the
# image checks the mounted configuration's mappings.
CMD ["mappings", "check"]
