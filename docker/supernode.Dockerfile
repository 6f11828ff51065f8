# Flower's official SuperNode image of the pinned version, with phoning home switched off.
ARG FLWR_VERSION=1.42.0
FROM flwr/supernode:${FLWR_VERSION}
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
