"""A deployment's CA, the SuperLink's certificate and the SuperNodes' keys, and their checks.

Everything is made with the ``cryptography`` package (no openssl, no ssh-keygen) on ECDSA
P-384. Flower 1.41 wants, and this module makes:

- the SuperLink's ``--ssl-certfile``/``--ssl-keyfile``: a PEM certificate signed by the
  deployment's CA, its SANs every SuperLink host (IP addresses as IP SANs, names as DNS SANs)
  plus ``localhost`` and ``127.0.0.1``, and its key (PKCS#8 PEM);
- the SuperNodes' ``--root-certificates``: the CA's PEM certificate;
- a SuperNode's ``--auth-supernode-private-key``: an EC key on a NIST curve in the OpenSSH
  private format, unencrypted (Flower loads it with ``load_ssh_private_key``), and the
  ``.pub`` that ``flwr supernode register`` reads (``load_ssh_public_key``).

Private files are created with mode 0600 (never chmod-ed afterwards), every file is written
atomically and durably, and an existing file is replaced only when asked (``--force``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsparse.deploy.manifest import DeploymentError
from fedsparse.durable import fsync_dir, write_bytes

CURVE = ec.SECP384R1
CA_DAYS, SERVER_DAYS = 3650, 730
BACKDATE = dt.timedelta(hours=1)  # devices' clocks may lag the one that signed
ALWAYS_SANS = ("localhost", "127.0.0.1")
MAKE_NODE_KEY = ("make one with `fedsparse deploy add-node DIR`, or `ssh-keygen -t ecdsa "
                 "-b 384 -N \"\" -f FILE`")
_DNS_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*$")

Key = ec.EllipticCurvePrivateKey


def make_ca(common_name: str) -> tuple[Key, x509.Certificate]:
    """A self-signed CA (10 years) that may sign certificates and nothing else."""
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    cert = (_builder(name, name, public, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: Key, ca_cert: x509.Certificate,
                     hosts: list[str]) -> tuple[Key, x509.Certificate]:
    """A TLS server certificate (about 2 years) signed by the CA, valid for every host of
    ``hosts`` and for ``localhost`` and ``127.0.0.1``."""
    names = subject_alt_names(hosts)
    key = ec.generate_private_key(CURVE())
    public = key.public_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (_builder(subject, ca_cert.subject, public, SERVER_DAYS)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    """The SANs for ``hosts`` (an IP address as an IP SAN, anything else as a DNS name), then
    ``localhost`` and ``127.0.0.1``, without repeats; a host that is neither is refused."""
    names: list[x509.GeneralName] = []
    for host in [*hosts, *ALWAYS_SANS]:
        name = _general_name(host)
        if name not in names:
            names.append(name)
    return names


def make_node_key(comment: str = "") -> tuple[bytes, bytes]:
    """A SuperNode's key pair: (OpenSSH private key, unencrypted; OpenSSH public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + (f" {comment}".encode() if comment else b"") + b"\n"


def key_pem(key: Key) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (what ``--ssl-keyfile`` reads)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes, force: bool = False) -> Path:
    """Write a secret atomically and durably, mode 0600 from the moment the file exists (its
    folder, if new, 0700); an existing ``path`` is replaced only with ``force``."""
    _refuse_existing(path, force)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_public(path: Path, data: bytes, force: bool = False) -> Path:
    """Write a public file atomically and durably; an existing one only with ``force``."""
    _refuse_existing(path, force)
    return write_bytes(path, data)


def refuse_existing(paths: list[Path]) -> None:
    """Raise before anything is written if any of ``paths`` exists (the first one named)."""
    for path in paths:
        _refuse_existing(path, force=False)


