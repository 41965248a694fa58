# syntax=docker/dockerfile:1
# The model worker: one process per GPU. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t redbatch-worker .
# Run it with a GPU: docker run --gpus 1 -e REDBATCH_REDIS_URL=redis://HOST:6379/0 redbatch-worker
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/redbatch \
    TORCH_HOME=/home/redbatch/.cache/torch
# The base image's torch and torchvision serve the [worker] extra. `pip install .` (no extra)
# adds only the base dependencies, so pip never re-resolves or re-downloads torch; the import
# check fails the build if the base image ever stops shipping them.
# The source is bind-mounted read-write so the build's scratch files never reach a layer.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir /src \
    && python -c "import torch, torchvision, worker.main; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
# A writable HOME so torchvision can cache pretrained weights in ~/.cache/torch; the directory
# exists (owned by the user) so that a named volume mounted there starts with that owner.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/redbatch --shell /usr/sbin/nologin redbatch \
    && mkdir -p /home/redbatch/.cache/torch \
    && chown -R 10001:10001 /home/redbatch
USER 10001:10001
WORKDIR /home/redbatch
CMD ["redbatch", "worker"]
