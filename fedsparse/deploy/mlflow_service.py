"""MLflow as a deployment's service: a tracking server behind MLflow's basic authentication.

The server keeps experiments, runs and metrics in PostgreSQL (``mlflow_backend =
"postgresql"``; or SQLite in ``DIR/state/mlflow/mlflow.db``, the light alternative), serves
artifacts itself from ``DIR/state/mlflow/artifacts`` (clients upload and download through it,
with the same credentials) and speaks HTTPS with the SuperLink's certificate unless the
deployment is insecure. Every request but ``/health`` needs the username and password of
``DIR/secrets/mlflow.toml``: an anonymous one is answered 401, whatever a user's grants.

A PostgreSQL that the deployment manages (``postgres_host = ""``) lives in
``DIR/state/postgres``: its data folder belongs to an unprivileged user (``postgres`` when we
are root, since ``initdb`` refuses to run as root; otherwise the current user), it listens on
127.0.0.1 only and wants a password (scram-sha-256) from everyone, its own user included.

Passwords stay out of every command line (``ps`` shows argv to all users): the backend-store
URI reaches ``mlflow server`` as ``MLFLOW_BACKEND_STORE_URI``, the admin's password as
``MLFLOW_AUTH_ADMIN_PASSWORD``, and ``initdb`` reads its password from a file it alone can read.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2

from fedsparse.deploy.daemons import user_kwargs
from fedsparse.deploy.init import POSTGRES_ROLE, read_secrets
from fedsparse.deploy.manifest import DeploymentError, Manifest
from fedsparse.deploy.programs import CA, SERVER_CERT, SERVER_KEY, Program, scheme
from fedsparse.runtime_env import NO_PHONE_HOME

POSTGRES_STATE = "state/postgres"  # the data folder and the unix socket's folder
MLFLOW_STATE = "state/mlflow"  # basic_auth.ini, auth.db, artifacts/ (and mlflow.db)
POSTGRES_DATABASE = POSTGRES_ROLE  # the cluster's (only) role owns MLflow's database
DEBIAN_POSTGRES = Path("/usr/lib/postgresql")  # <version>/bin: the server's programs
SOCKET_PATH_MAX = 107  # AF_UNIX: sun_path is 108 bytes with its NUL
INSTALL_HINT = ("install PostgreSQL's server (Debian: `apt-get install postgresql`), or set "
                "postgres_host in deployment.toml to a PostgreSQL of your own, or choose "
                "`deploy init --mlflow-backend sqlite`")


def postgres_bin(name: str) -> str:
    """The path of PostgreSQL's program ``name`` (``initdb``, ``postgres``): Debian keeps the
    server's programs off PATH, in ``/usr/lib/postgresql/<version>/bin`` (newest wins)."""
    versions = DEBIAN_POSTGRES.iterdir() if DEBIAN_POSTGRES.is_dir() else []
    folders = [v / "bin" for v in sorted((v for v in versions if v.name.isdigit()),
                                         key=lambda v: int(v.name), reverse=True)]
    folders += [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    for folder in folders:
        if os.access(folder / name, os.X_OK):
            return str(folder / name)
    raise DeploymentError(f"PostgreSQL's {name} is not installed: {INSTALL_HINT}")


def postgres_user() -> str:
    """Whom the managed PostgreSQL runs as: ``postgres`` when we are root, "" (the current
    user) otherwise."""
    if os.geteuid() != 0:
        return ""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise DeploymentError("PostgreSQL refuses to run as root and there is no `postgres` "
                              f"user to run it as: {INSTALL_HINT} (the package creates the "
                              "user)") from None
    return "postgres"


def postgres_setup(directory: Path, manifest: Manifest) -> None:
    """Create the managed cluster in ``DIR/state/postgres/data`` (``initdb`` as
    :func:`postgres_user`) unless it exists; its one role is ``mlflow`` with the secrets'
    ``postgres_password``."""
    _require_managed(manifest)
    state, data = directory / POSTGRES_STATE, _data(directory)
    if (data / "PG_VERSION").is_file():
        return
    user = postgres_user()
    state.mkdir(parents=True, exist_ok=True)
    _sockets(directory).mkdir(exist_ok=True)
    if user:
        entry = pwd.getpwnam(user)
        _require_traversable(state, user, user_kwargs(user))
        for path in (state, _sockets(directory)):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(state, 0o700)
    pwfile = state / ".initdb-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(_secrets(directory)["postgres_password"] + "\n")
        if user:
            os.chown(pwfile, pwd.getpwnam(user).pw_uid, -1)
        done = subprocess.run(
            [postgres_bin("initdb"), "-D", str(data), "-U", POSTGRES_ROLE,
             "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-locale"],
            cwd=state, capture_output=True, text=True, **user_kwargs(user))
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise DeploymentError(f"initdb of {data} failed (exit {done.returncode}):\n"
                              f"{done.stderr.strip() or done.stdout.strip()}")


def postgres(directory: Path, manifest: Manifest) -> Program:
    """The managed PostgreSQL in the foreground: 127.0.0.1 and ``postgres_port`` only, its
    unix socket in ``DIR/state/postgres/run`` (none, TCP only, where that path would be
    longer than AF_UNIX allows). SIGINT stops it at once; SIGTERM waits for its clients."""
    _require_managed(manifest)
    sockets = _sockets(directory)
    if len(str(sockets / f".s.PGSQL.{manifest.postgres_port}")) > SOCKET_PATH_MAX:
        sockets = ""
    argv = [postgres_bin("postgres"), "-D", str(_data(directory)),
            "-c", "listen_addresses=127.0.0.1", "-c", f"port={manifest.postgres_port}",
            "-c", f"unix_socket_directories={sockets}", "-c", "unix_socket_permissions=0700"]
    return Program("postgres", argv, user=postgres_user(), cwd=str(directory / POSTGRES_STATE))


def postgres_ready(directory: Path, manifest: Manifest) -> bool:
    """Whether PostgreSQL (managed or ``postgres_host``) accepts the ``mlflow`` role now."""
    try:
        with closing(_connect(directory, manifest, "postgres")):
            return True
    except psycopg2.OperationalError:
        return False


def ensure_database(directory: Path, manifest: Manifest) -> None:
    """Create MLflow's database ``mlflow`` once PostgreSQL runs, unless it exists."""
    with closing(_connect(directory, manifest, "postgres")) as conn:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (POSTGRES_DATABASE,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{POSTGRES_DATABASE}"')


def backend_store_uri(directory: Path, manifest: Manifest) -> str:
    """MLflow's backend store (with the PostgreSQL password: never put it on a command line)."""
    if manifest.mlflow_backend == "sqlite":
        return f"sqlite:///{directory / MLFLOW_STATE / 'mlflow.db'}"
    password = quote(_secrets(directory)["postgres_password"], safe="")
    return (f"postgresql+psycopg2://{POSTGRES_ROLE}:{password}@{_postgres_host(manifest)}:"
            f"{manifest.postgres_port}/{POSTGRES_DATABASE}")


def mlflow_setup(directory: Path, manifest: Manifest) -> None:
    """Write ``DIR/state/mlflow/basic_auth.ini`` (no secret in it) and make the artifacts'
    folder; run before :func:`mlflow`'s program starts."""
    state = directory / MLFLOW_STATE
    (state / "artifacts").mkdir(parents=True, exist_ok=True)
    # NO_PERMISSIONS: a user the admin adds later sees nothing until granted; anonymous
    # requests are refused (401) before any permission is looked at.
    (state / "basic_auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{state / 'auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def mlflow(directory: Path, manifest: Manifest) -> Program:
    """``mlflow server`` with basic auth on ``mlflow_bind:mlflow_port``, serving artifacts
    from ``DIR/state/mlflow/artifacts``; HTTPS with the SuperLink's certificate unless the
    deployment is insecure. The admin (the secrets' username) is created on first start;
    later changes of its password in the secrets are not applied to an existing auth.db."""
    secrets, state = _secrets(directory), directory / MLFLOW_STATE
    argv = ["mlflow", "server", "--app-name", "basic-auth",
            "--host", manifest.mlflow_bind, "--port", str(manifest.mlflow_port),
            "--serve-artifacts", "--artifacts-destination", str(state / "artifacts"),
            "--allowed-hosts", ",".join(_allowed_hosts(manifest))]
    if not manifest.insecure:
        argv += ["--uvicorn-opts", shlex.join([
            "--ssl-certfile", str(directory / SERVER_CERT),
            "--ssl-keyfile", str(directory / SERVER_KEY)])]
    env = {**NO_PHONE_HOME,
           "MLFLOW_BACKEND_STORE_URI": backend_store_uri(directory, manifest),
           "MLFLOW_AUTH_CONFIG_PATH": str(state / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": secrets["username"],
           "MLFLOW_AUTH_ADMIN_PASSWORD": secrets["password"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets["secret_key"],
           # the GenAI job runner (huey workers) is not needed, and it would call this
           # server back over plain http
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    local = "127.0.0.1" if manifest.mlflow_bind in ("0.0.0.0", "::", "") else \
        manifest.mlflow_bind
    return Program("mlflow", argv, env=env, cwd=str(state),
                   health_url=f"{scheme(manifest)}://{_url_host(local)}:"
                              f"{manifest.mlflow_port}/health")


def tracking_env(directory: Path, manifest: Manifest) -> dict[str, str]:
    """What an MLflow client (the ServerApp, a user's script) needs to reach the server:
    its URI on ``mlflow_host``, the credentials, and the deployment's CA under HTTPS."""
    secrets = _secrets(directory)
    env = {"MLFLOW_TRACKING_URI": f"{scheme(manifest)}://{_url_host(manifest.mlflow_host)}:"
                                  f"{manifest.mlflow_port}",
           "MLFLOW_TRACKING_USERNAME": secrets["username"],
           "MLFLOW_TRACKING_PASSWORD": secrets["password"]}
    if not manifest.insecure:
        env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(directory / CA)
    return env


def _secrets(directory: Path) -> dict[str, str]:
    """The deployment's credentials (``init.read_secrets``), flat: ``username``,
    ``password``, ``secret_key`` (MLflow) and ``postgres_password``."""
    secrets = read_secrets(directory)
    return {**secrets["mlflow"], "postgres_password": secrets["postgres"]["password"]}


def _allowed_hosts(manifest: Manifest) -> list[str]:
    """The Host headers MLflow accepts: the names clients use, with and without the port."""
    names = ["127.0.0.1", "localhost", manifest.mlflow_host, *manifest.superlink_hosts]
    if manifest.mlflow_bind not in ("0.0.0.0", "::", ""):
        names.append(manifest.mlflow_bind)
    hosts = [_url_host(name) for name in dict.fromkeys(names)]
    return [h for host in hosts for h in (host, f"{host}:{manifest.mlflow_port}")]


def _connect(directory: Path, manifest: Manifest, database: str):
    return psycopg2.connect(host=_postgres_host(manifest), port=manifest.postgres_port,
                            user=POSTGRES_ROLE, dbname=database, connect_timeout=3,
                            password=_secrets(directory)["postgres_password"])


def _require_managed(manifest: Manifest) -> None:
    if manifest.postgres_host:
        raise DeploymentError(f"this deployment's PostgreSQL is {manifest.postgres_host}, "
                              "not one that it manages")


def _require_traversable(path: Path, user: str, ids: dict[str, Any]) -> None:
    """``user`` (``ids``: :func:`user_kwargs`) must be able to reach ``path``: every folder
    above it searchable for that user (by its owner, group or other bit)."""
    gids = {ids["group"], *ids["extra_groups"]}
    for folder in path.resolve().parents:
        st = folder.stat()
        bit = 0o100 if st.st_uid == ids["user"] else 0o010 if st.st_gid in gids else 0o001
        if not st.st_mode & bit:
            raise DeploymentError(
                f"PostgreSQL runs as {user!r}, who cannot enter {folder} (mode "
                f"{st.st_mode & 0o777:o}): put the deployment folder where {user!r} can "
                f"reach it, or `chmod o+x {folder}`")


def _data(directory: Path) -> Path:
    return directory / POSTGRES_STATE / "data"


def _sockets(directory: Path) -> Path:
    return directory / POSTGRES_STATE / "run"


def _postgres_host(manifest: Manifest) -> str:
    return manifest.postgres_host or "127.0.0.1"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
