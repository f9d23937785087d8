"""Scenario files: valid ones load, bad ones are rejected with key, value and what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsparse.cli import main
from fedsparse.scenario import ScenarioError, apply_overrides, load_scenario, parse_scenario
from tests.conftest import DATA, REPO, digits_scenario, shipped_scenarios


def problems(text: str, overrides: list[str] = ()) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, overrides)
    return "\n".join(info.value.problems)


def test_every_shipped_scenario_is_valid():
    """Strict types included: every shipped file validates, and its TOML round trip (what the
    ServerApp and ClientApps parse) gives the same scenario."""
    files = shipped_scenarios()
    assert len(files) >= 49
    for path in files:
        scenario = load_scenario(path)
        assert parse_scenario(scenario.to_toml()) == scenario  # TOML round trip is exact


def test_defaults_are_filled_and_recorded():
    scenario = parse_scenario(digits_scenario())
    flat = scenario.flat()
    assert flat["client.momentum"] == 0.0
    assert flat["run.backend"] == "ray"
    assert flat["model.hidden"] == "[32]"
    assert flat["strategy.name"] == "fedavg"
    assert "data.shards_per_client" not in flat  # unset, not applicable to dirichlet


def test_unknown_keys_are_rejected_with_the_allowed_keys():
    text = digits_scenario(data={"num_client": 3}) + "\nbogus = 1\n"
    msg = problems(text)
    assert "data.num_client: unknown key" in msg
    assert "num_clients" in msg.split("data.num_client")[1]  # the allowed keys are listed
    assert "bogus: unknown key" in msg


def test_unknown_key_in_a_plugin_section_lists_that_plugins_keys():
    msg = problems(digits_scenario(client={"learning_rate": 0.1}))
    assert "client.learning_rate: unknown key" in msg
    assert "local_steps" in msg and "batch_size" in msg


@pytest.mark.parametrize(("section", "values", "expected"), [
    ("data", {"dataset": "cifar10"}, "data.dataset = 'cifar10': Input should be 'mnist', "
                                     "'fashion_mnist', 'digits', 'chatterbot_en', "
                                     "'chatterbot' or 'synthetic'"),
    ("data", {"alpha": -1.0}, "data.alpha = -1.0: Input should be greater than 0"),
    ("data", {"partition": "iid"}, "data.alpha only applies to partition = 'dirichlet'"),
    ("data", {"partition": "shards"}, "partition = 'shards' needs data.shards_per_client"),
    ("data", {"num_clients": 0}, "data.num_clients = 0: Input should be greater than or equal"),
    ("strategy", {"name": "fedprox"}, "strategy: unknown strategy 'fedprox'; allowed: fedavg"),
    ("strategy", {"fraction_train": 1.5}, "strategy.fraction_train = 1.5: Input should be less"),
    ("client", {"program": "adam"}, "unknown client program 'adam'; allowed: "),
    ("client", {"local_steps": 10}, "give client.local_epochs or client.local_steps, not both"),
    ("model", {"name": "resnet"}, "unknown model 'resnet'; allowed: cnn, lora, mlp"),
    ("run", {"backend": "dask"}, "run.backend = 'dask': Input should be 'ray'"),
    ("run", {"rounds": "ten"}, "run.rounds = 'ten': Input should be a valid integer"),
])
def test_bad_values_name_key_value_and_allowed(section, values, expected):
    assert expected in problems(digits_scenario(**{section: values}))


def test_missing_name_and_invalid_toml():
    assert "name: required key is missing" in problems(digits_scenario().replace(
        'name = "digits-test"', ""))
    assert "not valid TOML" in problems("name = ")


def test_overrides_parse_toml_values_and_bare_words():
    tree = apply_overrides({"client": {"lr": 0.1}}, ["client.lr=0.01", "data.dataset=mnist",
                                                      "model.hidden=[10, 20]"])
    assert tree == {"client": {"lr": 0.01}, "data": {"dataset": "mnist"},
                    "model": {"hidden": [10, 20]}}
    scenario = parse_scenario(digits_scenario(), ["client.lr=0.01", "run.rounds=5"])
    assert scenario.client.lr == 0.01 and scenario.run.rounds == 5
    assert "client.lr = 'fast'" in problems(digits_scenario(), ["client.lr=fast"])
    with pytest.raises(ScenarioError, match="expected KEY=VALUE"):
        parse_scenario(digits_scenario(), ["client.lr"])


def test_cli_validate_reports_problems_and_exit_code(tmp_path: Path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(digits_scenario(data={"dataset": "svhn"}, run={"eval_every": 0}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "data.dataset = 'svhn'" in err and "run.eval_every = 0" in err
    assert main(["validate", str(DATA / "digits.toml"), "--set", "run.rounds=4"]) == 0
    assert "rounds = 4" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "missing.toml")]) == 2


def controlled(strategy: dict, client: dict | None = None) -> str:
    """The digits scenario with a SCAFFOLD-family strategy and its client program."""
    text = digits_scenario(strategy=strategy)
    return text.replace('program = "sgd"', 'program = "controlled_sgd"').replace(
        "local_epochs = 3", "local_steps = 10") + "".join(
        f"\n[client]\n{k} = {v}" for k, v in (client or {}).items())


def test_strategy_and_client_program_must_match():
    msg = problems(digits_scenario(strategy={"name": "scafcom"}))
    assert "strategy 'scafcom' runs with client.program = 'controlled_sgd', not 'sgd'" in msg
    assert "client.local_epochs: unknown key" in problems(
        controlled({"name": "scaffold"}).replace("local_steps = 10", "local_epochs = 1"))
    assert parse_scenario(controlled({"name": "scaffold"})).client.local_steps == 10


def test_scallion_rejects_a_biased_compressor():
    msg = problems(controlled({"name": "scallion", "compressor": {"name": "topk"}}))
    assert "SCALLION needs an unbiased compressor (identity, randk, qsgd), not 'topk'" in msg


@pytest.mark.parametrize(("file", "reason"), [
    ("personal/pfedgate_s05.toml", "pfedgate sends the dense base model"),
    ("lora/flasc_16.toml", "flasc sends the adapter over its own download mask"),
    ("continual/federated_sparcl.toml", "sparse_fedavg already sends only the mask's values"),
])
def test_a_strategy_with_its_own_downlink_rejects_downlink_compression(file, reason):
    with pytest.raises(ScenarioError) as info:
        load_scenario(REPO / "scenarios" / file, ['strategy.downlink.name="topk"'])
    assert f"strategy.downlink: {reason}" in "\n".join(info.value.problems)
    assert "leave downlink unset" in "\n".join(info.value.problems)


def test_error_feedback_needs_a_contractive_compressor_and_scallion_a_small_alpha():
    msg = problems(controlled({"name": "scafcom", "compressor": {"name": "randk"}}))
    assert "SCAFCOM needs a contractive compressor (identity, topk, sign), not 'randk'" in msg
    msg = problems(digits_scenario(strategy={"name": "fedavg",
                                             "downlink": {"name": "qsgd", "levels": 4}}))
    assert "strategy.downlink" in msg and "contractive compressor" in msg and "'qsgd'" in msg
    msg = problems(controlled({"name": "scallion", "alpha": 0.2,
                               "compressor": {"name": "randk", "ratio": 0.1}}))
    assert "strategy.alpha = 0.2 exceeds 1/(1+omega) = 0.1 of rand-k at ratio 0.1" in msg
    assert parse_scenario(controlled({"name": "scallion"})).strategy.alpha == 0.01  # default
    msg = problems(controlled({"name": "scafcom", "compressor": {"name": "topk", "ratio": 0}}))
    assert "strategy.compressor.topk.ratio = 0: Input should be greater than 0" in msg


def test_compressor_sections_are_validated():
    msg = problems(controlled({"name": "scafcom",
                               "compressor": {"name": "topk", "ratio": 2.0, "bits": 3}}))
    assert "strategy.compressor.topk.ratio = 2.0: Input should be less than or equal to 1" in msg
    assert "strategy.compressor.topk.bits: unknown key" in msg
    msg = problems(controlled({"name": "scafcom", "compressor": {"name": "zip"}}))
    assert "strategy.compressor" in msg and "'identity', 'topk', 'randk', 'qsgd', 'sign'" in msg
    assert "strategy.beta: unknown key" in problems(controlled({"name": "scaffold", "beta": 1}))


def test_unknown_nested_key_lists_the_nested_sections_keys():
    msg = problems(controlled({"name": "scafcom", "compressor": {"name": "topk", "bits": 3}}))
    assert ("(allowed in [strategy.compressor.topk]: name, value_dtype, ratio, scope, "
            "k_count)") in msg


def test_extends_merges_sections_and_detects_cycles(tmp_path: Path):
    (tmp_path / "base.toml").write_text(digits_scenario())
    (tmp_path / "arm.toml").write_text('extends = "base.toml"\nname = "arm"\n'
                                       '[client]\nlr = 0.5\n')
    scenario = load_scenario(tmp_path / "arm.toml", ["run.rounds=9"])
    assert scenario.name == "arm" and scenario.client.lr == 0.5
    assert scenario.client.batch_size == 16 and scenario.run.rounds == 9  # from the base
    assert scenario.data.alpha == 1.0
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ScenarioError, match="a cycle"):
        load_scenario(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(ScenarioError, match="file not found"):
        load_scenario(tmp_path / "c.toml")


def refused(args: list[str], capsys) -> list[str]:
    """``fedsparse ARGS`` exits with code 2; the problem lines it printed."""
    assert main(args) == 2
    return [line.removeprefix("  - ") for line in capsys.readouterr().err.splitlines()
            if line.startswith("  - ")]


@pytest.mark.parametrize(("override", "line"), [
    ("client.lr=inf", "client.lr = inf: Input should be a finite number"),
    ("client.lr=nan", "client.lr = nan: Input should be a finite number"),
    ("data.test_fraction=-inf", "data.test_fraction = -inf: Input should be a finite number"),
    ("client.lr=true", "client.lr = True: Input should be a valid number"),
    ("run.rounds=true", "run.rounds = True: Input should be a valid integer"),
    ("run.rounds=2.0", "run.rounds = 2.0: Input should be a valid integer"),
    ('run.rounds="2"', "run.rounds = '2': Input should be a valid integer"),
    ("model.hidden=[-5]", "model.hidden.0 = -5: Input should be greater than 0"),
    ("model.hidden=[8, 0]", "model.hidden.1 = 0: Input should be greater than 0"),
])
def test_numbers_are_finite_and_types_strict(override, line, capsys):
    assert refused(["validate", str(DATA / "digits.toml"), "--set", override], capsys) == [line]


@pytest.mark.parametrize(("override", "line"), [
    ("model.channels=[4, 0]", "model.channels.1 = 0: Input should be greater than 0"),
    ("model.hidden=[-1]", "model.hidden.0 = -1: Input should be greater than 0"),
    ("client.budget=nan", "client.budget.number = nan: Input should be a finite number"),
    ('client.budget="x"', "client.budget.number = 'x': Input should be a valid number"),
    ("client.budget=[0.5, nan]", "client.budget.list.1 = nan: Input should be a finite number"),
    ("client.budget={levels = [0.5, inf]}",
     "client.budget.table.levels.1 = inf: Input should be a finite number"),
    ("client.budget={levels = [0.5], bogus = 1}",
     "client.budget.table.bogus: unknown key (allowed in [client.budget.table]: levels, weights)"),
])
def test_cnn_sizes_and_pfedgate_budgets_are_checked_at_validation(override, line, capsys):
    """pFedGate's budget is one number, a list or a table: a bad one gets one error."""
    assert refused(["validate", str(DATA / "pfedgate_digits.toml"), "--set", override],
                   capsys) == [line]


