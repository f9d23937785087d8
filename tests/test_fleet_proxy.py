"""``fedsparse-fleet-proxy``: only ``POST /v1/fleet/<name>`` and ``GET /health`` get through.

The first tests put the proxy (plain HTTP, as in an insecure deployment) in front of a
recording HTTP server, so that what reaches the upstream, and what does not, is seen
exactly; requests are sent with ``http.client``, which sends the request target as given
(httpx would normalise ``..`` away). The deployment tests put it in front of a real TLS
``flower-superlink`` with SuperNode authentication and connect a ``flower-supernode``
through it.
"""

from __future__ import annotations

import http.client
import http.server
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedsparse.deploy.proxy import allowed, parse_args
from fedsparse.launch import free_port, stop_tree
from tests.fleet_link import (
    BIN,
    Certs,
    flower_env,
    make_certs,
    make_node_key,
    proxy_argv,
    started,
    superlink_argv,
    tls_context,
    wait_healthy,
)

REFUSED = [
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/list-nodes"),
    ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/runtime/responses"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
    ("GET", "/v1/fleet/pull-messages"),  # right path, wrong method
    ("PUT", "/v1/fleet/push-object"),
    ("HEAD", "/health"),
    ("POST", "/health"),
    ("POST", "/v1/fleet/../control/start-run"),
    ("POST", "/v1/fleet/%2e%2e/control/start-run"),
    ("POST", "/v1/fleet/%2E%2E/control/start-run"),
    ("POST", "/v1/fleet/.%2e/control/start-run"),
    ("POST", "/v1/fleet/%2e%2e%2fcontrol%2fstart-run"),
    ("POST", "/v1/fleet/..%2fcontrol%2fstart-run"),
    ("POST", "/v1/fleet/pull-messages%2f..%2f..%2fcontrol%2fstart-run"),
    ("POST", "/v1/fleet/..%5ccontrol%5cstart-run"),
    ("POST", "/v1/fleet//x"),
    ("POST", "/v1/fleet/"),
    ("POST", "/v1/fleet"),
    ("POST", "//v1/fleet/pull-messages"),
    ("POST", "/v1//fleet/pull-messages"),
    ("POST", "/v1/fleet/./pull-messages"),
    ("POST", "/v1/fleet/pull-messages/"),
    ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
    ("POST", "/v1/fleet/pull%2dmessages"),  # an encoded harmless byte is refused too
    ("POST", "/V1/control/start-run"),
    ("POST", "/V1/FLEET/pull-messages"),
    ("POST", "/v1/fleet/Pull-Messages"),
    ("POST", "/v1/fleet/pull-messages?x=1"),  # query strings: refused (Flower sends none)
    ("GET", "/health?x=1"),
    ("POST", "/v1/fleet/pull-messages;x=1"),
    ("POST", "/v1/fleet/pull-messages\\..\\control"),
    ("POST", "http://127.0.0.1/v1/control/start-run"),  # absolute-form target
]
ALLOWED = [("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/push-object"),
           ("POST", "/v1/fleet/send-node-heartbeat"), ("GET", "/health")]


def test_allowed_is_an_exact_allowlist():
    for method, target in ALLOWED:
        assert allowed(method, target.encode(), b"")
    for method, target in REFUSED:
        path, _, query = target.partition("?")
        assert not allowed(method, path.encode(), query.encode()), (method, target)


