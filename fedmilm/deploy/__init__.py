"""Real Flower deployments: credentials, managed processes, the local federation."""
