"""The Flower ServerApp of fedmilm (installed as `fedmilm.server`)."""
