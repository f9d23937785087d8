"""The contract between the fedsparse ServerApp and ClientApp, in one place.

Record keys inside Flower messages, the keys of Flower's run config that carry a run's
settings, and how seeds are derived so that a run is reproducible whatever Flower's node
ids and reply order are (see ../shared/FLOWER.md, pitfall 8).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from fedsparse.payload import MetricSpec

# Records in a message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: the model (down) or the client's result (up)
UPDATE = "update"  # ArrayRecord: a compressed update (payload arrays of fedsparse.compress)
CONTROL = "control"  # ArrayRecord: the global control variate c (SCAFFOLD family)
MODEL_SYNC = "model-sync"  # ArrayRecord: the public model, whole or changed coordinates
                           # (replaces ARRAYS in train instructions with a compressed downlink)
SIGNAL = "signal"  # ArrayRecord: what a client measured for the server's next mask update
FROZEN = "frozen"  # ArrayRecord: coded positions whose gradients a client must zero
ADAPTER = "adapter"  # ArrayRecord: the LoRA adapter vector over the download mask (FLASC)
GATES = "gates"  # ArrayRecord: SoRA's gates of the alive ranks, dense
RANKS = "ranks"  # ArrayRecord: SoRA's alive ranks, a packed bitmap over all modules
CONFIG = "config"  # ConfigRecord: server -> client instructions
METRICS = "metrics"  # MetricRecord: client -> server measurements

# Keys of the ConfigRecord sent with every instruction.
SERVER_ROUND = "server-round"
QUERY = "query"  # in a QUERY message: what the server asks ("" = which partition are you)
# The last round in which the server counted this client's update (0: never), in every
# instruction: the client starts from the state it saved in that round, so a state change
# that went with an update (a control variate step, a residual, a replay buffer) holds only
# once the server has counted it: two-phase commit (fedsparse/client_state.py).
COMMIT_ROUND = "commit-round"
# What the server's next mask update needs from a client (strategies/sparse_fedavg.py):
# "none", "grad" (last minibatch gradient at the mask), "grad-dense", "momentum-dense".
SIGNAL_KIND = "signal-kind"
# In an evaluate instruction: minibatches a client adapts its personal part (pFedGate's gating
# layer) on its training split before it is evaluated: a novel client joining at the end.
ADAPT_STEPS = "adapt-steps"
# FLASC (strategies/flasc.py): this round's densities, value precisions (download, upload),
# error feedback, SoRA threshold and its rule, and how top-k counts k, which the server decides.
DOWN_DENSITY, UP_DENSITY = "down-density", "up-density"
VALUE_DTYPE, UP_VALUE_DTYPE = "value-dtype", "up-value-dtype"
ERROR_FEEDBACK, SORA_THRESHOLD = "error-feedback", "sora-threshold"
SORA_RULE, TOPK_COUNT = "sora-threshold-rule", "topk-count"

# Keys of the MetricRecords sent back.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

_COUNT, _SHARE = MetricSpec(integer=True), MetricSpec(high=1.0)
# Every metric a train or evaluate reply may carry, and its range: the server rejects a reply
# with any other key, a list, a value that is not finite or one out of range. A client program
# that reports a new metric declares it here. (num-examples is bounded further by the server:
# at most the examples the client holds.) SERVER_ROUND echoes the instruction's round.
REPLY_METRICS: dict[str, MetricSpec] = {
    NUM_EXAMPLES: MetricSpec(low=1, integer=True),
    SERVER_ROUND: MetricSpec(low=1, integer=True),
    "train-loss": MetricSpec(), "train-steps": _COUNT, "train-examples": _COUNT,
    "train-flops": _COUNT, "train-dense-flops": _COUNT, "train-s": MetricSpec(),
    "eval-loss": MetricSpec(), "eval-acc": _SHARE, "eval-density": _SHARE,
    "budget": _SHARE, "density": _SHARE, "active-density": _SHARE,
    "weight-density": _SHARE, "grad-density": _SHARE,
    "examples-removed": _COUNT, "examples-remaining": _COUNT,
}

# Flower run config ([tool.flwr.app.config]) keys: what `fedsparse run` passes to `flwr run`.
RUN_CONFIG_DEFAULTS: dict[str, str] = {
    "scenario": "",  # the validated scenario as TOML text
    "out-dir": "",  # where the ServerApp writes checkpoints, CSV and plots ("" = a temp dir)
    "resume-from": "",  # a run directory to resume from ("" = fresh run)
    "tracking-uri": "",  # MLflow tracking URI ("" = MLflow's own default)
    "artifact-location": "",  # MLflow artifact root for a new experiment ("" = server default)
    "parent-run-id": "",  # MLflow run of a `fedsparse compare`, if any
    "run-name": "",  # MLflow run name
    "command-line": "",  # the fedsparse command that started the run (an MLflow tag)
    "system-metrics-s": "10",  # seconds between system metrics samples ("0": none)
    "federation": "simulation",  # or "deployment": the server cannot know the clients' data
    "fedsparse-run-id": "",  # fedsparse's id of the run, kept on resume (client state keys)
    "client-state-dir": "",  # where clients keep their state ("" = the node's own folder)
    "cli-started-at": "",  # time.time() when this session's `fedsparse run` started
    "prior-total-wall-s": "0",  # the command time of a resumed run's earlier sessions
}


def run_setting(run_config: Mapping[str, Any], key: str) -> str:
    """A fedsparse setting from Flower's run config (defaults to ``RUN_CONFIG_DEFAULTS``)."""
    return str(run_config.get(key, RUN_CONFIG_DEFAULTS[key]))


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. scenario seed, partition, round)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
