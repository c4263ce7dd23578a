# syntax=docker/dockerfile:1
#
# One Dockerfile, two images:
#
#   docker build --target web    -t diffqueue-web .     # Flask under gunicorn, no torch
#   docker build --target worker -t diffqueue-worker .  # Celery worker with torch + CUDA wheels
#
# `web` is the last stage, so a plain `docker build .` gives the small web image.
#
# The package is installed editable (`pip install -e`) on purpose: migrations/
# and alembic.ini are not part of the wheel, and shared.db finds migrations/ next
# to the source tree (/app/migrations).
#
# Dependencies are installed from pyproject.toml *before* the source is copied,
# so that editing code does not re-download torch (several GB) on every build.

# --------------------------------------------------------------------------
# base: Python, a non-root user, and the core (web/CLI) dependencies
# --------------------------------------------------------------------------
FROM python:3.11-slim AS base

# DIFFQUEUE_DATA_DIR is where the embedded (SQLite/folder) defaults would go;
# compose sets every URL explicitly, but keep the fallback writable by the app user.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DIFFQUEUE_DATA_DIR=/var/lib/diffqueue

RUN groupadd --system --gid 10001 diffqueue \
 && useradd --system --uid 10001 --gid diffqueue --home-dir /var/lib/diffqueue \
        --no-create-home --shell /usr/sbin/nologin diffqueue \
 && mkdir -p /var/lib/diffqueue \
 && chown diffqueue:diffqueue /var/lib/diffqueue

WORKDIR /app

# Core dependencies only (the [project] dependencies list), as their own layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies']))" \
        > /tmp/requirements-core.txt \
 && pip install --no-cache-dir -r /tmp/requirements-core.txt \
 && rm /tmp/requirements-core.txt

# --------------------------------------------------------------------------
# worker: Celery worker on the `gpu` queue, with torch/diffusers
# --------------------------------------------------------------------------
# The torch wheels on PyPI bundle the CUDA runtime (nvidia-* wheels), so a slim
# Python base is enough; the host needs the NVIDIA driver and the NVIDIA
# container toolkit (compose reserves the GPU with deploy.resources).
FROM base AS worker

ENV HF_HOME=/cache/huggingface \
    DIFFQUEUE_CACHE_DIR=/cache/diffqueue \
    DIFFQUEUE_MODELS_DIR=/models \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['optional-dependencies']['worker']))" \
        > /tmp/requirements-worker.txt \
 && pip install --no-cache-dir -r /tmp/requirements-worker.txt \
 && rm /tmp/requirements-worker.txt

# Mount points for the caches/models, owned by the app user so that named
# volumes mounted there start out writable by it.
RUN mkdir -p /cache/huggingface /cache/diffqueue /models \
 && chown -R diffqueue:diffqueue /cache /models

COPY . .
RUN pip install --no-cache-dir -e ".[worker]"

USER diffqueue

# Celery does a warm shutdown on SIGTERM (the default stop signal); compose
# gives it stop_grace_period to let a running job checkpoint.
CMD ["diffqueue", "worker", "--queues", "gpu,cpu", "--concurrency", "1"]

# --------------------------------------------------------------------------
# web: the Flask app under gunicorn (also used for `diffqueue db upgrade`)
# --------------------------------------------------------------------------
FROM base AS web

COPY . .
RUN pip install --no-cache-dir -e .

USER diffqueue

EXPOSE 8000

# `diffqueue web` runs gunicorn.
CMD ["diffqueue", "web", "--host", "0.0.0.0", "--port", "8000", "--workers", "4"]
