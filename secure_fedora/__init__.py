"""secure-fedora: personalized federated learning with parameter propagation, private by construction."""

__version__ = "0.1.0"
