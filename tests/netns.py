"""Separate "hosts" for tests: Linux network namespaces on one private bridge.

``hosts(["link", "node"])`` makes a bridge ``fsbr<tag>`` (no address) and, per name, a
namespace ``fs-<tag>-<name>`` joined to the bridge by a veth pair, with address
``10.<a>.<b>.<i>/24`` and ``lo`` up. A process in one host reaches another only at that
host's 10.x address; each host's 127.0.0.1 is its own.

The bridge lives in a namespace of its own, ``fs-<tag>-bridge``, not in the root one: there
nothing is routed to or from it, and the root namespace's firewall does not apply (Docker's
``FORWARD DROP`` policy, with ``bridge-nf-call-iptables``, drops bridged traffic between
veths of a root-namespace bridge). Nothing of it is ever in the root namespace.
On exit every process in the namespaces is killed and the namespaces, veths and bridge are
deleted, also when setup failed halfway. Needs root (``available()`` says why not).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

IP = shutil.which("ip") or "/usr/sbin/ip"
BRIDGE = "bridge"  # the namespace that holds the bridge: fs-<tag>-bridge


@dataclass
class Host:
    """One namespace: its name, its address on the bridge, and ways to run things in it."""

    name: str
    ns: str
    address: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.ns, *argv]

    def run(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """``argv`` started in this host (``ip netns exec`` execs it: same pid)."""
        return subprocess.Popen(self.argv(argv), **popen)

    def check_call(self, argv: Sequence[str], **kwargs: Any) -> None:
        subprocess.check_call(self.argv(argv), **kwargs)

    def pids(self) -> list[int]:
        """The processes running in this host now."""
        return _pids(self.ns)


def available() -> str:
    """"" when namespaces can be made here, else why not (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists(IP):
        return "no `ip` command (iproute2)"
    probe = f"fs-probe-{secrets.token_hex(3)}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return ""


@contextmanager
def hosts(names: list[str]) -> Iterator[dict[str, Host]]:
    """One namespace per name on a fresh private bridge; all of it gone on exit."""
    if BRIDGE in names or len(set(names)) != len(names):
        raise ValueError(f"host names must be distinct and not {BRIDGE!r}: {names}")
    tag = secrets.token_hex(3)
    switch, prefix = f"fs-{tag}-{BRIDGE}", _free_subnet()
    made: dict[str, Host] = {}
    try:
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", f"fsbr{tag}", "type", "bridge")
        _ip("-n", switch, "link", "set", f"fsbr{tag}", "up")
        for i, name in enumerate(names, start=1):
            host = Host(name, f"fs-{tag}-{name}", f"{prefix}.{i}")
            made[name] = host
            outer, inner = f"fsv{tag}{i}", f"fsv{tag}{i}p"  # at most 15 characters
            _ip("netns", "add", host.ns)
            _ip("link", "add", outer, "netns", switch, "type", "veth",
                "peer", "name", inner, "netns", host.ns)
            _ip("-n", switch, "link", "set", outer, "master", f"fsbr{tag}", "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", inner)
            _ip("-n", host.ns, "link", "set", inner, "up")
        yield made
    finally:
        _teardown(tag)


def namespaces(tag: str = "") -> list[str]:
    """The namespaces that exist now (of ``hosts()``'s naming, and of ``tag`` if given)."""
    listing = subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"fs-{tag}")]


def _teardown(tag: str) -> None:
    """Kill what runs in the tag's namespaces and delete them (which deletes the bridge and
    the veths in them), and any of its links left in this namespace."""
    for ns in namespaces(f"{tag}-"):
        _kill_all(ns)
        subprocess.run([IP, "netns", "del", ns], capture_output=True)
    links = subprocess.run([IP, "-o", "link"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if tag in name:
            subprocess.run([IP, "link", "del", name], capture_output=True)


def _kill_all(ns: str, timeout: float = 10.0) -> None:
    """SIGTERM every process in ``ns``, SIGKILL those still there after ``timeout`` (and
    give up on any that survive that by another ``timeout``)."""
    start = time.monotonic()
    while (pids := _pids(ns)) and time.monotonic() < start + 2 * timeout:
        sig = signal.SIGTERM if time.monotonic() < start + timeout else signal.SIGKILL
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.1)


def _pids(ns: str) -> list[int]:
    out = subprocess.run([IP, "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _free_subnet() -> str:
    """``10.<a>.<b>``: a random /24 that overlaps no address or route here."""
    addrs = subprocess.run([IP, "-4", "-o", "addr"], capture_output=True, text=True).stdout
    routes = subprocess.run([IP, "-4", "route"], capture_output=True, text=True).stdout
    used = [net for line in addrs.splitlines() + routes.splitlines()
            if (net := _first_network(line.split()))]
    for _ in range(100):
        prefix = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
        if not any(ipaddress.ip_network(f"{prefix}.0/24").overlaps(n) for n in used):
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet found")


def _first_network(tokens: list[str]) -> ipaddress.IPv4Network | None:
    """The first ``a.b.c.d[/n]`` of an ``ip addr`` or ``ip route`` line (the address, or
    the route's destination after a type such as ``blackhole``)."""
    for token in tokens:
        try:
            return ipaddress.IPv4Network(token, strict=False)
        except ValueError:
            continue
    return None


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True)
