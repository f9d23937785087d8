"""Test helpers for a TLS SuperLink behind ``fedsparse-fleet-proxy``: a throwaway CA and
server certificate, SuperNode keys, and the two processes started, waited for and stopped.

Every process is started in its own session and stopped with its descendants
(``flower-superlink --isolation subprocess`` has a ``flower-superexec`` child).
"""

from __future__ import annotations

import datetime
import ipaddress
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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
    """A CA and a server certificate for ``names`` (DNS names or IP addresses) in
    ``directory``; the CA's key is not kept."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsparse test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    certs = Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return certs


def make_node_key(path: Path) -> Path:
    """A SuperNode's ECDSA key in OpenSSH format at ``path`` (and ``path``.pub); -> .pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    public = path.with_name(path.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return public


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
