"""fedsparse: federated and continual sparse learning on Flower, PyTorch and MLflow.

The core library (this package) is plain torch/numpy. Flower adapters live in the
top-level packages ``strategies`` (server side) and ``clients`` (client side).
"""

from fedsparse.runtime_env import apply_no_phone_home

__version__ = "0.1.0"

# A federated-learning platform must not phone home: every process that imports
# fedsparse (CLI, ServerApp, ClientApp, Ray actors, tests) turns off Flower's telemetry
# and update check, MLflow's telemetry and Hugging Face hub access before any of those
# libraries gets a chance to read its environment.
apply_no_phone_home()
