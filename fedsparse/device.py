"""Where a client trains: CUDA when the scenario gives clients a GPU and the process sees one,
the CPU otherwise, chosen per process; and the one way a tensor leaves that device.

In simulation Ray places each client actor on a share ``run.client_gpus`` of one GPU and sets
the actor's ``CUDA_VISIBLE_DEVICES`` to that GPU's id, so the actor sees it as ``cuda:0``; a
SuperNode without a GPU, or a torch built without CUDA, sees none and trains on the CPU
(in deployment ``run.client_gpus > 0`` only says that clients may use a GPU they have).
With ``run.client_gpus = 0`` (the default) clients train on the CPU even on a machine with
GPUs: fedsparse runs Ray with ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` (``runtime_env.py``),
under which an actor given no GPU still sees every GPU of its node. ``FEDSPARSE_DEVICE``
(``cpu``, ``cuda`` or ``cuda:<index>``) overrides the choice, for tests and debugging. The
server never calls this: it stays on the CPU.

Everything that crosses the wire or goes into client state is numpy on the CPU:
:func:`cpu_numpy` is how a tensor of the training device becomes one.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

CPU = torch.device("cpu")
DEVICE_ENV = "FEDSPARSE_DEVICE"


def client_device(client_gpus: float) -> torch.device:
    """The device this client process trains and evaluates on (see the module docstring)."""
    override = os.environ.get(DEVICE_ENV, "")
    if override:
        return _forced(override)
    if client_gpus > 0 and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", 0)
    return CPU


def _forced(name: str) -> torch.device:
    """The device ``FEDSPARSE_DEVICE`` names."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if match is None:
        raise ValueError(f"{DEVICE_ENV}={name!r}; allowed: cpu, cuda, cuda:<index>")
    if name == "cpu":
        return CPU
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"{DEVICE_ENV}={name!r} but this process sees "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def cpu_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` detached, on the CPU, as numpy (a CPU tensor's own memory, as ``.numpy()``
    gives it; a copy for one on another device)."""
    return tensor.detach().cpu().numpy()
