# syntax=docker/dockerfile:1
# The HTTP API: gunicorn + Flask, no torch. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t redbatch-api .

# Builder: the project's wheel plus a wheel of every base dependency, so that the final stage
# needs neither the source tree nor a compiler. Only what the wheel is built from is copied, so
# edits to tests or docs do not rebuild it.
FROM python:3.12-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY common ./common
COPY worker ./worker
# No extra is asked for, so the [worker] extra's model stack never enters /wheels.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    REDBATCH_BIND=0.0.0.0:8000
# --no-index: only the builder's wheels can be installed. The bind mount keeps them out of the image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels /wheels/redbatch-*.whl \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin redbatch
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["redbatch", "api", "--bind", "0.0.0.0:8000"]
