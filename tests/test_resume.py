"""Exact resume of every method: the real ServerApp (strategies/server_app.py) killed at a seeded
point and resumed from its run folder ends with the same per-round metrics, per-client rows
and final weights, bit for bit, as an uninterrupted run.

The federation runs in this process on an in-process grid (no Ray): a kill is an exception
nothing in fedsparse catches as a client failure, raised mid-round (after some clients have
trained the round and saved their state) or after a round's checkpoint but before it was
tracked. The resumed run gets a fresh grid (empty Flower contexts, as a new Flower run has)
over the same client state folder, and the fedsparse run id the checkpoint holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Message
from safetensors.numpy import load_file

from fedsparse.checkpoint import Checkpoint
from fedsparse.scenario import parse_scenario
from fedsparse.tracking.history import read_csv
from strategies import server_app
from tests.conftest import DATA, digits_scenario
from tests.local_grid import serve

pytestmark = pytest.mark.usefixtures("flower_task")

TIMING = {"round_s", "train_s"}


class Killed(BaseException):
    """The process died here (not an Exception: nothing may treat it as a client failure)."""


@dataclass(frozen=True)
class KillPoint:
    round: int
    where: str  # "mid-round": at the n-th train reply; "after-checkpoint": before tracking
    reply: int = 2


def controlled(strategy: str, extra: str = "") -> str:
    return digits_scenario(run={"rounds": 4, "eval_every": 2}).replace(
        'program = "sgd"', 'program = "controlled_sgd"').replace(
        "local_epochs = 3", "local_steps = 4").replace('name = "fedavg"', strategy) + extra


SCENARIOS = {
    "fedavg": digits_scenario(run={"rounds": 4, "eval_every": 2}),
    "scaffold": controlled('name = "scaffold"'),
    "scafcom-topk": controlled('name = "scafcom"\nbeta = 0.3', '[strategy.compressor]\n'
                               'name = "topk"\nratio = 0.05\nvalue_dtype = "float16"\n'),
    "scallion-randk": controlled('name = "scallion"\nalpha = 0.1', '[strategy.compressor]\n'
                                 'name = "randk"\nratio = 0.1\n'),
    "fedavg-ef-downlink": digits_scenario(run={"rounds": 4, "eval_every": 2}).replace(
        'program = "sgd"', 'program = "compressed_sgd"').replace(
        'name = "fedavg"', 'name = "fedavg_ef"') + '[strategy.compressor]\nname = "topk"\n'
        'ratio = 0.1\n[strategy.downlink]\nname = "topk"\nratio = 0.2\n',
    "pfedgate": (DATA / "pfedgate_digits.toml").read_text().replace(
        "rounds = 3", "rounds = 4").replace("eval_every = 3", "eval_every = 2"),
    "sparcl-derpp": (DATA / "continual_digits.toml").read_text().replace(
        "num_tasks = 5", "num_tasks = 2").replace("rounds = 15", "rounds = 6"),
    "flasc-ef": (DATA / "lora_tiny.toml").read_text().replace(
        "rounds = 2", "rounds = 3").replace("eval_every = 2", "eval_every = 3").replace(
        'name = "flasc"', 'name = "flasc"\nerror_feedback = true'),
}

CASES = [
    ("fedavg", KillPoint(3, "mid-round")),
    ("scaffold", KillPoint(3, "mid-round")),
    ("scaffold", KillPoint(2, "after-checkpoint")),
    ("scafcom-topk", KillPoint(3, "mid-round", reply=1)),
    ("scallion-randk", KillPoint(2, "after-checkpoint")),
    ("fedavg-ef-downlink", KillPoint(3, "mid-round")),
    ("pfedgate", KillPoint(3, "mid-round")),
    ("sparcl-derpp", KillPoint(5, "mid-round")),  # mid-task: task 1 is rounds 4-6
    ("sparcl-derpp", KillPoint(3, "after-checkpoint")),  # at the task boundary
    ("flasc-ef", KillPoint(2, "mid-round", reply=1)),
]


def serve_killable(text: str, run_dir: Path, workdir: Path, resume: bool = False,
                   kill: KillPoint | None = None,
                   monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """:func:`serve`, killed at ``kill``."""
    replies = []

    def tamper(message: Message, reply: Message) -> Message:
        config_record = message.content.config_records.get("config")
        if kill is not None and kill.where == "mid-round" and config_record is not None \
                and config_record.get("server-round") == kill.round \
                and message.metadata.message_type == "train":
            replies.append(reply)
            if len(replies) == kill.reply:
                raise Killed
        return reply

    if kill is not None and kill.where == "after-checkpoint":
        original = server_app.BackgroundMirror.round_done

        def round_done(self, server_round):
            if server_round == kill.round:
                raise Killed
            original(self, server_round)

        monkeypatch.setattr(server_app.BackgroundMirror, "round_done", round_done)
    serve(text, run_dir, workdir, resume=resume, tamper=tamper)


def deterministic(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_csv(path)]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "kill"), CASES, ids=[f"{m}-{k.where}-r{k.round}"
                                                          for m, k in CASES])
def test_a_killed_run_resumes_exactly(method, kill, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = SCENARIOS[method]
    serve(text, tmp_path / "reference", tmp_path)
    with pytest.raises(Killed):
        serve_killable(text, tmp_path / "killed", tmp_path, kill=kill, monkeypatch=monkeypatch)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    done = Checkpoint.load(tmp_path / "killed").round
    assert done == (kill.round - 1 if kill.where == "mid-round" else kill.round)
    serve(text, tmp_path / "killed", tmp_path, resume=True)
    for name in ("metrics.csv", "clients.csv"):
        assert deterministic(tmp_path / "killed" / name) == \
            deterministic(tmp_path / "reference" / name), name
    final, reference = (load_file(tmp_path / run / "model.safetensors")
                        for run in ("killed", "reference"))
    assert final.keys() == reference.keys()
    for key in reference:
        assert final[key].tobytes() == reference[key].tobytes(), key
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["rounds"] == parse_scenario(text).run.rounds


@pytest.mark.parametrize("method", sorted(SCENARIOS))
def test_every_strategy_state_survives_a_checkpoint_round_trip(method, tmp_path):
    """What a strategy checkpoints (``state_arrays``) restores a fresh one to the same state,
    commit rounds and public model included."""
    import numpy as np

    from fedsparse.checkpoint import Checkpoint
    from strategies.loop import LoopState
    from strategies.server_app import build_strategy
    from tests.local_grid import run_federation

    scenario = parse_scenario(SCENARIOS[method])
    if scenario.continual is None:  # two rounds are enough (a continual run has its tasks')
        scenario = parse_scenario(SCENARIOS[method], ["run.rounds=2"])
    federation = run_federation(scenario)
    federation.state.checkpoint(federation.strategy, {}).save(tmp_path)
    fresh = build_strategy(scenario)
    restored = LoopState.restore(Checkpoint.load(tmp_path), fresh)
    saved, loaded = federation.strategy.state_arrays(), fresh.state_arrays()
    assert saved.keys() == loaded.keys() and "commit/round" in saved
    for key in saved:
        np.testing.assert_array_equal(saved[key], loaded[key], err_msg=key)
    assert fresh.accepted_round == federation.strategy.accepted_round
    assert restored.next_round == scenario.run.rounds + 1
    assert restored.history == federation.state.history
