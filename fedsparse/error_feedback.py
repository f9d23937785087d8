"""Compressed FedAvg with client-side error feedback: the classic compressed baseline.

Error feedback (Seide et al. 2014; Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with
memory"; Karimireddy et al. 2019, EF-SGD), in federated form (e.g. Li & Li 2023, Fed-EF):

    client i:  u_i = y_i - x                 (local model minus the global model)
               p_i = u_i + e_i               (add the residual of earlier rounds)
               m_i = C(p_i);  e_i <- p_i - m_i;  upload m_i
    server:    x <- x + eta_g * sum_i (n_i / n) m_i      (FedAvg weights, accepted replies)

Without error feedback (``e_i = 0`` always) it is plain compressed FedAvg. With C = identity
and eta_g = 1 it is FedAvg. Like every piece of client state, the new residual holds only
once the server counted the message (``fedsparse/client_state.py``); a lost message leaves
the residual as it was before that round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from fedsparse.compress import Compressor, CompressorConfig, Payload
from fedsparse.compress.topk import TopKSpec
from fedsparse.registry import StrategyParams


class FedAvgEFParams(StrategyParams):
    name: Literal["fedavg_ef"] = "fedavg_ef"
    global_lr: float = Field(1.0, gt=0, description="eta_g")
    compressor: CompressorConfig = Field(default_factory=lambda: TopKSpec(ratio=0.01))
    error_feedback: bool = Field(True, description="keep the residual e_i (false: plain "
                                                   "compressed FedAvg)")


@dataclass(frozen=True)
class EFMessage:
    payload: Payload
    sent: np.ndarray  # m_i, what the server decodes
    residual: np.ndarray  # p_i - m_i, the new e_i once the server counts m_i


def ef_message(update: np.ndarray, residual: np.ndarray, compressor: Compressor,
               rng: np.random.Generator, error_feedback: bool = True) -> EFMessage:
    """Compress ``update + residual`` (or ``update`` alone without error feedback)."""
    p = (update + residual).astype(np.float32) if error_feedback else update.astype(np.float32)
    payload, sent = compressor(p, rng)
    if not error_feedback:
        return EFMessage(payload, sent, np.zeros_like(p))
    return EFMessage(payload, sent, (p - sent).astype(np.float32))


def server_step(x: np.ndarray, messages: list[np.ndarray], weights: list[int],
                global_lr: float) -> np.ndarray:
    """``x + eta_g * sum_i (n_i / n) m_i``."""
    total = float(sum(weights))
    step = np.sum([m.astype(np.float64) * (w / total) for m, w in zip(messages, weights,
                                                                      strict=True)], axis=0)
    return (x + global_lr * step).astype(np.float32)
