"""fedsparse: federated and continual sparse learning on Flower, PyTorch and MLflow.

The core library (this package) is plain torch/numpy. Flower adapters live in the
top-level packages ``strategies`` (server side) and ``clients`` (client side). From Python:
``fedsparse.run``, ``fedsparse.compare``, ``fedsparse.runs`` and ``fedsparse.load_run``
(``fedsparse/api.py``), imported when first used.
"""

from typing import Any

from fedsparse.runtime_env import apply_no_phone_home

__version__ = "0.1.0"
__all__ = ["__version__", "compare", "load_run", "run", "runs"]
API = ("compare", "load_run", "run", "runs")

# A federated-learning platform must not phone home: every process that imports
# fedsparse (CLI, ServerApp, ClientApp, Ray actors, tests) turns off Flower's telemetry
# and update check, MLflow's telemetry and Hugging Face hub access before any of those
# libraries gets a chance to read its environment.
apply_no_phone_home()


def __getattr__(name: str) -> Any:
    """The Python API, imported on first use: every Flower and Ray process imports this
    package, and the API's imports (the launcher, MLflow's readers) are for users only."""
    if name in API:
        from fedsparse import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedsparse' has no attribute {name!r}")
