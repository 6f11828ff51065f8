# Flower's official SuperLink image of the pinned version, with phoning home switched off.
ARG FLWR_VERSION=1.42.0
FROM flwr/superlink:${FLWR_VERSION}
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
# The state database (registered SuperNodes, runs) lives on a volume mounted here.
RUN mkdir -p /app/state
