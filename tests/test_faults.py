"""Fault injection (``[faults]``, ``clients/faults.py``): the scenario section, the seeded draw,
and the injector in the real ClientApp on an in-process grid (no Ray; the same runs on Ray
under a real round timeout are tests/test_fault_injection.py)."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from clients import client_app
from clients.corruptions import CHANGES
from clients.faults import Fault, draw, recorded_as
from fedsparse.cli import main
from fedsparse.scenario import (
    CORRUPTIONS,
    FAULTS,
    REPLY_CORRUPTIONS,
    FaultSpec,
    ScenarioError,
    parse_scenario,
)
from strategies.server_app import initial_arrays
from tests.conftest import digits_scenario
from tests.local_grid import run_federation

pytestmark = pytest.mark.usefixtures("flower_task")

def with_faults(faults: dict, **sections: dict) -> str:
    return digits_scenario(faults=faults, **sections)


def problems(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text)
    return "\n".join(info.value.problems)


def expected_status(spec: FaultSpec, record) -> str:
    return recorded_as(draw(spec, record.partition_id, record.round, record.phase))


# -- the section ------------------------------------------------------------------------------

def test_faults_are_off_unless_the_section_is_there():
    assert parse_scenario(digits_scenario()).faults is None
    assert "faults.crash" not in parse_scenario(digits_scenario()).flat()


def test_the_faults_seed_defaults_to_the_scenarios_and_is_recorded():
    scenario = parse_scenario(with_faults({"crash": 0.1}))
    assert scenario.faults.seed == scenario.seed == 7
    assert scenario.flat()["faults.seed"] == 7
    assert parse_scenario(scenario.to_toml()) == scenario  # what ServerApp and clients parse
    assert parse_scenario(with_faults({"crash": 0.1, "seed": 3})).faults.seed == 3
    spec = scenario.faults
    assert (spec.hang, spec.hang_extra_s, spec.corruptions) == (0.0, 0.5, list(CORRUPTIONS))


@pytest.mark.parametrize(("faults", "expected"), [
    ({"crash": 1.5}, "faults.crash = 1.5: Input should be less than or equal to 1"),
    ({"hang": -0.1}, "faults.hang = -0.1: Input should be greater than or equal to 0"),
    ({"crash": 0.5, "hang": 0.3, "corrupt": 0.2, "unavailable": 0.2},
     "faults: faults.crash + faults.hang + faults.corrupt + faults.unavailable = 1.2 (crash = "
     "0.5, hang = 0.3, corrupt = 0.2, unavailable = 0.2): a call has at most one fault, so "
     "these probabilities sum to at most 1"),
    ({"hang_extra_s": 0}, "faults.hang_extra_s = 0: Input should be greater than 0"),
    ({"seed": -1}, "faults.seed = -1: Input should be greater than or equal to 0"),
    ({"corruptions": ["bogus"]}, "faults.corruptions.0 = 'bogus': Input should be "
                                 "'num_examples_nan', 'num_examples_inf'"),
    ({"corruptions": []}, "faults.corruptions = []: List should have at least 1 item"),
    ({"corruptions": ["values_nan", "round_stale", "values_nan"]},
     "faults.corruptions = ['values_nan', 'round_stale', 'values_nan']: lists 'values_nan' "
     "more than once; each kind is drawn with the same probability, so list it once"),
    ({"corruptions": ["values_nan", "bytes_empty"]},
     "faults.corruptions = ['values_nan', 'bytes_empty']: an evaluate reply carries no "
     "arrays: list at least one kind that applies to any reply (num_examples_nan, "),
    ({"probability": 0.1}, "faults.probability: unknown key (allowed in [faults]: seed, crash, "
                           "hang, corrupt, unavailable, hang_extra_s, corruptions)"),
])
def test_bad_faults_name_the_key_the_value_and_what_is_allowed(faults, expected):
    assert expected in problems(with_faults(faults))


def test_probabilities_may_sum_to_exactly_one():
    spec = parse_scenario(with_faults({k: 0.25 for k in FAULTS})).faults
    assert sum(getattr(spec, k) for k in FAULTS) == 1.0


def test_the_corruption_kinds_are_one_list():
    assert set(CHANGES) == set(CORRUPTIONS) and len(CORRUPTIONS) == len(set(CORRUPTIONS))


# -- the draw ---------------------------------------------------------------------------------

CALLS = [(pid, rnd, phase) for pid in range(50) for rnd in range(1, 101)
         for phase in ("train", "evaluate")]


def spec(**probabilities: float) -> FaultSpec:
    return parse_scenario(with_faults(probabilities)).faults


def test_the_draw_is_reproducible_and_depends_on_every_part_of_the_call():
    s = spec(crash=0.2, hang=0.2, corrupt=0.2, unavailable=0.2)
    draws = [draw(s, *call) for call in CALLS]
    assert draws == [draw(s, *call) for call in CALLS]
    other_seed = s.model_copy(update={"seed": 8})
    assert draws != [draw(other_seed, *call) for call in CALLS]
    for shifted in ([(p + 1, r, ph) for p, r, ph in CALLS], [(p, r + 1, ph) for p, r, ph in CALLS],
                    [(p, r, "evaluate" if ph == "train" else "train") for p, r, ph in CALLS]):
        assert draws != [draw(s, *call) for call in shifted]


def test_fault_frequencies_follow_the_probabilities():
    s = spec(crash=0.1, hang=0.2, corrupt=0.3, unavailable=0.15)
    counts = Counter(f.kind if f else None for f in (draw(s, *call) for call in CALLS))
    n = len(CALLS)
    for kind, p in (("crash", 0.1), ("hang", 0.2), ("corrupt", 0.3), ("unavailable", 0.15),
                    (None, 0.25)):
        assert abs(counts[kind] - p * n) < 4 * (p * (1 - p) * n) ** 0.5, (kind, counts)


def test_every_kind_is_drawn_and_evaluate_replies_get_only_reply_kinds():
    s = spec(corrupt=1.0)
    train = Counter(draw(s, p, r, "train").corruption for p, r, _ in CALLS[::2])
    evaluate = Counter(draw(s, p, r, "evaluate").corruption for p, r, _ in CALLS[::2])
    assert set(train) == set(CORRUPTIONS)
    assert set(evaluate) == set(REPLY_CORRUPTIONS)
    one = parse_scenario(with_faults({"corrupt": 1.0, "corruptions": ["round_stale"]})).faults
    assert {draw(one, *call) for call in CALLS} == {Fault("corrupt", "round_stale")}


def test_no_probability_no_fault_and_a_sum_of_one_always_one():
    assert {draw(spec(), *call) for call in CALLS} == {None}
    always = spec(crash=0.5, unavailable=0.5)
    assert {draw(always, *call).kind for call in CALLS} == {"crash", "unavailable"}


# -- the injector in the ClientApp --------------------------------------------------------------

def test_crashes_corruptions_and_unreachable_nodes_are_recorded_as_drawn():
    """Every client call's status is the one its draw says; the queries of discovery are
    never faulted (every node identified itself)."""
    scenario = parse_scenario(with_faults({"crash": 0.25, "corrupt": 0.25, "unavailable": 0.25},
                                          run={"rounds": 6}))
    f = run_federation(scenario)
    records = f.records
    assert len(records) == 6 * (3 + 6)
    assert [r.status for r in records] == [expected_status(scenario.faults, r) for r in records]
    assert {r.status for r in records} == {"ok", "failed", "rejected", "unavailable"}
    for r in records:
        where = f"({r.phase}, round {r.round}, client {r.partition_id})"
        if r.status == "failed":
            assert r.reason == f"InjectedCrash('fault injection: crash {where}')"
        elif r.status == "unavailable":
            assert r.reason == f"fault injection: node unavailable {where}"
    for row in f.rows:
        mine = [r for r in records if r.round == row["round"] and r.phase == "train"]
        assert row["clients_failed"] == sum(r.status in ("failed", "unavailable") for r in mine)
        assert row["clients_rejected"] == sum(r.status == "rejected" for r in mine)
        assert row["round_counted"] == int(any(r.status == "ok" for r in mine))


def test_an_unreachable_node_replies_with_flowers_node_unavailable():
    scenario = parse_scenario(with_faults({"unavailable": 1.0}, run={"rounds": 1}))
    f = run_federation(scenario)
    errors = [m for m in f.grid.received if m.has_error()]
    assert len(errors) == 3 + 6  # every train and evaluate call; the queries answered
    assert {m.error.code for m in errors} == {ErrorCode.NODE_UNAVAILABLE}
    assert f.rows[0]["clients_failed"] == 3 and f.rows[0]["round_counted"] == 0


def test_a_corrupted_reply_leaves_the_saved_state_uncommitted_and_c_the_mean_of_c_i():
    """SCAFFOLD with audit: a corrupted reply is made after the client saved the state that
    holds if the round counts; the server rejects it, so the client's commit round does not
    move, and c = mean c_i holds after every round (the audit's queries are never faulted)."""
    text = with_faults({"corrupt": 0.5, "crash": 0.2},
                       strategy={"name": "scaffold", "audit": True}, run={"rounds": 5})
    text = text.replace('program = "sgd"', 'program = "controlled_sgd"').replace(
        "local_epochs = 3", "local_steps = 5")
    scenario = parse_scenario(text)
    saved_but_not_committed = []

    def check(server_round: int, f) -> None:
        c_i = [f.grid.client_state(p, f.strategy.accepted_round.get(p, 0)).get(
            "control", {}).get("c_i", np.zeros_like(f.strategy.c)) for p in range(6)]
        np.testing.assert_allclose(f.strategy.c, np.mean(c_i, axis=0), atol=1e-6)
        for r in f.records:
            if r.round == server_round and r.phase == "train" and r.status == "rejected":
                store = f.grid.state_dir / "local-grid-run" / str(r.partition_id)
                assert (store / f"round-{server_round:08d}.npz").is_file()
                assert f.strategy.accepted_round.get(r.partition_id, 0) < server_round
                saved_but_not_committed.append(r.partition_id)

    f = run_federation(scenario, on_round=check)
    records = f.records
    assert [r.status for r in records] == [expected_status(scenario.faults, r) for r in records]
    assert saved_but_not_committed
    assert all(row["audit_clients_answered"] == 6 for row in f.rows)
    assert all(row["audit_control_gap"] < 1e-6 for row in f.rows)
    assert any(row["round_counted"] for row in f.rows)


def test_a_hung_client_replies_normally_after_the_round_timeout_and_extra(tmp_path: Path):
    scenario = parse_scenario(with_faults({"hang": 1.0, "hang_extra_s": 0.2},
                                          run={"round_timeout_s": 0.3}))
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={
        "scenario": scenario.to_toml(), "client-state-dir": str(tmp_path),
        "fedsparse-run-id": "hang"},
        node_config={"partition-id": 2, "num-partitions": 6})
    instruction = Message(RecordDict({"arrays": initial_arrays(scenario), "config": ConfigRecord(
        {"server-round": 1, "partition-id": 2})}), dst_node_id=1,
        message_type=MessageType.EVALUATE)
    started = time.perf_counter()
    reply = client_app.evaluate(instruction, context)
    assert time.perf_counter() - started >= 0.5
    assert not reply.has_error() and reply.content.metric_records["metrics"]["server-round"] == 1


