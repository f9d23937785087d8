"""Continual learning: task streams, CL metrics, the replay buffer, learners (naive, ER,
DER++) and SparCL's plugins (TDM, DGM, DDR)."""

from fedsparse.continual.buffer import ReservoirBuffer
from fedsparse.continual.ddr import DataRemoval, removal_counts
from fedsparse.continual.dgm import GradientMasking
from fedsparse.continual.learners import DERPP, Learner, Naive, Replay, Step, StepHooks
from fedsparse.continual.metrics import (
    average_accuracy,
    backward_transfer,
    empty_matrix,
    forgetting,
    task_accuracies,
)
from fedsparse.continual.sparcl import EpochsResult, SparseHooks, train_epochs
from fedsparse.continual.streams import TaskStream, class_order
from fedsparse.continual.tdm import TDMSchedule, tdm_update

__all__ = [
    "DERPP",
    "DataRemoval",
    "EpochsResult",
    "GradientMasking",
    "Learner",
    "Naive",
    "Replay",
    "ReservoirBuffer",
    "SparseHooks",
    "Step",
    "StepHooks",
    "TDMSchedule",
    "TaskStream",
    "average_accuracy",
    "backward_transfer",
    "class_order",
    "empty_matrix",
    "forgetting",
    "removal_counts",
    "task_accuracies",
    "tdm_update",
    "train_epochs",
]
