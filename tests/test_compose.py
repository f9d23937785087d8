"""docker-compose.yml, its insecure override and the SuperNode generator: valid for
docker-compose, every fedsparse service runs a program of ``fedsparse.deploy.programs``,
only the Fleet and MLflow ports are published (on 127.0.0.1), start order is explicit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedsparse.deploy.manifest import Manifest
from fedsparse.deploy.programs import SERVER_SERVICES
from fedsparse.runtime_env import NO_PHONE_HOME
from tests.conftest import REPO

COMPOSE, INSECURE = REPO / "docker-compose.yml", REPO / "docker-compose.insecure.yml"
ONE_SHOT = {"init", "register"}
IMAGE = "${FEDSPARSE_IMAGE:-fedsparse:0.1.0}"


def services(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["services"]


def fedsparse_services() -> dict[str, Any]:
    return {name: s for name, s in services().items() if s.get("image") == IMAGE}


def generated_nodes(tmp_path: Path, count: int) -> Path:
    out = subprocess.run([sys.executable, str(REPO / "docker/compose-nodes.py"), str(count)],
                         check=True, capture_output=True, text=True).stdout
    path = tmp_path / "docker-compose.nodes.yml"
    path.write_text(out)
    return path


@pytest.mark.parametrize("overrides", [[], [INSECURE], ["nodes"]],
                         ids=["main", "insecure", "generated-nodes"])
def test_docker_compose_config_validates(overrides: list[Any], tmp_path: Path):
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    files = [COMPOSE] + [generated_nodes(tmp_path, 3) if f == "nodes" else f for f in overrides]
    args = [compose, "--project-directory", str(REPO)]
    for path in files:
        args += ["-f", str(path)]
    result = subprocess.run([*args, "config", "--quiet"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "FEDSPARSE_NODES": "3"})
    assert result.returncode == 0, result.stderr


def test_every_long_lived_fedsparse_service_runs_a_deployment_program():
    long_lived = {n: s for n, s in fedsparse_services().items() if n not in ONE_SHOT}
    names = set()
    for name, service in long_lived.items():
        command = service["command"]
        assert command[:3] == ["fedsparse", "deploy", "service"] and command[4:] == ["/deploy"], \
            (name, command)
        names.add(command[3])
        assert service["restart"] == "unless-stopped", name
    nodes = sorted(n for n in names if n.startswith("node:"))
    assert nodes == [f"node:node-{i}" for i in range(len(nodes))] and len(nodes) >= 2
    # PostgreSQL is its own image (the official one, or local/postgres:15): the rest are ours
    assert names - set(nodes) == set(SERVER_SERVICES) - {"postgres"}
    assert "postgres" in services() and "postgres" not in fedsparse_services()


def test_one_shots_and_their_commands():
    ours = fedsparse_services()
    assert ours["init"]["command"][:4] == ["fedsparse", "deploy", "init", "/deploy"]
    assert "--exist-ok" in ours["init"]["command"] and "--insecure" not in ours["init"]["command"]
    assert ours["register"]["command"] == ["fedsparse", "deploy", "register", "/deploy"]
    assert all("restart" not in ours[name] for name in ONE_SHOT)
    assert "build" in ours["init"] and all("build" not in s for n, s in ours.items()
                                           if n != "init"), "one build, used by every service"


def test_the_insecure_override_only_adds_insecure_to_init():
    override = services(INSECURE)
    assert set(override) == {"init"} and set(override["init"]) == {"command"}
    assert override["init"]["command"] == [*services()["init"]["command"], "--insecure"]
    assert "INSECURE" in INSECURE.read_text().splitlines()[0]


def test_only_fleet_and_mlflow_ports_are_published_on_loopback():
    published = {name: s["ports"] for name, s in services().items() if s.get("ports")}
    assert published == {"superlink": ["127.0.0.1:8000:8000"],
                         "mlflow": ["127.0.0.1:5000:5000"]}
    assert all("expose" not in s for s in services().values())


def test_the_superlink_namespace_is_shared_by_the_proxy_and_register_only():
    joined = {n for n, s in services().items() if s.get("network_mode") == "service:superlink"}
    assert joined == {"fleet-proxy", "register"}
    assert all("networks" not in services()[n] and "ports" not in services()[n] for n in joined)
    nodes = [s for n, s in services().items() if n.startswith("supernode-")]
    assert all(s["networks"] == ["fleet"] for s in nodes), "devices reach the Fleet port only"
    assert "fleet" not in services()["mlflow"]["networks"]
    assert "fleet" not in services()["postgres"]["networks"]


def test_every_dependency_says_what_it_waits_for():
    everything = services()
    for name, service in everything.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must name conditions"
        for target, rule in depends.items():
            condition = rule["condition"]
            if target in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, target)
            else:
                assert condition == "service_healthy", (name, target)
                assert "healthcheck" in everything[target], f"{target} has no healthcheck"
    nodes = [s for n, s in everything.items() if n.startswith("supernode-")]
    assert all({"register", "fleet-proxy"} <= set(s["depends_on"]) for s in nodes)
    waits_for_init = {n for n, s in everything.items() if "init" in s.get("depends_on", {})}
    roots = {n for n, s in everything.items() if not s.get("depends_on")}
    assert roots == {"init"} and waits_for_init >= {"postgres", "mlflow", "superlink"}


def test_the_generator_copies_supernode_0_for_each_node(tmp_path: Path):
    generated = services(generated_nodes(tmp_path, 4))
    assert list(generated) == [f"supernode-{i}" for i in range(4)]
    assert generated["supernode-0"] == services()["supernode-0"]
    for i, service in generated.items():
        assert service["command"][3] == f"node:node-{i.removeprefix('supernode-')}"
        assert {k: v for k, v in service.items() if k != "command"} == \
            {k: v for k, v in services()["supernode-0"].items() if k != "command"}


def test_the_image_sets_the_no_phone_home_environment():
    text = (REPO / "docker/Dockerfile").read_text()
    env = dict(re.findall(r"^\s+([A-Z_]+)=(\S+?)(?: \\)?$", text, re.M))
    assert {k: env.get(k) for k in NO_PHONE_HOME} == NO_PHONE_HOME


def test_compose_and_deploy_up_start_the_same_programs_with_the_same_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each compose service runs ``fedsparse deploy service NAME /deploy``, which executes,
    under the supervisor, exactly the argv that ``deploy up`` starts as a daemon
    (``programs.program``; ``tests/test_deploy.py`` checks the daemons' argv against it)."""
    from fedsparse.cli import main
    from fedsparse.deploy.init import init_deployment
    from fedsparse.deploy.programs import program

    directory = tmp_path / "deploy"
    init_deployment(directory, ["superlink"], 2, postgres_host="postgres",
                    mlflow_host="mlflow", mlflow_bind="0.0.0.0")
    executed: dict[str, list[str]] = {}

    def execvpe(_file: str, argv: list[str], env: dict[str, str]) -> None:
        executed["argv"], executed["env"] = argv, env

    monkeypatch.setattr("os.execvpe", execvpe)
    monkeypatch.chdir(tmp_path)
    for name, service in fedsparse_services().items():
        command = service["command"]
        if command[:3] != ["fedsparse", "deploy", "service"]:
            continue
        main([*command[1:3], command[3], str(directory)])
        expected = program(directory, Manifest.load(directory), command[3])
        assert executed["argv"][executed["argv"].index("--") + 1:] == expected.argv, name
        assert all(executed["env"][k] == v for k, v in expected.env.items()), name
