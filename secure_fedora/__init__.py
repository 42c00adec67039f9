"""secure-fedora: personalized federated learning with parameter propagation, private by construction."""

from typing import Any

__version__ = "0.1.0"

_API = {"Experiment", "Results", "run"}


def __getattr__(name: str) -> Any:
    # The Python API (secure_fedora.api) is imported on first use, so `import secure_fedora`
    # stays light for the CLI and the Flower apps.
    if name in _API:
        from secure_fedora import api
        return getattr(api, name)
    raise AttributeError(f"module 'secure_fedora' has no attribute {name!r}")
