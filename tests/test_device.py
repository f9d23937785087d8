"""GPU clients, tested on the CPU: the device a client picks (``fedsparse/device.py``), the GPU
share Flower is given (``run.client_gpus``), the refusal of a share on a machine without a
GPU, the CPU path unchanged bit for bit, FLOPs counted on a CPU copy, and every program run
on a second device.

The second device is torch's Lazy Tensor device with its TorchScript backend (``lazy``,
``torch._lazy``): it computes on the CPU but behaves as CUDA does where it matters here: an
op refuses a tensor of another device, and ``.numpy()`` refuses a tensor not moved to the
CPU first, so a client that trains there has moved every model, batch, mask and buffer to
its device and brought everything it sends or saves back. Two of its own bugs shape the
cases (neither is CUDA's): it does not update batch normalisation's running statistics (so
pFedGate's gating layer evaluates differently: its evaluation is not compared), and it
fails ("expected scalar type Float but found Double") on DER++'s loss, which adds
``beta * cross_entropy`` of a buffer batch (the continual cases use experience replay).
Ray's placement of GPU shares is tested through the resources passed (there is no GPU
here): Flower's own parsing and actor-pool sizing are run on them.
"""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest
import tomli_w
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.nn import functional as F

import clients.programs.base as program_base
from clients.programs.sgd import SGDProgram
from fedsparse.cli import main
from fedsparse.client_state import ClientState, StateStore
from fedsparse.data import available, client_data
from fedsparse.device import CPU, DEVICE_ENV, client_device
from fedsparse.launch import _federation_config, check_client_gpus
from fedsparse.lora.model import LoRAClassifier, LoRAModelParams
from fedsparse.metrics.flops import counted, counted_on_cpu
from fedsparse.models import build_model, load_shared_state, scenario_model
from fedsparse.models.cnn import CNNParams
from fedsparse.models.mlp import MLPParams
from fedsparse.protocol import ARRAYS, CONFIG, METRICS, SERVER_ROUND, derive_seed
from fedsparse.scenario import ScenarioError, parse_scenario
from fedsparse.training import batches, cross_entropy, num_steps
from strategies.records import to_numpy
from strategies.server_app import initial_arrays
from tests.conftest import DATA, digits_scenario
from tests.local_grid import run_federation


def scenario_from(file: str, **sections: dict):
    """``tests/data/<file>.toml`` with some keys replaced (a value of None removes the key)."""
    tree = tomllib.loads((DATA / f"{file}.toml").read_text())
    for name, values in sections.items():
        section = tree.setdefault(name, {})
        section.update(values)
        for key in [k for k, v in section.items() if v is None]:
            del section[key]
    return parse_scenario(tomli_w.dumps(tree))


