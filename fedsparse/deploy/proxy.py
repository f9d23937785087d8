"""``fedsparse-fleet-proxy``: the only port of a deployment's SuperLink host that devices reach.

Flower 1.41's SuperLink serves its Fleet (``/v1/fleet/*``), Control (``/v1/control/*``: run
submission, node registration) and Runtime (``/v1/runtime/*``) APIs on one HTTP(S) port. The
SuperLink therefore binds 127.0.0.1, and this proxy listens on the public address and forwards
``POST /v1/fleet/<name>`` and ``GET /health``, nothing else.

Paths are checked as the client sent them (the raw request target, before any decoding), and
only ``/v1/fleet/`` followed by one lowercase word (letters, digits, ``-``) with no query
string passes: ``..``, ``%2e``, ``//``, encoded slashes, upper case and query strings are all
refused with 404 before anything reaches the SuperLink. Flower's Fleet client never sends a
query string, so refusing one costs nothing and leaves no second parser to disagree with.
The forwarded path is the checked one, byte for byte.

Forwarded request headers: ``content-type``, ``accept``, ``accept-encoding``, ``user-agent``
and every ``flwr-*`` header (SuperNode authentication: ``flwr-public-key``,
``flwr-signature``, ``flwr-timestamp``; runtime version metadata: ``flwr-package-name``,
``flwr-package-version``, ``flwr-component-name``). The response comes back as the SuperLink
sent it (status, body undecoded), less hop-by-hop headers.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import uvicorn
from starlette.background import BackgroundTask
from starlette.responses import PlainTextResponse, Response, StreamingResponse

log = logging.getLogger("fedsparse.fleet_proxy")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FLEET_PATH = re.compile(rb"/v1/fleet/[a-z0-9]+(?:-[a-z0-9]+)*")
HEALTH_PATH = b"/health"
# Flower splits arrays into 5 MiB objects (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) and pushes one
# object per /v1/fleet/push-object request; the rest of its Fleet requests are small.
# 64 MiB leaves room for a large non-array record (a ConfigRecord is one object).
DEFAULT_MAX_BODY = 64 * 2**20
FORWARDED_REQUEST_HEADERS = frozenset({"content-type", "accept", "accept-encoding",
                                       "user-agent"})
# hop-by-hop headers (RFC 9110 7.6.1) and those this proxy's own server writes (date, server)
DROPPED_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate",
                        "proxy-authorization", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "date", "server"})
UPSTREAM_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def allowed(method: str, raw_path: bytes, query_string: bytes) -> bool:
    """Whether a request may reach the SuperLink: ``POST /v1/fleet/<name>`` or
    ``GET /health``, judged on the raw request target, with no query string."""
    if query_string:
        return False
    if method == "GET":
        return raw_path == HEALTH_PATH
    return method == "POST" and FLEET_PATH.fullmatch(raw_path) is not None


def forwarded_request_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The client's headers the SuperLink needs (content negotiation, ``flwr-*``)."""
    kept = []
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in FORWARDED_REQUEST_HEADERS or name.startswith("flwr-"):
            kept.append((name, raw_value.decode("latin-1")))
    return kept


def forwarded_response_headers(headers: httpx.Headers) -> dict[str, str]:
    """The SuperLink's response headers less hop-by-hop ones (content-length and
    content-encoding kept: the body is passed on undecoded)."""
    return {k: v for k, v in headers.items() if k.lower() not in DROPPED_RESPONSE_HEADERS}


class FleetProxy:
    """An ASGI app that forwards the allowed requests to ``upstream`` with one
    ``httpx.AsyncClient`` (made at startup, closed at shutdown)."""

    def __init__(self, upstream: str, *, verify: ssl.SSLContext | bool = True,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.upstream = upstream.rstrip("/")
        self.verify = verify
        self.max_body = max_body
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            response = await self._handle(scope, receive)
            await response(scope, receive, send)
        # websocket: uvicorn closes the connection when the app returns without accepting

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(verify=self.verify, timeout=UPSTREAM_TIMEOUT,
                                                follow_redirects=False, trust_env=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive) -> Response:
        method, client = scope["method"], _client(scope)
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        target = raw_path + (b"?" + query if query else b"")
        if not allowed(method, raw_path, query):
            log.warning("refused %s %r from %s", method, target.decode("latin-1"), client)
            return PlainTextResponse("not found\n", status_code=404)
        try:
            body = await self._read_body(scope, receive)
        except _ClientGone:
            return Response(status_code=400)  # nobody left to read it
        if body is None:
            log.warning("refused %s %r from %s: body over %d bytes", method,
                        target.decode("latin-1"), client, self.max_body)
            return PlainTextResponse(f"request body over {self.max_body} bytes\n",
                                     status_code=413)
        assert self.client is not None, "the proxy serves requests only after its startup"
        request = self.client.build_request(
            method, self.upstream + raw_path.decode("ascii"),
            headers=forwarded_request_headers(scope["headers"]),
            content=body if method == "POST" else None)
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            return _unreachable(self.upstream, exc, 504)
        except httpx.HTTPError as exc:  # refused, reset, TLS failure, protocol error
            return _unreachable(self.upstream, exc, 502)
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                 headers=forwarded_response_headers(upstream.headers),
                                 background=BackgroundTask(upstream.aclose))

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The request body, or None when it is (or announces itself) over ``max_body``."""
        for name, value in scope["headers"]:
            if name.lower() == b"content-length" and value.isdigit() \
                    and int(value) > self.max_body:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def _unreachable(upstream: str, exc: Exception, status: int) -> Response:
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    log.warning("SuperLink %s unreachable: %s", upstream, reason)
    return PlainTextResponse(f"fleet proxy: the SuperLink at {upstream} is unreachable "
                             f"({reason})\n", status_code=status)


def upstream_verify(upstream: str, ca: str | None) -> ssl.SSLContext | bool:
    """How the upstream's certificate is checked: against ``ca`` (or the system's trust
    store without one) for https; nothing to check for http."""
    if not upstream.startswith("https://"):
        return False
    return ssl.create_default_context(cafile=ca) if ca else True


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, not {listen!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedsparse-fleet-proxy",
        description="Forward only Flower's Fleet API (POST /v1/fleet/*) and GET /health to a "
                    "SuperLink; refuse the Control and Runtime APIs and everything else.")
    parser.add_argument("--listen", required=True, type=split_listen, metavar="HOST:PORT")
    parser.add_argument("--upstream", required=True, metavar="URL",
                        help="the SuperLink, e.g. https://127.0.0.1:8010")
    parser.add_argument("--certfile", help="TLS certificate served to devices")
    parser.add_argument("--keyfile", help="its key (without --certfile/--keyfile: plain HTTP)")
    parser.add_argument("--ca", help="CA the upstream's certificate is verified against")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, metavar="BYTES",
                        help=f"largest request body forwarded (default {DEFAULT_MAX_BODY})")
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    if not args.upstream.startswith(("http://", "https://")):
        parser.error(f"--upstream wants an http:// or https:// URL, not {args.upstream!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the proxy until SIGTERM or SIGINT; exit 0 after a graceful shutdown."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = args.listen
    app = FleetProxy(args.upstream, verify=upstream_verify(args.upstream, args.ca),
                     max_body=args.max_body)
    config = uvicorn.Config(app, host=host, port=port, ssl_certfile=args.certfile,
                            ssl_keyfile=args.keyfile, lifespan="on", access_log=False,
                            log_level="warning", server_header=False, proxy_headers=False)
    # uvicorn shuts down gracefully on SIGTERM, restores this handler and raises the signal
    # again: ending here with status 0 instead of dying of it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