# -- simulation only ----------------------------------------------------------------------------

def test_a_run_on_a_superlink_refuses_faults(workdir: Path, capsys):
    path = workdir / "faults.toml"
    path.write_text(with_faults({"crash": 0.1}))
    assert main(["run", str(path), "--superlink", "127.0.0.1:9"]) == 2
    assert main(["compare", str(path), str(path), "--superlink", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "invalid scenario for --superlink 127.0.0.1:9:\n  - faults: fault injection runs in " \
           "simulation only, not on a SuperLink; remove the [faults] section (or --unset " \
           "faults) to run this scenario on devices" in err
    assert f"invalid scenario {path}:\n  - faults: fault injection runs in simulation" in err
    assert not (workdir / "runs").exists() and not (workdir / "mlflow.db").exists()


def test_the_serverapp_refuses_faults_in_deployment(tmp_path: Path):
    from strategies.server_app import main as server_main

    context = Context(run_id=1, node_id=0, state=RecordDict(), node_config={}, run_config={
        "scenario": parse_scenario(with_faults({"hang": 0.1})).to_toml(),
        "federation": "deployment", "out-dir": str(tmp_path / "out")})
    stdout = io.StringIO()
    with redirect_stdout(stdout), pytest.raises(ScenarioError, match="simulation only"):
        server_main(None, context)
    event = json.loads(stdout.getvalue().removeprefix("@@fedsparse "))
    assert event["event"] == "error" and "faults: fault injection runs" in event["message"]
    assert not (tmp_path / "out").exists()  # refused before anything was written
