# One image for every recstream daemon (stream, land, serve, schedule); docker-compose.yml
# picks the subcommand. Build: docker compose build
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RECSTREAM_HOME=/var/lib/recstream

# Torch first, pinned to the CPU build from PyTorch's own index: PyPI's Linux wheel of the
# same version drags in several GB of CUDA libraries these CPU-only daemons never load.
# 2.13.0+cpu satisfies the project's torch==2.13.0, so `pip install .` keeps it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

RUN useradd --system --uid 10001 --create-home --home-dir /home/recstream recstream \
    && mkdir -p /var/lib/recstream \
    && chown recstream:recstream /var/lib/recstream

WORKDIR /opt/recstream
# .dockerignore keeps the venv, local state, git and caches out of the context.
COPY . .
RUN pip install . && rm -rf build ./*.egg-info

USER recstream
WORKDIR /var/lib/recstream
# The named volume mounted here copies this directory's owner on first use.
VOLUME ["/var/lib/recstream"]

ENTRYPOINT ["recstream"]
CMD ["--help"]
