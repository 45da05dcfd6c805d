# syntax=docker/dockerfile:1
# SAM backend for Label Studio. CPU image by default:
#   docker build -t sam-label-studio-backend .
# CUDA image (PyTorch's CUDA wheels bring their own CUDA runtime; the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t sam-label-studio-backend:cuda .
# BASE_IMAGE may name any Debian-based image with Python 3.11 at /usr/local/bin/python (e.g. a mirror).
# See docs/deployment.md.

ARG BASE_IMAGE=python:3.11-slim

# ---- build stage: a virtualenv with torch from the chosen index, then this project and its dependencies
FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.14.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and from its own index, so that `pip install .` finds it satisfied and never pulls the
# multi-GB CUDA build from PyPI into a CPU image.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY backend ./backend
RUN pip install --no-cache-dir .

# ---- runtime stage: the virtualenv, the gunicorn settings, a non-root user, a volume for checkpoints
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="sam-label-studio-backend" \
      org.opencontainers.image.description="Segment Anything as a Label Studio ML backend" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 1000 sam \
    && useradd --system --uid 1000 --gid sam --create-home --home-dir /home/sam sam \
    && mkdir -p /models /app \
    && chown sam:sam /models
# tcmalloc as malloc (LD_PRELOAD below): glibc's malloc gives large freed blocks back to the OS and faults
# them in again on the next encode; tcmalloc keeps them for reuse, which saves 2% of a ViT-B encode's CPU
# time and 11% of a MobileSAM one's (bench/allocator.py). The base image's Debian release picks the version
# (trixie's libtcmalloc-minimal4t64, else bookworm's libtcmalloc-minimal4; both install the same .so.4).
# hadolint ignore=DL3008
RUN apt-get update \
    && (apt-get install -y --no-install-recommends libtcmalloc-minimal4t64 \
        || apt-get install -y --no-install-recommends libtcmalloc-minimal4) \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The venv holds the installed package, its gunicorn settings (backend/gunicorn_conf.py) included.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_DIR=/models \
    SAM_CHECKPOINT=vit_b \
    HOST=0.0.0.0 \
    PORT=9090 \
    LD_PRELOAD=libtcmalloc_minimal.so.4 \
    TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=17179869184
USER 1000:1000
VOLUME ["/models"]
EXPOSE 9090
# /health answers within milliseconds even while the model loads (Label Studio allows it 1 s); curl is not
# in the slim image, so Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)"]
CMD ["sam-backend", "serve"]
