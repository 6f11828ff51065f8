"""The Flower ClientApp and the phone's device storage (installed as `fedmilm.clients`)."""
