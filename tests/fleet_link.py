"""Test helpers for a TLS SuperLink behind ``fedsparse-fleet-proxy``: a throwaway CA and
server certificate, SuperNode keys, and the two processes started, waited for and stopped.

Every process is started in its own session and stopped with its descendants
(``flower-superlink --isolation subprocess`` has a ``flower-superexec`` child).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedsparse.deploy import pki
from fedsparse.launch import stop_tree
from fedsparse.runtime_env import NO_PHONE_HOME

BIN = Path(sys.executable).parent
Launch = Callable[..., subprocess.Popen]  # (argv, **popen) -> Popen: here, or in a namespace


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path, names: list[str]) -> Certs:
    """A CA and a server certificate for ``names`` (DNS names or IP addresses; localhost and
    127.0.0.1 are always added) in ``directory``; the CA's key is not kept."""
    ca_key, ca = pki.make_ca("fedsparse test CA")
    key, cert = pki.make_server_cert(ca_key, ca, names)
    certs = Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    pki.write_public(certs.ca, pki.cert_pem(ca), force=True)
    pki.write_public(certs.cert, pki.cert_pem(cert), force=True)
    pki.write_private(certs.key, pki.key_pem(key), force=True)
    return certs


def make_node_key(path: Path) -> Path:
    """A SuperNode's ECDSA key in OpenSSH format at ``path`` (and ``path``.pub); -> .pub."""
    private, public = pki.make_node_key()
    pki.write_private(path, private, force=True)
    return pki.write_public(path.with_name(path.name + ".pub"), public, force=True)


def flower_env(home: Path) -> dict[str, str]:
    return {**os.environ, **NO_PHONE_HOME, "FLWR_HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def superlink_argv(certs: Certs, port: int, *, node_auth: bool = False) -> list[str]:
    """A TLS ``flower-superlink`` on 127.0.0.1:``port`` with an in-memory state."""
    return [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs.ca),
            "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
            "--host", "127.0.0.1", "--port", str(port), "--isolation", "subprocess",
            "--disable-runtime-dependency-installation", "--database", ":memory:",
            *(["--enable-supernode-auth"] if node_auth else [])]


def proxy_argv(certs: Certs, listen: str, upstream_port: int) -> list[str]:
    return [str(BIN / "fedsparse-fleet-proxy"), "--listen", listen,
            "--upstream", f"https://127.0.0.1:{upstream_port}", "--certfile", str(certs.cert),
            "--keyfile", str(certs.key), "--ca", str(certs.ca)]


@contextmanager
def started(argv: list[str], log: Path, env: dict[str, str],
            launch: Launch = subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``argv`` running (its own session, output to ``log``); it and its descendants are
    sent SIGTERM on exit, SIGKILL after 10 s."""
    with log.open("ab") as out:
        proc = launch(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                      start_new_session=True)
    try:
        yield proc
    finally:
        stop_tree(proc)


def tls_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def wait_healthy(url: str, ca: Path, proc: subprocess.Popen, log: Path,
                 timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; fail with ``log``'s tail if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited {proc.returncode}:\n"
                                 f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=tls_context(ca)) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")