def check_ca(path: Path) -> x509.Certificate:
    """The CA certificate at ``path``, or a :class:`DeploymentError` saying what is wrong."""
    cert = _load_cert(path, "the deployment's CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise DeploymentError(f"{path}: this certificate is not a CA (no BasicConstraints "
                              "CA=true); expected the ca.crt that `fedsparse deploy init` made")
    _check_dates(path, cert)
    return cert


def check_server_cert(cert_path: Path, ca_path: Path, key_path: Path,
                      hosts: list[str] | None = None) -> x509.Certificate:
    """The server certificate, checked against its CA, its key and (if given) the hosts its
    SANs must cover; a :class:`DeploymentError` names the file and what is wrong."""
    ca = check_ca(ca_path)
    cert = _load_cert(cert_path, "the SuperLink's certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise DeploymentError(f"{cert_path}: not signed by the CA in {ca_path} (issuer "
                              f"{cert.issuer.rfc4514_string()!r}); SuperNodes trusting that "
                              "CA would refuse it. Make both with `fedsparse deploy init`"
                              ) from None
    _check_dates(cert_path, cert)
    if _load_pem_key(key_path).public_key() != cert.public_key():
        raise DeploymentError(f"{key_path}: this key does not belong to the certificate "
                              f"{cert_path}")
    if hosts:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        missing = [h for h in hosts if _general_name(h) not in sans]
        if missing:
            raise DeploymentError(f"{cert_path}: its SANs do not cover {missing} (they are "
                                  f"{[str(n.value) for n in sans]}); SuperNodes connecting "
                                  "there would refuse it")
    return cert


def check_node_key(path: Path) -> ec.EllipticCurvePublicKey:
    """The public half of the SuperNode key at ``path`` (an unencrypted OpenSSH private key,
    EC on a NIST curve, as Flower loads it), or a :class:`DeploymentError` saying why not."""
    data = _read(path, "a SuperNode's private key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise DeploymentError(f"{path}: this key is encrypted; flower-supernode needs it "
                              f"without a passphrase ({MAKE_NODE_KEY})") from None
    except (ValueError, UnsupportedAlgorithm):
        found = ("a PEM key (PKCS#1, PKCS#8 or SEC1), not the OpenSSH format"
                 if data.lstrip().startswith(b"-----BEGIN") else "not an OpenSSH private key")
        raise DeploymentError(f"{path}: {found}; flower-supernode --auth-supernode-private-key "
                              "needs an ECDSA key on a NIST curve in the OpenSSH private format "
                              f"(-----BEGIN OPENSSH PRIVATE KEY-----); {MAKE_NODE_KEY}") from None
    return _ec_key(path, key.public_key())


def check_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """The SuperNode public key at ``path`` as ``flwr supernode register`` reads it (an
    OpenSSH public key line, EC on a NIST curve), or a :class:`DeploymentError`."""
    data = _read(path, "a SuperNode's public key")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise DeploymentError(f"{path}: not an OpenSSH public key; `flwr supernode register` "
                              "needs one line `ecdsa-sha2-nistp384 AAAA...` (the .pub beside "
                              f"the node's key); {MAKE_NODE_KEY}") from None
    return _ec_key(path, key)


def _builder(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days)))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False)


def _general_name(host: str) -> x509.GeneralName:
    bare = host.strip().removeprefix("[").removesuffix("]")
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if not _DNS_NAME.match(bare) or len(bare) > 253:
        raise DeploymentError(f"--superlink-host {host!r} is neither an IP address nor a DNS "
                              "name (give the host alone, without a port or scheme)")
    return x509.DNSName(bare.lower())


def _refuse_existing(path: Path, force: bool) -> None:
    if not force and (path.exists() or path.is_symlink()):
        raise DeploymentError(f"{path} already exists; pass --force to overwrite it")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DeploymentError(f"{path}: cannot read {what} ({err.strerror})") from None


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise DeploymentError(f"{path}: not a PEM certificate (-----BEGIN CERTIFICATE-----); "
                              f"expected {what}, as `fedsparse deploy init` makes it") from None


def _load_pem_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read(path, "a private key"), password=None)
    except TypeError:
        raise DeploymentError(f"{path}: this key is encrypted; the SuperLink needs it "
                              "without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise DeploymentError(f"{path}: not a PEM private key (-----BEGIN PRIVATE KEY-----); "
                              "expected the key of the SuperLink's certificate") from None


def _check_dates(path: Path, cert: x509.Certificate) -> None:
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        raise DeploymentError(f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}; make "
                              "new ones with `fedsparse deploy init --force`")
    if cert.not_valid_before_utc > now:
        raise DeploymentError(f"{path}: not valid before {cert.not_valid_before_utc}; is this "
                              "machine's clock right?")


def _ec_key(path: Path, key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.replace("PublicKey", "")
        raise DeploymentError(f"{path}: key type {kind}; Flower's node authentication needs an "
                              f"ECDSA key on a NIST curve in the OpenSSH format; {MAKE_NODE_KEY}")
    return key  # OpenSSH's ECDSA keys are on NIST curves only (nistp256, nistp384, nistp521)

