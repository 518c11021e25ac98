# asr-server on CPU.
#   docker build -t asr-server .
#   docker run --rm -p 50051:50051 -p 9400:9400 asr-server            # demo model
#   docker run --rm -p 50051:50051 -p 9400:9400 asr-server --model random-base
# Every flag is also an ASR_* environment variable (asr-server --help). The whole stack
# (server + Prometheus + Grafana) is in docker-compose.yml.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (a cached layer until pyproject.toml changes), at the versions pinned in
# pyproject.toml. torch and torchaudio come from PyTorch's CPU-only index: PyPI's Linux torch
# wheels pull in the CUDA libraries (gigabytes). A "2.14.1+cpu" wheel satisfies "torch==2.14.1".
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
# g++ builds the server's native kernels (server/kernels/native, setup.py) below.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --index-url "$TORCH_INDEX_URL" $(grep -E '^(torch|torchaudio)==' /tmp/requirements.txt) \
 && pip install -r /tmp/requirements.txt "setuptools>=77" wheel

# The application (what .dockerignore leaves: server, client, generated stubs, the demo model),
# installed as a package (the demo model is package data); setup.py builds the native kernels here,
# every back end (avx512, avx2, portable): the server picks the one the CPU it starts on runs
# (--kernels auto), so one image serves every x86-64 CPU.
COPY . .
RUN pip install --no-build-isolation --no-deps . \
 && python -m server.kernels.native \
 && useradd --system --create-home --uid 10001 --shell /usr/sbin/nologin asr

USER asr
ENV ASR_HOST=0.0.0.0 \
    ASR_PORT=50051 \
    ASR_METRICS_HOST=0.0.0.0 \
    ASR_METRICS_PORT=9400
EXPOSE 50051 9400

# SERVING only once the model is loaded and warmed up (the port opens after that); a large
# model takes a while to load, hence the start period. asr-healthcheck reads ASR_PORT.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["asr-healthcheck", "--timeout", "4"]

ENTRYPOINT ["asr-server"]
