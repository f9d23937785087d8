"""The deployment's CA, certificates and keys: what Flower and TLS clients accept, file modes,
no overwrite without force, add/remove node, and the clear errors for wrong files."""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedsparse.deploy import pki
from fedsparse.deploy.init import (
    CA_KEY,
    POSTGRES_PASSWORD,
    SECRETS,
    add_node,
    init_deployment,
    read_secrets,
    remove_node_files,
)
from fedsparse.deploy.manifest import DeploymentError, Manifest
from fedsparse.deploy.programs import CA, SERVER_CERT, SERVER_KEY

HOSTS = ["10.20.30.40", "superlink.example.org"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("deployment")
    init_deployment(directory, HOSTS, 2)
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_is_issued_by_the_ca_for_every_host(deployment: Path):
    ca = x509.load_pem_x509_certificate((deployment / CA).read_bytes())
    cert = x509.load_pem_x509_certificate((deployment / SERVER_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.20.30.40"),
                                                         ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    assert 700 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 800
    assert pki.check_server_cert(deployment / SERVER_CERT, deployment / CA,
                                 deployment / SERVER_KEY, HOSTS) == cert


def test_private_files_are_0600_and_public_ones_readable(deployment: Path):
    manifest = Manifest.load(deployment)
    private = [CA_KEY, SERVER_KEY, SECRETS, *(n.key for n in manifest.nodes)]
    assert {f: mode(deployment / f) for f in private} == {f: 0o600 for f in private}
    for public in [CA, SERVER_CERT, *(n.public_key for n in manifest.nodes)]:
        assert mode(deployment / public) & 0o044 == 0o044, public
    assert not list(deployment.rglob("*.tmp"))


def test_private_file_is_never_readable_by_others_even_with_a_lax_umask(tmp_path: Path,
                                                                         monkeypatch):
    seen = []
    real_fdopen = pki.os.fdopen

    def fdopen(fd, *args, **kwargs):  # the file exists now, nothing written yet
        seen.append(stat.S_IMODE(pki.os.fstat(fd).st_mode))
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(pki.os, "fdopen", fdopen)
    old = pki.os.umask(0)
    try:
        pki.write_private(tmp_path / "k", b"secret")
    finally:
        pki.os.umask(old)
    assert seen == [0o600] and mode(tmp_path / "k") == 0o600


def test_node_key_loads_with_flowers_own_loaders(deployment: Path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    node = Manifest.load(deployment).node("node-1")
    args = argparse.Namespace(auth_supernode_private_key=str(deployment / node.key),
                              auth_supernode_public_key=None)
    private, public = _try_setup_client_authentication(args)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    registered = serialization.load_pem_public_key(
        try_load_public_key(deployment / node.public_key))
    assert registered == public == pki.check_node_key(deployment / node.key)
    assert pki.check_node_public_key(deployment / node.public_key) == public
    other = Manifest.load(deployment).node("node-0")
    assert pki.check_node_key(deployment / other.key) != public


def test_manifest_and_secrets(deployment: Path):
    manifest = Manifest.load(deployment)
    assert manifest.superlink_hosts == HOSTS and not manifest.insecure
    assert [(n.name, n.partition_id, n.runtime_port) for n in manifest.nodes] == [
        ("node-0", 0, 9100), ("node-1", 1, 9101)]
    secrets = read_secrets(deployment)
    assert secrets["mlflow"]["username"] == "fedsparse"
    assert len(secrets["mlflow"]["password"]) >= 24
    assert secrets["postgres"]["password"] != secrets["mlflow"]["password"]
    assert secrets["mlflow"]["password"] not in (deployment / "deployment.toml").read_text()


def test_second_init_without_force_changes_nothing_and_with_force_replaces(tmp_path: Path):
    init_deployment(tmp_path, ["127.0.0.1"], 1)
    before = snapshot(tmp_path)
    with pytest.raises(DeploymentError, match=r"deployment\.toml already exists.*--force"):
        init_deployment(tmp_path, ["192.168.1.2"], 3)
    assert snapshot(tmp_path) == before
    # a half-made folder (no manifest) is refused too, naming the file that is in the way
    (tmp_path / "deployment.toml").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(DeploymentError, match=r"ca\.crt already exists.*--force"):
        init_deployment(tmp_path, ["127.0.0.1"], 1)
    assert snapshot(tmp_path) == before
    init_deployment(tmp_path, ["192.168.1.2"], 1, force=True)
    after = snapshot(tmp_path)
    assert set(after) == set(before) | {"deployment.toml"}
    assert all(after[f] != before[f] for f in before)
    assert mode(tmp_path / CA_KEY) == 0o600
    assert pki.check_server_cert(tmp_path / SERVER_CERT, tmp_path / CA, tmp_path / SERVER_KEY,
                                 ["192.168.1.2"])


def test_insecure_init_makes_only_credentials_and_manifest(tmp_path: Path):
    manifest = init_deployment(tmp_path, ["127.0.0.1"], 2, insecure=True,
                               mlflow_backend="sqlite")
    assert manifest.insecure and Manifest.load(tmp_path).insecure
    assert set(snapshot(tmp_path)) == {"deployment.toml", SECRETS, POSTGRES_PASSWORD}
    assert read_secrets(tmp_path)["mlflow"]["password"]
    node = add_node(tmp_path)
    assert node.name == "node-2" and not (tmp_path / node.key).exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hosts": []}, "--superlink-host"),
    ({"hosts": ["10.0.0.1:8000"]}, "--superlink-host '10.0.0.1:8000' is neither"),
    ({"hosts": ["https://x"]}, "neither an IP address nor a DNS name"),
    ({"nodes": 0}, "--nodes 0"),
    ({"port": 0}, "--port 0"),
    ({"port": 70000}, "--port 70000"),
    ({"port": 8010}, "--port 8010 is taken"),
    ({"mlflow_backend": "mysql"}, "--mlflow-backend 'mysql': choose one of postgresql, sqlite"),
    ({"mlflow_backend": "sqlite", "postgres_host": "db"}, "--postgres-host is only for"),
])
def test_bad_init_arguments_name_the_flag(tmp_path: Path, kwargs: dict, message: str):
    args = {"hosts": ["127.0.0.1"], "nodes": 1} | kwargs
    hosts, nodes = args.pop("hosts"), args.pop("nodes")
    with pytest.raises(DeploymentError, match=message):
        init_deployment(tmp_path, hosts, nodes, **args)
    assert not any(tmp_path.iterdir())


def test_add_node_and_remove_node(tmp_path: Path):
    init_deployment(tmp_path, ["127.0.0.1"], 3)
    removed = remove_node_files(tmp_path, "node-1")
    assert removed.partition_id == 1 and not (tmp_path / "nodes/node-1").exists()
    assert [n.name for n in Manifest.load(tmp_path).nodes] == ["node-0", "node-2"]
    node = add_node(tmp_path)
    # the next name, the partition and port the removed node freed
    assert (node.name, node.partition_id, node.runtime_port) == ("node-3", 1, 9101)
    assert Manifest.load(tmp_path).node("node-3") == node
    assert mode(tmp_path / node.key) == 0o600
    assert pki.check_node_key(tmp_path / node.key) == pki.check_node_public_key(
        tmp_path / node.public_key)
    node = add_node(tmp_path)
    assert (node.name, node.partition_id, node.runtime_port) == ("node-4", 3, 9103)
    with pytest.raises(DeploymentError, match="no node 'node-9'"):
        remove_node_files(tmp_path, "node-9")


def test_read_secrets_says_what_is_missing(tmp_path: Path):
    with pytest.raises(DeploymentError, match="cannot read the deployment's credentials"):
        read_secrets(tmp_path)
    pki.write_private(tmp_path / SECRETS, b'[mlflow]\nusername = "x"\n')
    with pytest.raises(DeploymentError, match=re.escape(
            "no mlflow.password, mlflow.secret_key, postgres.username, postgres.password")):
        read_secrets(tmp_path)


def test_write_refuses_an_existing_file_without_force(tmp_path: Path):
    for write in (pki.write_private, pki.write_public):
        path = tmp_path / write.__name__
        write(path, b"one")
        with pytest.raises(DeploymentError, match=rf"{path.name} already exists.*--force"):
            write(path, b"two")
        assert path.read_bytes() == b"one"
        write(path, b"two", force=True)
        assert path.read_bytes() == b"two"


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated deployment (its own CA, server certificate and keys)."""
    directory = tmp_path_factory.mktemp("other")
    init_deployment(directory, ["127.0.0.1"], 1)
    return directory


def test_check_server_cert_errors(deployment: Path, other_ca: Path, tmp_path: Path):
    cert, ca, key = deployment / SERVER_CERT, deployment / CA, deployment / SERVER_KEY
    with pytest.raises(DeploymentError,
                       match=re.escape(f"{cert}: not signed by the CA in {other_ca / CA}")):
        pki.check_server_cert(cert, other_ca / CA, key)
    with pytest.raises(DeploymentError, match="this key does not belong to the certificate"):
        pki.check_server_cert(cert, ca, other_ca / SERVER_KEY)
    with pytest.raises(DeploymentError, match=r"its SANs do not cover \['10\.9\.9\.9'\]"):
        pki.check_server_cert(cert, ca, key, ["10.20.30.40", "10.9.9.9"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate\n")
    with pytest.raises(DeploymentError, match=re.escape(f"{garbage}: not a PEM certificate")):
        pki.check_server_cert(garbage, ca, key)
    with pytest.raises(DeploymentError, match=re.escape(f"{garbage}: not a PEM private key")):
        pki.check_server_cert(cert, ca, garbage)
    with pytest.raises(DeploymentError, match=re.escape(f"{cert}: this certificate is not a CA")):
        pki.check_ca(cert)
    with pytest.raises(DeploymentError, match="cannot read"):
        pki.check_ca(tmp_path / "missing.crt")


def test_expired_certificate_is_named(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(pki, "SERVER_DAYS", -1)  # valid from 3 days ago until yesterday
    monkeypatch.setattr(pki, "BACKDATE", pki.dt.timedelta(days=3))
    ca_key, ca_cert = pki.make_ca("test")
    key, cert = pki.make_server_cert(ca_key, ca_cert, ["127.0.0.1"])
    pki.write_public(tmp_path / "ca.crt", pki.cert_pem(ca_cert))
    pki.write_public(tmp_path / "server.crt", pki.cert_pem(cert))
    pki.write_private(tmp_path / "server.key", pki.key_pem(key))
    with pytest.raises(DeploymentError, match=r"server\.crt: expired on"):
        pki.check_server_cert(tmp_path / "server.crt", tmp_path / "ca.crt",
                              tmp_path / "server.key")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_check_node_key_errors(tmp_path: Path, deployment: Path, monkeypatch):
    ec_key = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = _write(tmp_path / "pem.key", pki.key_pem(ec_key))
    with pytest.raises(DeploymentError, match=r"a PEM key .* not the OpenSSH format.*"
                                              r"BEGIN OPENSSH PRIVATE KEY.*ssh-keygen"):
        pki.check_node_key(pem)
    rsa_ssh = _write(tmp_path / "rsa.key", rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    with pytest.raises(DeploymentError, match=r"key type RSA; .* needs an ECDSA key on a NIST"):
        pki.check_node_key(rsa_ssh)
    ed25519_ssh = _write(tmp_path / "ed25519.key", ed25519.Ed25519PrivateKey.generate(
        ).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                        serialization.NoEncryption()))
    with pytest.raises(DeploymentError, match="key type Ed25519"):
        pki.check_node_key(ed25519_ssh)
    # an `ssh-keygen` key with a passphrase (bcrypt is not installed: a stand-in key
    # derivation; the file is refused before any derivation, for want of a passphrase)
    monkeypatch.setattr(serialization.ssh, "_bcrypt_kdf",
                        lambda password, salt, size, rounds, ignore_few_rounds=False: b"k" * size)
    encrypted = _write(tmp_path / "enc.key", ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(b"pass")))
    with pytest.raises(DeploymentError, match="this key is encrypted"):
        pki.check_node_key(encrypted)
    garbage = _write(tmp_path / "garbage.key", b"\x00\x01garbage")
    with pytest.raises(DeploymentError, match="not an OpenSSH private key"):
        pki.check_node_key(garbage)
    node = Manifest.load(deployment).node("node-0")
    with pytest.raises(DeploymentError, match="not an OpenSSH private key"):
        pki.check_node_key(deployment / node.public_key)  # the .pub given for the key
    with pytest.raises(DeploymentError, match="not an OpenSSH public key"):
        pki.check_node_public_key(deployment / node.key)
    rsa_pub = _write(tmp_path / "rsa.pub", rsa_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(DeploymentError, match="key type RSA"):
        pki.check_node_public_key(rsa_pub)


def _handshake(ca: Path, server_name: str, certfile: Path, keyfile: Path) -> str:
    """Connect a TLS client trusting ``ca`` to a one-shot TLS server on 127.0.0.1 that
    serves ``certfile``; the negotiated version (a failure raises on the client's side)."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certfile, keyfile)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass  # the client refused the certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client_context.wrap_socket(raw, server_hostname=server_name) as tls:
            assert tls.recv(2) == b"ok"
            return str(tls.version())
    finally:
        thread.join(10)
        listener.close()


@pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost", *HOSTS])
def test_tls_client_trusting_the_ca_accepts_the_server(deployment: Path, server_name: str):
    version = _handshake(deployment / CA, server_name, deployment / SERVER_CERT,
                         deployment / SERVER_KEY)
    assert version.startswith("TLSv1.")


def test_tls_client_refuses_another_ca_and_a_host_not_in_the_sans(deployment: Path,
                                                                  other_ca: Path):
    served = deployment / SERVER_CERT, deployment / SERVER_KEY
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(other_ca / CA, "127.0.0.1", *served)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(deployment / CA, "10.9.9.9", *served)


def test_force_refuses_a_deployment_that_has_been_used(tmp_path: Path):
    init_deployment(tmp_path, ["127.0.0.1"], 1)
    (tmp_path / "state").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(DeploymentError, match="has been used"):
        init_deployment(tmp_path, ["127.0.0.1"], 1, force=True)
    assert snapshot(tmp_path) == before
