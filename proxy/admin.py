"""The admin HTTP server, in pgwarden's own event loop, and its /metrics, /healthz, /readyz.

A deliberately small HTTP/1.1 responder (GET only, one request per connection) so the
proxy needs no web framework; it is not on the relay path. It serves the routes it is
given and knows nothing of the proxy: the server wires each endpoint to what it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from proxy.config import Address
from proxy.logs import get_logger

__all__ = [
    "AdminServer",
    "Handler",
    "Response",
    "healthz",
    "json_response",
    "metrics_endpoint",
    "readiness_endpoint",
]

log = get_logger("pgwarden.admin")

Response = tuple[int, str, bytes]
Handler = Callable[[dict[str, str]], Awaitable[Response]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_MAX_REQUEST = 16384


def json_response(status: int, payload: object) -> Response:
    return status, "application/json", json.dumps(payload).encode()


def metrics_endpoint(registry: CollectorRegistry, before_read: Callable[[], None]) -> Handler:
    """/metrics, in the format the scraper accepts; `before_read` brings the counters up
    to date first (statements relayed but not yet counted)."""

    async def handler(headers: dict[str, str]) -> Response:
        before_read()
        if "application/openmetrics-text" in headers.get("accept", ""):
            return 200, OPENMETRICS_CONTENT_TYPE, generate_openmetrics(registry)
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

    return handler


async def healthz(headers: dict[str, str]) -> Response:
    return 200, "text/plain", b"ok\n"


def readiness_endpoint(unready: Callable[[], Awaitable[str | None]]) -> Handler:
    """/readyz: 200, or 503 with the reason `unready` gives for not taking traffic."""

    async def handler(headers: dict[str, str]) -> Response:
        reason = await unready()
        if reason is not None:
            return json_response(503, {"ready": False, "reason": reason})
        return json_response(200, {"ready": True})

    return handler


class AdminServer:
    """Serves a fixed table of GET routes; anything else is a 404 or 405."""

    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None

    async def start(self, address: Address) -> None:
        self._server = await asyncio.start_server(
            self._handle, address.host, address.port, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            if len(head) > _MAX_REQUEST:
                return
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            path = target.split("?", 1)[0]
            handler = self._routes.get(path)
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                status, ctype, body = await handler(headers)
            writer.write(
                (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass
        except Exception:  # a broken request must never take the admin server down
            log.exception("admin_request_failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