def test_arguments_are_checked():
    args = parse_args(["--listen", "[::]:8000", "--upstream", "http://127.0.0.1:8010"])
    assert args.listen == ("::", 8000) and args.certfile is None
    for bad in (["--listen", "8000", "--upstream", "http://x:1"],
                ["--listen", "h:1", "--upstream", "127.0.0.1:8010"],
                ["--listen", "h:1", "--upstream", "https://x:1", "--certfile", "c"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


# -- the proxy in front of a recording upstream -------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    port: int
    seen: list[Seen] = field(default_factory=list)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """An HTTP server on 127.0.0.1 that records every request and answers 200."""
    record = Upstream(0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length", 0))
            body = self.rfile.read(length)
            record.seen.append(Seen(self.command, self.path,
                                    {k.lower(): v for k, v in self.headers.items()}, body))
            reply = b"upstream:" + body[:16]
            self.send_response(201)
            self.send_header("content-type", "application/protobuf")
            self.send_header("flwr-version-incompatibility-message", "none")
            self.send_header("keep-alive", "timeout=5")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_PUT = do_HEAD = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield record
    server.shutdown()
    server.server_close()


@dataclass
class Proxy:
    proc: subprocess.Popen
    port: int
    log: Path


@pytest.fixture
def proxy(upstream: Upstream, tmp_path: Path) -> Iterator[Proxy]:
    port, log = free_port(), tmp_path / "proxy.log"
    argv = [str(BIN / "fedsparse-fleet-proxy"), "--listen", f"127.0.0.1:{port}",
            "--upstream", f"http://127.0.0.1:{upstream.port}", "--max-body", "1000000"]
    with started(argv, log, flower_env(tmp_path)) as proc:
        _wait_listening(port, proc, log)
        yield Proxy(proc, port, log)


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            status, _, _ = send("127.0.0.1", port, "GET", "/no-such-path")
            if status == 404:
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the proxy is not listening on {port}: {log.read_text()}")


def send(host: str, port: int, method: str, target: str, *, body: bytes = b"",
         headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
         timeout: float = 10) -> tuple[int, bytes, http.client.HTTPMessage]:
    """One request with ``target`` sent verbatim; -> status, body, headers."""
    conn = (http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
            if context else http.client.HTTPConnection(host, port, timeout=timeout))
    try:
        conn.request(method, target, body=body or None, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read(), reply.headers
    finally:
        conn.close()


def test_refused_requests_get_404_and_never_reach_the_upstream(upstream: Upstream,
                                                               proxy: Proxy):
    for method, target in REFUSED:
        status, body, _ = send("127.0.0.1", proxy.port, method, target, body=b"x" * 10)
        assert status == 404, (method, target, status, body)
    assert upstream.seen == []
    # one WARNING line per refused request, with its method, target and client
    warnings = [line for line in proxy.log.read_text().splitlines() if "refused" in line]
    assert any("WARNING" in w and "POST '/v1/control/start-run' from 127.0.0.1:" in w
               for w in warnings), warnings
    assert len(warnings) == len(REFUSED) + 1  # and the readiness probe's /no-such-path


def test_fleet_requests_are_forwarded_with_flower_headers_only(upstream: Upstream,
                                                               proxy: Proxy):
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf",
               "flwr-public-key": "cGs=", "flwr-signature": "c2ln",
               "flwr-timestamp": "2026-01-01T00:00:00+00:00", "flwr-package-version": "1.41.0",
               "authorization": "Bearer secret", "cookie": "a=b", "x-forwarded-for": "1.2.3.4",
               "connection": "keep-alive, x-drop", "x-drop": "1", "host": "evil.example"}
    body = bytes(range(256)) * 40
    status, reply, reply_headers = send("127.0.0.1", proxy.port, "POST",
                                        "/v1/fleet/push-object", body=body, headers=headers)
    assert status == 201 and reply == b"upstream:" + body[:16]
    assert reply_headers["content-type"] == "application/protobuf"
    assert reply_headers["flwr-version-incompatibility-message"] == "none"
    assert "keep-alive" not in reply_headers
    [seen] = upstream.seen
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/fleet/push-object", body)
    for name in ("content-type", "accept", "flwr-public-key", "flwr-signature",
                 "flwr-timestamp", "flwr-package-version"):
        assert seen.headers[name] == headers[name]
    for name in ("authorization", "cookie", "x-forwarded-for", "x-drop"):
        assert name not in seen.headers
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert send("127.0.0.1", proxy.port, "GET", "/health")[0] == 201
    assert [s.path for s in upstream.seen] == ["/v1/fleet/push-object", "/health"]


def test_bodies_over_the_limit_get_413_before_the_upstream(upstream: Upstream, proxy: Proxy):
    status, _, _ = send("127.0.0.1", proxy.port, "POST", "/v1/fleet/push-object",
                        body=b"x" * 1_000_001)
    assert status == 413
    # without a content-length (chunked), the limit holds while reading
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("POST", "/v1/fleet/push-object", body=iter([b"x" * 600_000] * 2),
                 encode_chunked=True, headers={"transfer-encoding": "chunked"})
    assert conn.getresponse().status == 413
    conn.close()
    assert upstream.seen == []
    assert send("127.0.0.1", proxy.port, "POST", "/v1/fleet/push-object",
                body=b"x" * 1_000_000)[0] == 201


def test_upstream_down_gives_502_and_sigterm_exits_0(tmp_path: Path):
    port, log = free_port(), tmp_path / "proxy.log"
    dead = free_port()
    argv = [str(BIN / "fedsparse-fleet-proxy"), "--listen", f"127.0.0.1:{port}",
            "--upstream", f"http://127.0.0.1:{dead}"]
    with started(argv, log, flower_env(tmp_path)) as proc:
        _wait_listening(port, proc, log)
        status, body, _ = send("127.0.0.1", port, "POST", "/v1/fleet/pull-messages",
                               body=b"\x00")
        assert status == 502
        assert f"the SuperLink at http://127.0.0.1:{dead} is unreachable" in body.decode()
        stop_tree(proc)
        assert proc.returncode == 0
    assert "Traceback" not in log.read_text()


# -- a real TLS SuperLink with SuperNode authentication behind the proxy ------------------


@dataclass
class Link:
    certs: Certs
    direct: int  # the SuperLink's own port
    proxy: int
    home: Path  # FLWR_HOME with connection "direct" (config.toml)


@pytest.fixture
def link(tmp_path: Path) -> Iterator[Link]:
    certs = make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"])
    direct, proxy_port, home = free_port(), free_port(), tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "direct"\n[superlink.direct]\n'
        f'address = "127.0.0.1:{direct}"\nroot-certificates = "{certs.ca}"\n')
    env = flower_env(home)
    with started(superlink_argv(certs, direct, node_auth=True), tmp_path / "superlink.log",
                 env) as superlink:
        wait_healthy(f"https://127.0.0.1:{direct}/health", certs.ca, superlink,
                     tmp_path / "superlink.log")
        with started(proxy_argv(certs, f"127.0.0.1:{proxy_port}", direct),
                     tmp_path / "proxy.log", env) as proxy:
            wait_healthy(f"https://localhost:{proxy_port}/health", certs.ca, proxy,
                         tmp_path / "proxy.log")
            yield Link(certs, direct, proxy_port, home)


@pytest.mark.deployment
def test_control_and_runtime_paths_are_404_through_the_proxy(link: Link):
    context = tls_context(link.certs.ca)
    assert send("127.0.0.1", link.proxy, "GET", "/health", context=context)[0] == 200
    for method, target in REFUSED:
        status, _, _ = send("127.0.0.1", link.proxy, method, target, context=context,
                            body=b"\x00", headers={"content-type": "application/protobuf"})
        assert status == 404, (method, target, status)
    # ... while the SuperLink itself has these routes (so the 404s above are the proxy's)
    for target in ("/v1/control/start-run", "/v1/control/list-nodes",
                   "/v1/runtime/acquire-task"):
        status, _, _ = send("127.0.0.1", link.direct, "POST", target, context=context,
                            body=b"\x00", headers={"content-type": "application/protobuf"})
        assert status not in (404, 405), (target, status)
    # a device trusting another CA is refused at the handshake
    other = make_certs(link.home / "other", ["localhost"])
    with pytest.raises(ssl.SSLCertVerificationError):
        send("127.0.0.1", link.proxy, "GET", "/health", context=tls_context(other.ca))


@pytest.mark.deployment
def test_an_authenticated_supernode_connects_through_the_proxy(link: Link, tmp_path: Path):
    env = flower_env(link.home)
    public = make_node_key(tmp_path / "node.key")
    flwr = [str(BIN / "flwr"), "supernode"]
    registered = subprocess.run([*flwr, "register", str(public), "direct", "--format", "json"],
                                env=env, check=True, capture_output=True, text=True,
                                timeout=60)
    node_id = str(json.loads(registered.stdout)["node-id"])

    def nodes() -> list[tuple[str, str]]:
        listing = subprocess.run([*flwr, "ls", "direct", "--format", "json"], env=env,
                                 check=True, capture_output=True, text=True, timeout=60)
        return [(n["node-id"], n["status"]) for n in json.loads(listing.stdout)["nodes"]]

    assert nodes() == [(node_id, "registered")]
    node_home = tmp_path / "node-home"
    node_home.mkdir()
    argv = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link.proxy}",
            "--root-certificates", str(link.certs.ca),
            "--auth-supernode-private-key", str(tmp_path / "node.key"),
            "--host", "127.0.0.1", "--port", str(free_port()), "--isolation", "subprocess",
            "--max-retries", "0"]
    log = tmp_path / "supernode.log"
    with started(argv, log, flower_env(node_home)) as supernode:
        deadline = time.monotonic() + 60
        while nodes() != [(node_id, "online")]:
            assert supernode.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (nodes(), log.read_text()[-3000:])
            time.sleep(1)
