"""Fault injection on the Ray Simulation Engine, through the CLI, under a real round timeout:
20 rounds of FedAvg and of SCAFFOLD (with its audit) on tests/data/digits.toml, with 20% of
every client call crashing, 20% hanging past the round, 20% replying corrupted and 20%
finding its node unreachable (80% in all; the probabilities of one call sum to at most 1).

Every client serves its calls in its own Ray actor (``run.num_cpus`` = the clients), so a
hung client holds up only itself, as a device would; every other reply comes within the
2 s round timeout. What must hold: the run ends; every round either counts or is skipped
by the minimums; every client call in ``clients.csv`` has exactly the status its seeded draw
says (``clients.faults.draw``), with its reason; no exception escapes a reply check; c =
mean c_i after every round; and every process the run started is gone.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from clients.faults import RECORDED_AS, draw, recorded_as
from fedsparse.scenario import parse_scenario
from fedsparse.tracking.history import read_csv
from tests.conftest import digits_scenario
from tests.test_hostile_replies import REASONS, stale_reason
from tests.test_simulation import fedsparse, flower_processes

pytestmark = pytest.mark.simulation

ROUNDS, TIMEOUT_S = 20, 2.0
FAULTS = {"crash": 0.2, "hang": 0.2, "corrupt": 0.2, "unavailable": 0.2}
SCAFFOLD = {"strategy": {"name": "scaffold", "audit": True}}


def scenario_text(strategy: dict) -> str:
    text = digits_scenario(
        strategy={"fraction_train": 1.0, **strategy},
        run={"rounds": ROUNDS, "round_timeout_s": TIMEOUT_S, "num_cpus": 6}, faults=FAULTS)
    if strategy.get("name") == "scaffold":
        text = text.replace('program = "sgd"', 'program = "controlled_sgd"').replace(
            "local_epochs = 3", "local_steps = 5")
    return text


@pytest.mark.parametrize("strategy", [{}, SCAFFOLD["strategy"]], ids=["fedavg", "scaffold"])
def test_every_fault_is_recorded_as_drawn_and_the_run_goes_on(workdir: Path, strategy: dict):
    text = scenario_text(strategy)
    scenario = parse_scenario(text)
    (workdir / "faults.toml").write_text(text)
    expected = {(r, phase, pid): draw(scenario.faults, pid, r, phase)
                for r in range(1, ROUNDS + 1) for phase in ("train", "evaluate")
                for pid in range(6)}
    counted = {r: any(expected[r, "train", pid] is None for pid in range(6))
               for r in range(1, ROUNDS + 1)}
    failure = scenario.run.verdict(ROUNDS, sum(not c for c in counted.values()))
    assert failure == ""  # this draw lets enough rounds count: the run must succeed

    assert fedsparse("run", "faults.toml", "--run-dir", "runs/f", "--summary", "f.json",
                     "--quiet") == 0
    assert not flower_processes(workdir)  # the hung clients' actors included

    clients = read_csv(workdir / "runs/f/clients.csv")
    assert [(c["round"], c["phase"], c["partition_id"]) for c in clients] == list(expected)
    for c in clients:
        fault = expected[c["round"], c["phase"], c["partition_id"]]
        assert c["status"] == recorded_as(fault), c
        where = f"({c['phase']}, round {c['round']}, client {c['partition_id']})"
        kind = fault.kind if fault else None
        if kind == "crash":
            assert f"fault injection: crash {where}" in c.get("reason", "")
        elif kind == "unavailable":
            assert c.get("reason", "") == f"fault injection: node unavailable {where}"
        elif kind == "hang":
            assert c.get("reason", "") == "no reply before the round timeout"
        elif kind == "corrupt":
            pattern = stale_reason(c["round"]) if fault.corruption == "round_stale" \
                else REASONS.get(fault.corruption, ".")
            assert re.search(pattern, c.get("reason", "")), (fault, c.get("reason", ""))
        else:
            assert c.get("reason", "") == ""
    statuses = Counter(c["status"] for c in clients)
    assert statuses == Counter(recorded_as(f) for f in expected.values())
    assert set(statuses) == {"ok", *RECORDED_AS.values()}

    rows = read_csv(workdir / "runs/f/metrics.csv")
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert [r["round_counted"] for r in rows] == [int(counted[r]) for r in counted]
    for row in rows:
        train = [c for c in clients if c["round"] == row["round"] and c["phase"] == "train"]
        assert row["clients_ok"] == sum(c["status"] == "ok" for c in train)
        assert row["clients_rejected"] == sum(c["status"] == "rejected" for c in train)
        assert row["clients_failed"] == sum(c["status"] in ("failed", "unavailable",
                                                            "no-reply") for c in train)
        if strategy:  # c = mean c_i after every round: every client answered the audit
            assert row["audit_clients_answered"] == 6 and row["audit_control_gap"] < 1e-6

    summary = json.loads((workdir / "f.json").read_text())
    assert summary["failure"] == "" and summary["rounds_failed"] == ROUNDS - sum(counted.values())
    assert summary["replies_dropped"] == sum(c["status"] != "ok" for c in clients)
    assert "reply check raised" not in (workdir / "runs/f/flower.log").read_text()
