# flowhand worker image: flowhand with the Docker and Kubernetes extras, run by tini as a
# non-root user.
#
#   docker build -t flowhand .
#   docker run -d --name flowhand -e PREFECT_API_URL=http://prefect:4200/api \
#     -v ./worker.toml:/etc/flowhand/worker.toml:ro -v flowhand-state:/var/lib/flowhand \
#     flowhand --pool my-pool
#
# Arguments after the image name go to `flowhand start`. The configuration file
# /etc/flowhand/worker.toml is optional (it is `./worker.toml` in the working directory); the
# environment (PREFECT_API_URL, FLOWHAND_*) and flags work without it. See docs/service.md.
#
# BASE_IMAGE: any Debian-like image with Python >= 3.11 as `python3`. Without a registry, build
# a local one (scripts/build-test-images.sh --python-base) and pass
# --build-arg BASE_IMAGE=flowhand-test/python-base:bookworm --network host.
#
# The image does not contain Prefect: runs without a `command` start Prefect's engine, so they
# need it where they execute. The Docker backend runs them in images of their own; for the process
# backend, extend this image (FROM flowhand, then USER root, pip install prefect, USER 10001): the
# `prefect` on PATH names the Python that runs `-m prefect.engine`.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# tini, from Debian: a minimal init for PID 1. It forwards SIGTERM to flowhand and reaps
# orphaned processes that runs leave behind. The static build is copied to the final stage.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/flowhand
WORKDIR /src
# Dependencies first, from pyproject.toml alone: a source change does not re-download them.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['docker'] \
                + p['optional-dependencies']['kubernetes']))" >requirements.txt \
 && /opt/flowhand/bin/pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY src ./src
RUN /opt/flowhand/bin/pip install --no-cache-dir --no-deps . \
 && /opt/flowhand/bin/flowhand --version

FROM ${BASE_IMAGE}
COPY --from=build /usr/bin/tini-static /usr/bin/tini
COPY --from=build /opt/flowhand /opt/flowhand
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it and volume ownership
# is predictable. The state directory is its home; mount a volume there to keep it.
RUN groupadd --gid 10001 flowhand \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/flowhand --no-create-home \
    --no-log-init --shell /usr/sbin/nologin flowhand \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/flowhand \
 && mkdir -p /etc/flowhand
ENV PATH=/opt/flowhand/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    FLOWHAND_STATE_DIR=/var/lib/flowhand \
    PYTHONUNBUFFERED=1
# `flowhand start` reads ./worker.toml when it exists: mount one at /etc/flowhand/worker.toml.
WORKDIR /etc/flowhand
USER 10001:10001
# SIGTERM is flowhand's "stop": claim nothing more, then apply [shutdown] mode (drain by
# default). Give `docker stop -t` / the orchestrator's grace period more than
# shutdown.grace_seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "flowhand", "start"]
