"""Node registration through Flower's own CLI (``flwr supernode register/unregister/ls``),
against the SuperLink's Control API on the SuperLink host's loopback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fedsparse.deploy.manifest import DeploymentError, Manifest, Node
from fedsparse.deploy.programs import CA, flower_env
from fedsparse.launch import CONNECTION, flower_config


def flwr(directory: Path, manifest: Manifest, *args: str) -> dict:
    """``flwr <args> fedsparse --format json`` against this deployment; its JSON answer."""
    env = flower_env(directory)
    flower_config(Path(env["FLWR_HOME"]), manifest.control_address, manifest.insecure,
                  None if manifest.insecure else directory / CA)
    try:
        done = subprocess.run(["flwr", *args, CONNECTION, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DeploymentError(f"`flwr {' '.join(args)}` against {manifest.control_address} "
                              f"did not complete: {err}") from None
    answer = _json_answer(done.stdout)
    if done.returncode != 0 or not answer.get("success"):
        reason = answer.get("error-message") or (done.stderr or done.stdout).strip()[-500:]
        raise DeploymentError(f"`flwr {' '.join(args)}` failed at the SuperLink "
                              f"{manifest.control_address}: {reason}")
    return answer


def _json_answer(stdout: str) -> dict:
    """The JSON object ``flwr --format json`` printed (pretty-printed, maybe after text)."""
    start = stdout.find("{")
    try:
        return json.JSONDecoder().raw_decode(stdout[start:])[0] if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def register(directory: Path, manifest: Manifest, node: Node) -> int:
    """Register ``node``'s public key; the node id the SuperLink gave it."""
    answer = flwr(directory, manifest, "supernode", "register", str(directory / node.public_key),
                  "--name", node.name)
    return int(answer["node-id"])


def unregister(directory: Path, manifest: Manifest, node_id: int) -> None:
    """Unregister a node for good (Flower never reuses the registration)."""
    flwr(directory, manifest, "supernode", "unregister", str(node_id))


def listed(directory: Path, manifest: Manifest) -> dict[int, str]:
    """Node id -> status (``registered``, ``online``, ``offline``) as the SuperLink sees it."""
    answer = flwr(directory, manifest, "supernode", "ls")
    return {int(n["node-id"]): n["status"] for n in answer.get("nodes", [])}