def test_strict_types_still_take_an_int_for_a_float_and_every_budget_form():
    assert parse_scenario(digits_scenario(), ["client.lr=1"]).client.lr == 1.0
    text = (DATA / "pfedgate_digits.toml").read_text()
    for budget, expected in [("1", 1.0), ("[0.5, 1, 0.5, 1, 0.5, 1]", [0.5, 1.0] * 3)]:
        scenario = parse_scenario(text, [f"client.budget={budget}"])
        assert scenario.client.budget == expected
        assert parse_scenario(scenario.to_toml()) == scenario
    levels = parse_scenario(text, ["client.budget={levels = [0.5, 1], weights = [1, 3]}"])
    assert levels.client.budget.weights == [1.0, 3.0]
    assert parse_scenario(levels.to_toml()) == levels


@pytest.mark.parametrize("target", ['"."', '"sub.toml"', '"/abs/base.toml"', '"base.txt"',
                                    '""', "3"])
def test_extends_names_a_relative_toml_file(target, tmp_path: Path, capsys):
    (tmp_path / "sub.toml").mkdir()
    (tmp_path / "arm.toml").write_text(f"extends = {target}\n")
    value = repr(tomllib.loads(f"v = {target}")["v"])
    assert refused(["validate", str(tmp_path / "arm.toml")], capsys) == [
        f"extends = {value}: an extends target must be a relative path to a .toml file"]


