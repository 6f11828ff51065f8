"""The Flower ClientApp of fedmilm and the phone's device storage (installed as `fedmilm.clients`)."""
