"""MLflow as a deployment's service: PostgreSQL (as an unprivileged user) and ``mlflow server``
started from their Programs, used through MLflow's client with ``tracking_env``, refusing
anonymous and wrongly authenticated requests; the SQLite variant over plain HTTP."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import psutil
import pytest
import tomli_w

from fedsparse.deploy import daemons, mlflow_service, pki
from fedsparse.deploy.init import SECRETS as SECRETS_FILE
from fedsparse.deploy.manifest import DeploymentError, Manifest
from fedsparse.deploy.programs import CA, SERVER_CERT, SERVER_KEY, Program

pytestmark = pytest.mark.deployment

try:
    mlflow_service.postgres_bin("initdb")
    mlflow_service.postgres_user()
    NO_POSTGRES = ""
except DeploymentError as err:
    NO_POSTGRES = str(err)
LOGS: dict[int, Path] = {}  # pid -> the output of a service that running() started

SECRETS = {"mlflow": {"username": "fedsparse-admin", "password": "s3cret pass/word:%",
                      "secret_key": "k" * 32},
           "postgres": {"username": "mlflow", "password": "pg pass@word/&"}}
PASSWORDS = (SECRETS["mlflow"]["password"], SECRETS["postgres"]["password"])


def write_secrets(directory: Path) -> None:
    """The credentials file as ``deploy init`` writes it (0600)."""
    path = directory / SECRETS_FILE
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(tomli_w.dumps(SECRETS))
    path.chmod(0o600)


@pytest.fixture
def directory() -> Iterator[Path]:
    """A deployment folder under /tmp that PostgreSQL's user can reach (pytest's tmp_path
    sits in a 0700 folder of root's), with MLflow's secrets and a CA-signed certificate."""
    path = Path(tempfile.mkdtemp(prefix="fedsparse-mlflow-", dir="/tmp"))
    try:
        path.chmod(0o711)
        write_secrets(path)
        _write_certificates(path)
        yield path
    finally:
        shutil.rmtree(path)


def test_mlflow_on_postgresql_over_https_refuses_anonymous_and_wrong_password(
        directory: Path, monkeypatch: pytest.MonkeyPatch):
    if NO_POSTGRES:
        pytest.skip(NO_POSTGRES)
    manifest = Manifest(superlink_hosts=["127.0.0.1"], nodes=[], mlflow_port=_free_port(),
                        postgres_port=_free_port())
    mlflow_service.postgres_setup(directory, manifest)
    version = directory / "state/postgres/data/PG_VERSION"
    made = version.stat().st_mtime_ns
    mlflow_service.postgres_setup(directory, manifest)  # idempotent
    assert version.stat().st_mtime_ns == made
    program = mlflow_service.postgres(directory, manifest)
    assert program.user == ("postgres" if os.geteuid() == 0 else "")
    with running(program) as pg:
        assert _wait(lambda: mlflow_service.postgres_ready(directory, manifest), pg, 60)
        if os.geteuid() == 0:
            assert psutil.Process(pg.pid).username() == "postgres"
        mlflow_service.ensure_database(directory, manifest)
        mlflow_service.ensure_database(directory, manifest)  # idempotent
        mlflow_service.mlflow_setup(directory, manifest)
        server = mlflow_service.mlflow(directory, manifest)
        assert server.health_url.startswith("https://")
        with running(server) as proc:
            context = ssl.create_default_context(cafile=str(directory / CA))
            assert _wait(lambda: _healthy(server.health_url, context), proc, 120)
            # no password on any command line of the services (ps shows argv to everyone)
            cmdlines = [" ".join(p.cmdline()) for p in _tree(pg) + _tree(proc)]
            assert not [c for c in cmdlines for s in PASSWORDS if s in c]
            env = mlflow_service.tracking_env(directory, manifest)
            assert env["MLFLOW_TRACKING_URI"].startswith("https://127.0.0.1:")
            assert env["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(directory / CA)
            exp_id, run_id = _log_and_read_back(env, monkeypatch, directory)
            _check_refusals(env, context, exp_id, run_id)
            with closing(_pg_connect(manifest)) as conn, conn.cursor() as cursor:
                cursor.execute("SELECT run_uuid FROM runs")
                assert [r[0] for r in cursor.fetchall()] == [run_id]
    logs = LOGS[pg.pid].read_text() + LOGS[proc.pid].read_text()
    assert "Created admin user 'fedsparse-admin'" in logs
    assert not [s for s in PASSWORDS if s in logs]


def test_mlflow_on_sqlite_over_http(directory: Path, monkeypatch: pytest.MonkeyPatch):
    manifest = Manifest(superlink_hosts=["127.0.0.1"], nodes=[], insecure=True,
                        mlflow_backend="sqlite", mlflow_port=_free_port())
    mlflow_service.mlflow_setup(directory, manifest)
    server = mlflow_service.mlflow(directory, manifest)
    assert "--uvicorn-opts" not in server.argv and server.health_url.startswith("http://")
    with running(server) as proc:
        assert _wait(lambda: _healthy(server.health_url, None), proc, 120)
        env = mlflow_service.tracking_env(directory, manifest)
        assert "MLFLOW_TRACKING_SERVER_CERT_PATH" not in env
        exp_id, run_id = _log_and_read_back(env, monkeypatch, directory)
        _check_refusals(env, None, exp_id, run_id)
    with closing(sqlite3.connect(directory / "state/mlflow/mlflow.db")) as db:
        assert db.execute("SELECT run_uuid FROM runs").fetchall() == [(run_id,)]


def test_postgres_uses_tcp_only_where_the_socket_path_would_be_too_long(tmp_path: Path):
    if NO_POSTGRES:
        pytest.skip(NO_POSTGRES)
    manifest = Manifest(superlink_hosts=["127.0.0.1"], nodes=[])
    short = mlflow_service.postgres(tmp_path, manifest)
    assert f"unix_socket_directories={tmp_path}/state/postgres/run" in short.argv
    deep = tmp_path / ("d" * 90)
    assert "unix_socket_directories=" in mlflow_service.postgres(deep, manifest).argv
    assert "listen_addresses=127.0.0.1" in short.argv


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL changes user only under root")
def test_a_folder_postgres_cannot_enter_is_a_clear_error(tmp_path: Path):
    if NO_POSTGRES:
        pytest.skip(NO_POSTGRES)
    # pytest's tmp_path lies in root's 0700 /tmp/pytest-of-root
    write_secrets(tmp_path)
    with pytest.raises(DeploymentError, match="'postgres', who cannot enter"):
        mlflow_service.postgres_setup(tmp_path, Manifest(superlink_hosts=["h"], nodes=[]))
    assert not (tmp_path / "state/postgres/data").exists()


def test_missing_secrets_and_external_postgres_are_clear_errors(tmp_path: Path):
    manifest = Manifest(superlink_hosts=["127.0.0.1"], nodes=[])
    with pytest.raises(DeploymentError, match=r"secrets/mlflow\.toml: cannot read the "
                                              r"deployment.s credentials"):
        mlflow_service.mlflow(tmp_path, manifest)
    manifest.postgres_host = "db.example"
    with pytest.raises(DeploymentError, match="not one that it manages"):
        mlflow_service.postgres_setup(tmp_path, manifest)


def _log_and_read_back(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                       directory: Path) -> tuple[str, str]:
    """Through MLflow's client, authenticated by ``env``: an experiment, a run with a
    parameter, a metric and an artifact, all read back. Returns (experiment id, run id)."""
    from mlflow.tracking import MlflowClient

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp_id = client.create_experiment("deployment-check")
    run_id = client.create_run(exp_id).info.run_id
    client.log_param(run_id, "alpha", "0.5")
    client.log_metric(run_id, "accuracy", 0.875, step=2)
    note = directory / "note.txt"
    note.write_text("sent through the tracking server\n")
    client.log_artifact(run_id, str(note))
    client.set_terminated(run_id)
    run = client.get_run(run_id)
    assert run.data.params == {"alpha": "0.5"} and run.data.metrics == {"accuracy": 0.875}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    back = Path(client.download_artifacts(run_id, "note.txt", str(directory / "back")))
    assert back.read_text() == note.read_text()
    stored = directory / f"state/mlflow/artifacts/{exp_id}/{run_id}/artifacts/note.txt"
    assert stored.read_text() == note.read_text()  # served from the deployment's folder
    return exp_id, run_id


def _check_refusals(env: dict[str, str], context: ssl.SSLContext | None, exp_id: str,
                    run_id: str) -> None:
    """Anonymous and wrong-password requests get 401 where the right credentials get 200."""
    base = env["MLFLOW_TRACKING_URI"]
    search = (f"{base}/api/2.0/mlflow/experiments/search", b'{"max_results": 10}')
    artifact = (f"{base}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/"
                "note.txt", None)
    right = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    for url, body in (search, artifact):
        assert _status(url, body, right, context) == 200
        assert _status(url, body, None, context) == 401
        assert _status(url, body, (right[0], "not-the-password"), context) == 401


def _status(url: str, body: bytes | None, auth: tuple[str, str] | None,
            context: ssl.SSLContext | None) -> int:
    headers = {"Content-Type": "application/json"} if body else {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


@contextmanager
def running(program: Program) -> Iterator[subprocess.Popen]:
    """``program`` in a session of its own (as ``program.user``), its output in
    ``LOGS[pid]``; on exit the whole session is stopped (SIGINT: PostgreSQL's fast shutdown,
    MLflow's graceful one), killed if slow."""
    cwd = Path(program.cwd)
    env = {**os.environ, **program.env,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    path = cwd.parent / f"{program.name}.log"
    with open(path, "wb") as log:
        proc = subprocess.Popen(program.argv, env=env, cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                **daemons.user_kwargs(program.user))
    LOGS[proc.pid] = path
    try:
        yield proc
    finally:
        _stop_session(proc)


def _stop_session(proc: subprocess.Popen) -> None:
    members = _session(proc.pid)
    for sig in (signal.SIGINT, signal.SIGKILL):
        for member in members:
            with suppress(psutil.NoSuchProcess):
                member.send_signal(sig)
        _, members = psutil.wait_procs(members, timeout=30)
        if not members:
            break
    proc.wait(timeout=10)
    assert not [p for p in _session(proc.pid) if p.status() != psutil.STATUS_ZOMBIE]


def _session(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:2]} exited with {proc.returncode} before it was ready:\n"
                        f"{LOGS[proc.pid].read_text()[-3000:]}")
        time.sleep(0.25)
    return False


def _healthy(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _pg_connect(manifest: Manifest):
    import psycopg2

    return psycopg2.connect(host="127.0.0.1", port=manifest.postgres_port, user="mlflow",
                            dbname="mlflow", password=SECRETS["postgres"]["password"])


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_certificates(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 and localhost, as ``deploy init`` makes."""
    ca_key, ca = pki.make_ca("test CA")
    key, cert = pki.make_server_cert(ca_key, ca, ["127.0.0.1"])
    pki.write_public(directory / CA, pki.cert_pem(ca))
    pki.write_public(directory / SERVER_CERT, pki.cert_pem(cert))
    pki.write_private(directory / SERVER_KEY, pki.key_pem(key))
