"""``tests/netns.py``'s hosts are separate hosts, and on them a device reaches the SuperLink
host's Fleet proxy at its address but neither the Control API nor the SuperLink's own port."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedsparse.launch import free_port
from tests import netns
from tests.fleet_link import (
    flower_env,
    make_certs,
    proxy_argv,
    started,
    superlink_argv,
)

if reason := netns.available():
    pytest.skip(reason, allow_module_level=True)

SERVE = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(b"hello")
    conn.close()
"""
# connect to each (host, port) of argv; print {"host:port": reply or the error's name}
CONNECT = """
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as conn:
            out[target] = conn.recv(16).decode()
    except OSError as exc:
        out[target] = type(exc).__name__
print(json.dumps(out))
"""
# argv: CA, WAIT, then METHOD URL pairs; print [status or the error's name, ...]; each
# request is retried until it answers 200 or WAIT seconds have passed
HTTPS = """
import json, ssl, sys, time, urllib.error, urllib.request
context = ssl.create_default_context(cafile=sys.argv[1])
out, wait, pairs = [], float(sys.argv[2]), sys.argv[3:]
for method, url in zip(pairs[::2], pairs[1::2]):
    deadline = time.monotonic() + wait
    while True:
        try:
            request = urllib.request.Request(url, method=method,
                                             data=b"\\0" if method == "POST" else None)
            with urllib.request.urlopen(request, timeout=3, context=context) as reply:
                result = reply.status
        except urllib.error.HTTPError as exc:
            result = exc.code
        except OSError as exc:
            result = type(getattr(exc, "reason", exc)).__name__
        if result == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out.append(result)
print(json.dumps(out))
"""


def python_in(host: netns.Host, code: str, *args: str) -> object:
    done = subprocess.run(host.argv([sys.executable, "-c", code, *args]), check=True,
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout)


def leftovers(host: netns.Host) -> tuple[list[str], list[str]]:
    """Namespaces and links of ``host``'s ``hosts()`` call still there."""
    tag = host.ns.split("-")[1]
    links = subprocess.run([netns.IP, "-o", "link"], capture_output=True, text=True).stdout
    return netns.namespaces(tag), [line for line in links.splitlines() if tag in line]


def test_hosts_reach_each_other_only_at_their_addresses():
    with netns.hosts(["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        assert a.address != b.address and a.address.startswith("10.")
        port = free_port()
        server = a.run([sys.executable, "-c", SERVE, str(port)], stdout=subprocess.PIPE,
                       text=True)
        assert server.stdout.readline().strip() == "ready"
        reached = python_in(b, CONNECT, f"{a.address}:{port}", f"127.0.0.1:{port}")
        assert reached == {f"{a.address}:{port}": "hello",
                           f"127.0.0.1:{port}": "ConnectionRefusedError"}
    # the context killed the server and removed namespaces, veths and bridge
    assert server.wait(timeout=5) is not None
    assert leftovers(a) == ([], [])


def test_teardown_after_a_failure_midway():
    with pytest.raises(RuntimeError, match="boom"), netns.hosts(["x"]) as hosts:
        hosts["x"].run(["sleep", "600"])
        raise RuntimeError("boom")
    assert leftovers(hosts["x"]) == ([], [])


@pytest.mark.deployment
def test_a_device_host_reaches_only_the_fleet_proxy(tmp_path: Path):
    with netns.hosts(["link", "node"]) as hosts:
        link, node = hosts["link"], hosts["node"]
        certs = make_certs(tmp_path / "certs", [link.address, "localhost", "127.0.0.1"])
        direct, public = free_port(), free_port()
        env = flower_env(tmp_path / "flwr-home")
        with started(superlink_argv(certs, direct), tmp_path / "superlink.log", env,
                     launch=link.run), \
             started(proxy_argv(certs, f"{link.address}:{public}", direct),
                     tmp_path / "proxy.log", env, launch=link.run):
            base = f"https://{link.address}:{public}"
            # the proxy forwards /health: 200 once both are up
            assert python_in(node, HTTPS, str(certs.ca), "60", "GET", f"{base}/health") \
                == [200], ((tmp_path / "proxy.log").read_text()[-2000:],
                           (tmp_path / "superlink.log").read_text()[-2000:])
            results = python_in(node, HTTPS, str(certs.ca), "0", "GET", f"{base}/health",
                                "POST", f"{base}/v1/control/start-run",
                                "POST", f"{base}/v1/runtime/acquire-task",
                                "GET", f"https://{link.address}:{direct}/health")
            assert results == [200, 404, 404, "ConnectionRefusedError"], results
            # the SuperLink is there, on the link host's loopback only
            assert python_in(link, HTTPS, str(certs.ca), "0", "GET",
                             f"https://127.0.0.1:{direct}/health") == [200]
            reached = python_in(node, CONNECT, f"{link.address}:{direct}",
                                f"127.0.0.1:{direct}", f"127.0.0.1:{public}")
            assert set(reached.values()) == {"ConnectionRefusedError"}, reached
            running = link.pids()
            assert len(running) >= 3  # SuperLink, its SuperExec, the proxy
    assert not [pid for pid in running if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert leftovers(link) == ([], [])