def cuda_visible(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Pretend this process sees ``count`` CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# -- the device a client picks ------------------------------------------------------------------

def test_a_client_that_sees_no_cuda_device_trains_on_the_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    cuda_visible(monkeypatch, 0)
    assert client_device(0.0) == client_device(0.5) == CPU


def test_a_client_given_a_gpu_share_trains_on_the_gpu_its_process_sees(monkeypatch):
    """Ray sets an actor's CUDA_VISIBLE_DEVICES to the GPU it placed it on: cuda:0 there. A
    client given no share stays on the CPU even where it sees GPUs (Ray leaves every GPU
    visible to such an actor)."""
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    cuda_visible(monkeypatch, 1)
    assert client_device(0.5) == client_device(1.0) == torch.device("cuda", 0)
    assert client_device(0.0) == CPU


def test_fedsparse_device_overrides_the_choice(monkeypatch):
    cuda_visible(monkeypatch, 2)
    for value, share, expected in (("cpu", 0.5, CPU), ("cuda", 0.0, torch.device("cuda", 0)),
                                   ("cuda:1", 0.5, torch.device("cuda", 1))):
        monkeypatch.setenv(DEVICE_ENV, value)
        assert client_device(share) == expected
    for value in ("mps", "gpu", "cpu:1", "cuda:x", " cuda"):
        monkeypatch.setenv(DEVICE_ENV, value)
        with pytest.raises(ValueError) as err:
            client_device(0.5)
        assert str(err.value) == f"FEDSPARSE_DEVICE={value!r}; allowed: cpu, cuda, cuda:<index>"
    monkeypatch.setenv(DEVICE_ENV, "cuda:2")
    with pytest.raises(ValueError, match=r"^FEDSPARSE_DEVICE='cuda:2' but this process sees 2 "
                                         r"CUDA device\(s\)$"):
        client_device(0.5)


def test_a_program_takes_the_device_of_its_process(monkeypatch, tmp_path):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    cuda_visible(monkeypatch, 1)
    state = ClientState(StateStore(tmp_path, "run", 0), 0, 1)
    for share, expected in ((0.0, CPU), (0.25, torch.device("cuda", 0))):
        scenario = parse_scenario(digits_scenario(run={"client_gpus": share}))
        assert SGDProgram(scenario, 0, state).device == expected


def test_client_gpus_is_a_share_of_one_gpu_that_ray_can_place():
    for value, problem in (("1.5", "Input should be less than or equal to 1"),
                           ("-0.5", "Input should be greater than or equal to 0"),
                           ("0.00005", "below 0.0001, the smallest share of a resource Ray "
                                       "places (0 trains clients on the CPU)")):
        with pytest.raises(ScenarioError) as err:
            parse_scenario(digits_scenario(), overrides=[f"run.client_gpus={value}"])
        assert err.value.problems == [f"run.client_gpus = {float(value)!r}: {problem}"]
    assert parse_scenario(digits_scenario()).run.client_gpus == 0.0


# -- the GPU share Flower is given --------------------------------------------------------------

@pytest.mark.parametrize("share", [0.0, 0.25, 0.1, 1.0])
def test_flower_gets_run_client_gpus_exactly_as_each_clients_resources(share):
    """What ``flwr run --federation-config`` receives, parsed and turned into the Ray
    backend's client resources by Flower's own code: ``client-resources-num-gpus`` is
    ``run.client_gpus`` exactly; Flower's SimulationConfig then carries it as a 32-bit
    float."""
    from flwr.common.config import parse_config_args
    from flwr.simulation.app import _run_simulation_settings
    from flwr.supercore.utils import simulation_config_from_json

    scenario = parse_scenario(digits_scenario(run={"client_gpus": share, "client_cpus": 2}))
    parsed = parse_config_args([_federation_config(scenario, "")])
    assert parsed["client-resources-num-gpus"] == share
    assert parsed["client-resources-num-cpus"] == 2
    config = simulation_config_from_json({k.replace("-", "_"): v for k, v in parsed.items()})
    _, backend, backend_config, _, _ = _run_simulation_settings(config)
    assert backend == "ray"
    assert backend_config["client_resources"] == {"num_cpus": 2,
                                                  "num_gpus": float(np.float32(share))}


def test_flower_places_as_many_clients_per_gpu_as_the_share_allows(monkeypatch):
    """Flower sizes its actor pool per Ray node as min(CPUs / client_cpus, GPUs / share):
    0.25 of a GPU is 4 clients per GPU; 0.1 is 9, not 10 (0.1 as a 32-bit float is a little
    more than 0.1); a node without a GPU hosts none, and a cluster without any stops the run
    (what ``check_client_gpus`` refuses before anything starts)."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    def pool(nodes: list[dict[str, float]], share: float) -> int:
        monkeypatch.setattr(ray, "nodes", lambda: [{"Resources": r} for r in nodes])
        return pool_size_from_resources({"num_cpus": 1, "num_gpus": float(np.float32(share))})

    assert pool([{"CPU": 16.0, "GPU": 1.0}], 0.25) == 4
    assert pool([{"CPU": 16.0, "GPU": 1.0}], 0.1) == 9
    assert pool([{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0}], 0.5) == 4
    assert pool([{"CPU": 2.0, "GPU": 1.0}], 0.25) == 2
    with pytest.raises(ValueError, match="ActorPool is empty"):
        pool([{"CPU": 16.0}], 0.5)


def test_client_gpus_on_a_machine_without_cuda_is_refused_before_anything_starts(
        workdir, monkeypatch, capsys):
    cuda_visible(monkeypatch, 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = workdir / "gpu.toml"
    path.write_text(digits_scenario(run={"client_gpus": 0.5}))
    problem = ("run.client_gpus = 0.5: torch sees no CUDA device on this machine, so the Ray "
               "of a simulation here could place no client; set run.client_gpus = 0 to train "
               "the clients on the CPU")
    assert main(["run", str(path)]) == 2
    assert main(["compare", str(path), str(path)]) == 2
    err = capsys.readouterr().err
    assert f"fedsparse: invalid scenario for a simulation on this machine:\n  - {problem}\n" in err
    assert f"fedsparse: invalid scenario {path} for a simulation on this machine:\n  - " \
           f"{problem}\n" in err
    assert sorted(p.name for p in workdir.iterdir()) == ["gpu.toml"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ScenarioError, match=r"on this machine \(CUDA_VISIBLE_DEVICES=''\), so"):
        check_client_gpus(parse_scenario(path.read_text()).run, "here")


def test_a_gpu_share_with_a_cuda_device_or_no_share_passes(monkeypatch):
    cuda_visible(monkeypatch, 1)
    check_client_gpus(parse_scenario(digits_scenario(run={"client_gpus": 0.5})).run, "here")

    def never() -> int:
        raise AssertionError("no GPU share: CUDA is not asked about")

    monkeypatch.setattr(torch.cuda, "device_count", never)
    check_client_gpus(parse_scenario(digits_scenario()).run, "here")


# -- the CPU path, bit for bit ------------------------------------------------------------------

def test_the_sgd_program_on_the_cpu_is_fedavgs_clientupdate_bit_for_bit(monkeypatch, tmp_path):
    """The sgd program on the CPU, chosen by FEDSPARSE_DEVICE=cpu or by a GPU share that sees
    no GPU, against FedAvg's ClientUpdate written out as plain torch (McMahan et al. 2017,
    Algorithm 1): the same weights and loss to the last bit."""
    scenario = parse_scenario(digits_scenario(
        run={"client_gpus": 0.5}, client={"momentum": 0.5, "weight_decay": 1e-4,
                                          "grad_clip": 1.0}))
    pid, server_round, p = 2, 3, scenario.client
    sent = initial_arrays(scenario)
    content = RecordDict({ARRAYS: sent, CONFIG: ConfigRecord({SERVER_ROUND: server_round})})
    state = ClientState(StateStore(tmp_path, "run", pid), 0, server_round)
    cuda_visible(monkeypatch, 0)
    replies = []
    for override in ("cpu", None):
        if override is None:
            monkeypatch.delenv(DEVICE_ENV, raising=False)
        else:
            monkeypatch.setenv(DEVICE_ENV, override)
        program = SGDProgram(scenario, pid, state)
        assert program.device == CPU
        replies.append(program.train(content))

    data = client_data(scenario.data, scenario.seed, pid)
    model = scenario_model(scenario)
    load_shared_state(model, sent.to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum,
                                weight_decay=p.weight_decay)
    order = batches(len(data.x_train), p.batch_size,
                    torch.Generator().manual_seed(derive_seed(scenario.seed, pid, server_round)))
    steps, loss_sum = num_steps(len(data.x_train), p.batch_size, p.local_epochs, None), 0.0
    for _ in range(steps):
        idx = next(order)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        loss_sum += float(loss.detach())
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    for reply in replies:
        got = to_numpy(reply[ARRAYS])
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
        assert reply[METRICS]["train-loss"] == loss_sum / steps


# -- FLOPs: counted on a CPU copy ---------------------------------------------------------------

def _mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return (build_model(MLPParams(hidden=[32, 16]), (1, 8, 8), 10),
            (torch.rand(24, 1, 8, 8), torch.randint(10, (24,))))


def _cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return (build_model(CNNParams(channels=[4, 8], hidden=[16]), (1, 8, 8), 10),
            (torch.rand(24, 1, 8, 8), torch.randint(10, (24,))))


def _sora() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if not available("chatterbot_en"):
        pytest.skip("the MiniLM tokenizer is missing")
    torch.manual_seed(0)
    model = LoRAClassifier(LoRAModelParams(base="tiny_bert", rank=4, sora=True, dropout=0.1), 5)
    ids = torch.randint(1000, 2000, (6, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 9:] = 0  # padding
    return model, (ids, torch.randint(5, (6,)))


@pytest.mark.parametrize("build", [_mlp, _cnn, _sora], ids=["mlp", "cnn", "sora"])
def test_a_cpu_copy_counts_the_flops_that_the_step_runs(build):
    """What a client on another device counts (``counted_on_cpu``) is what the step counts
    on the CPU, and it leaves the model (no gradient: SoRA's hook gates the copy with the
    copy's gates) and torch's random state (dropout) as they were."""
    model, batch = build()
    model.train()
    rng = torch.get_rng_state()
    on_copy = counted_on_cpu(model, cross_entropy, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    _, on_model = counted(lambda: cross_entropy(model, batch).backward())
    assert on_copy == on_model > 0


# -- every program on a second device -----------------------------------------------------------

@pytest.fixture(scope="module")
def lazy_device() -> torch.device:
    try:
        import torch._lazy.ts_backend

        torch._lazy.ts_backend.init()
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"torch's lazy TorchScript backend is unavailable: {err}")
    return torch.device("lazy")


def _marked_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut the lazy graph after every optimiser step, as code for lazy devices does (without
    it each step's graph holds all earlier ones); a no-op for CPU tensors."""
    import torch._lazy

    for cls in (torch.optim.SGD, torch.optim.AdamW):
        def step(self, *args, _step=cls.step, **kwargs):
            result = _step(self, *args, **kwargs)
            torch._lazy.mark_step()
            return result

        monkeypatch.setattr(cls, "step", step)


CONTINUAL = {"continual": {"num_tasks": 1, "rounds_per_task": 2}, "run": {"rounds": 2},
             "client": {"learner": "er", "local_epochs": 1, "removal_every": 1,
                        "removal_until": 1, "batch_size": 64}}
CASES = {
    "sgd": lambda: scenario_from(
        "digits", data={"num_clients": 3}, run={"rounds": 1},
        strategy={"fraction_train": 1.0, "downlink": {"name": "topk", "ratio": 0.3}},
        client={"local_epochs": None, "local_steps": 2, "momentum": 0.5, "grad_clip": 1.0,
                "finetune_epochs": 1, "batch_size": 64}),
    "compressed_sgd": lambda: scenario_from(
        "digits", data={"num_clients": 3}, run={"rounds": 2},
        strategy={"name": "fedavg_ef", "fraction_train": 1.0},
        client={"program": "compressed_sgd", "local_epochs": None, "local_steps": 2}),
    "controlled_sgd": lambda: scenario_from(
        "digits", data={"num_clients": 3}, run={"rounds": 2},
        strategy={"name": "scafcom", "fraction_train": 1.0},
        client={"program": "controlled_sgd", "local_epochs": None, "local_steps": 2}),
    "continual-tdm": lambda: scenario_from(
        "continual_digits", strategy={"freeze_at": 1}, **CONTINUAL),
    "continual-rigl": lambda: scenario_from(
        "continual_digits", strategy={"mask_update": "dst", "growth": "gradient",
                                      "init": "uniform", "freeze_at": 1}, **CONTINUAL),
    "continual-snfs": lambda: scenario_from(
        "continual_digits", strategy={"mask_update": "dst", "growth": "momentum",
                                      "init": "uniform", "freeze_at": 1},
        **{**CONTINUAL, "client": {**CONTINUAL["client"], "momentum": 0.5}}),
    "continual-isolation": lambda: scenario_from(
        "continual_digits", run={"rounds": 2}, continual={"num_tasks": 2, "rounds_per_task": 1},
        strategy={"mask_update": "fixed", "init": "uniform", "isolation": True},
        client={"learner": "er", "local_epochs": 1, "removal_fraction": 0.0,
                "batch_size": 64}),
    "pfedgate": lambda: scenario_from(
        "pfedgate_digits", data={"num_clients": 4}, run={"rounds": 2, "eval_every": 2},
        model={"name": "mlp", "hidden": [16], "channels": None},
        strategy={"fraction_train": 1.0}, client={"batch_size": 64, "finetune_epochs": 1}),
    "lora": lambda: scenario_from(
        "lora_tiny", data={"num_clients": 2}, run={"rounds": 1, "eval_every": 1},
        model={"sora": True}, client={"batch_size": 32},
        strategy={"server_optimizer": "sgd", "server_lr": 1.0, "sora_threshold": 0.05}),
}
EVALUATION = ("accuracy", "loss", "fed_", "eval_density", "novel_", "task")


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("case", list(CASES))
def test_every_program_trains_on_a_second_device_as_on_the_cpu(case, lazy_device, monkeypatch):
    """The same federation with its clients on the CPU and on ``lazy``: no client fails
    (nothing of the CPU meets the device, nothing leaves it without ``.cpu()``), the FLOPs
    are the same to the unit (counted on a CPU copy), and the model, losses and evaluations
    agree within float tolerance."""
    if case == "lora" and not available("chatterbot_en"):
        pytest.skip("chatterbot-corpus or the MiniLM tokenizer missing")
    scenario = CASES[case]()
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    _marked_steps(monkeypatch)
    on_cpu = run_federation(scenario)
    programs: list[float] = []
    monkeypatch.setattr(program_base, "client_device",
                        lambda client_gpus: programs.append(client_gpus) or lazy_device)
    on_device = run_federation(scenario)
    assert programs  # the clients were on lazy
    for cpu_row, row in zip(on_cpu.rows, on_device.rows, strict=True):
        assert row.get("clients_failed", 0) == row.get("eval_clients_failed", 0) == 0
        assert row["clients_ok"] == cpu_row["clients_ok"] > 0
        for key, value in cpu_row.items():
            if "flops" in key:
                assert row[key] == value, key
            elif (isinstance(value, float) and not key.endswith("_s")
                  and not (case == "pfedgate" and key.startswith(EVALUATION))):
                assert math.isclose(row[key], value, rel_tol=1e-4, abs_tol=1e-6), key
    arrays = to_numpy(on_device.state.arrays)
    for key, value in to_numpy(on_cpu.state.arrays).items():
        np.testing.assert_allclose(arrays[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
