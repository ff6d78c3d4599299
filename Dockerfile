# flowhand worker image. Build: docker build -t flowhand .
# Run:   docker run --init -e PREFECT_API_URL=... -v ./worker.toml:/etc/flowhand/worker.toml flowhand
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/flowhand && /opt/flowhand/bin/pip install --no-cache-dir ".[docker]"

FROM ${BASE_IMAGE}
COPY --from=build /opt/flowhand /opt/flowhand
RUN useradd --system --uid 10001 --home-dir /var/lib/flowhand --create-home flowhand
ENV PATH=/opt/flowhand/bin:$PATH \
    FLOWHAND_STATE_DIR=/var/lib/flowhand
# ./worker.toml is read when present: mount one at /etc/flowhand/worker.toml (optional).
WORKDIR /etc/flowhand
USER flowhand
STOPSIGNAL SIGTERM
ENTRYPOINT ["flowhand", "start"]