def test_extends_of_a_missing_file_names_the_resolved_path(tmp_path: Path, capsys):
    (tmp_path / "arm.toml").write_text('extends = "../gone/base.toml"\n')
    assert refused(["validate", str(tmp_path / "arm.toml")], capsys) == [
        f"extends = '../gone/base.toml': file not found ({tmp_path.parent}/gone/base.toml)"]


def test_a_file_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path, capsys):
    (tmp_path / "latin1.toml").write_bytes('name = "café"\n'.encode("latin-1"))
    assert refused(["validate", str(tmp_path / "latin1.toml")], capsys) == [
        "not UTF-8 text: byte 0xe9 at offset 11"]


def test_a_partition_override_drops_the_keys_of_the_old_partition(capsys):
    digits = str(DATA / "digits.toml")
    assert main(["validate", digits, "--set", "data.partition=iid"]) == 0
    out, err = capsys.readouterr()
    assert err == ("fedsparse: note: dropped data.alpha = 1.0 (it applies only to "
                   "partition = 'dirichlet')\n")
    assert 'partition = "iid"' in out and "alpha" not in out
    assert refused(["validate", digits, "--set", "data.partition=iid", "--set",
                    "data.alpha=0.5"], capsys) == [
        "data: data.alpha only applies to partition = 'dirichlet', not 'iid'"]
    assert refused(["validate", digits, "--set", "data.partition=shards"], capsys) == [
        "data: partition = 'shards' needs data.shards_per_client"]


def test_a_partition_in_the_file_itself_keeps_its_error():
    text = digits_scenario(data={"partition": "iid"})
    assert "data.alpha only applies to partition = 'dirichlet', not 'iid'" in problems(text)


def test_unset_removes_a_key_of_the_file_before_validation(capsys):
    digits = str(DATA / "digits.toml")
    assert main(["validate", digits, "--unset", "data.alpha", "--set", "data.partition=iid",
                 "--unset", "client.lr"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "alpha" not in out
    assert "lr = 0.05\n" in out  # the sgd program's default
    assert refused(["validate", digits, "--unset", "data.alhpa"], capsys) == [
        "data.alhpa: no such key in the scenario file ([data] has: dataset, num_clients, "
        "partition, alpha, min_partition_size)"]
    assert refused(["validate", digits, "--unset", "bogus.key"], capsys) == [
        "bogus.key: no such key in the scenario file"]


@pytest.mark.parametrize(("args", "message"), [
    ([], "fedsparse run: error: one of the arguments FILE --resume is required"),
    (["a.toml", "--resume", "runs/a"], "fedsparse run: error: argument --resume: not allowed "
                                       "with argument FILE"),
])
def test_run_needs_a_file_or_resume_as_a_usage_error(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", *args])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == message
