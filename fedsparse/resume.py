"""What ``fedsparse run --resume RUN_DIR`` may change, decided before anything starts.

A resumed run is the same experiment continued: its scenario is the run folder's
``scenario.toml``, and an override may change only what enters no computation of the rounds:
the number of rounds (raised, never below those finished), how long the server waits for
nodes, replies and MLflow, the CPUs Ray gives the clients and the Ray cluster they run on.
Anything else (a learning rate, the seed, the model) would make the rounds after the resume
those of another experiment, so it is refused naming the key. These keys are MLflow tags,
not params, because they may change on resume and an MLflow param cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsparse.checkpoint import Checkpoint
from fedsparse.durable import CorruptFile
from fedsparse.scenario import Scenario, ScenarioError, load_scenario

RESUMABLE = ("run.rounds", "run.node_wait_s", "run.round_timeout_s", "run.client_cpus",
             "run.num_cpus", "run.ray_address", "tracking.flush_timeout_s")
SCENARIO_FILE = "scenario.toml"


@dataclass(frozen=True)
class Resume:
    """A run folder ready to continue: its scenario (with the allowed overrides) and the
    checkpoint it continues from."""

    run_dir: Path
    scenario: Scenario
    checkpoint: Checkpoint

    @property
    def finished(self) -> bool:
        """Whether the checkpoint already holds every round the scenario asks for."""
        return self.checkpoint.round >= self.scenario.run.rounds


def plan_resume(run_dir: Path, overrides: Sequence[str] = (),
                unset: Sequence[str] = ()) -> Resume:
    """The run in ``run_dir`` with ``overrides``; ScenarioError naming every key that a
    resume may not change (or a folder that cannot be resumed)."""
    source = str(run_dir)
    if not (run_dir / SCENARIO_FILE).is_file():
        raise ScenarioError(source, [f"not a run folder: no {SCENARIO_FILE}"])
    try:
        checkpoint = Checkpoint.load(run_dir)
    except FileNotFoundError:
        raise ScenarioError(source, ["no checkpoint: the run finished no round; start it "
                                     "afresh with fedsparse run FILE"]) from None
    except CorruptFile as err:
        raise ScenarioError(source, [f"cannot be resumed: {err}"]) from None
    before = load_scenario(run_dir / SCENARIO_FILE)
    after = load_scenario(run_dir / SCENARIO_FILE, overrides, unset)
    old, new = before.flat(), after.flat()
    allowed = ", ".join(RESUMABLE)
    problems = [f"{key} = {new.get(key)!r}: a resumed run keeps its scenario (it is "
                f"{old.get(key)!r}); --resume may change only {allowed}"
                for key in sorted(set(old) | set(new))
                if old.get(key) != new.get(key) and key not in RESUMABLE]
    if after.run.rounds < checkpoint.round:
        problems.append(f"run.rounds = {after.run.rounds}: the run has finished "
                        f"{checkpoint.round} rounds; --resume can only raise run.rounds")
    if problems:
        raise ScenarioError(f"--resume {source}", problems)
    return Resume(run_dir, after, checkpoint)
