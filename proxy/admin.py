"""The admin HTTP server, in pgwarden's own event loop, and its /metrics, /healthz, /readyz.

A deliberately small HTTP/1.1 responder (one request per connection) so the proxy needs
no web framework; it is not on the relay path. It serves the routes it is given and
knows nothing of the proxy: the server wires each endpoint to what it reads. GET routes
read; actions (POST, e.g. ending a session) change something, so they exist only with a
token configured and answer only a request that bears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from proxy.config import Address
from proxy.logs import get_logger

__all__ = [
    "Action",
    "AdminServer",
    "Handler",
    "Request",
    "Response",
    "healthz",
    "json_response",
    "metrics_endpoint",
    "readiness_endpoint",
]

log = get_logger("pgwarden.admin")

Response = tuple[int, str, bytes]


class Request(dict[str, str]):
    """What a GET route is given: the request's headers (names lower-cased), as the dict
    handlers always got, and its query parameters in `query` (a repeated name: the last)."""

    def __init__(self, headers: dict[str, str], query: dict[str, str] | None = None) -> None:
        super().__init__(headers)
        self.query: dict[str, str] = query or {}


Handler = Callable[[Request], Awaitable[Response]]
# A POST route: gets the path's `{id}` segment, e.g. "/clients/{id}/terminate".
Action = Callable[[str], Awaitable[Response]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    503: "Service Unavailable",
}
_MAX_REQUEST = 16384
_MAX_BODY = 4096  # actions take no body; a small one is read and ignored
_NO_TOKEN = (
    "admin actions are off: no admin token is configured "
    "(set admin.token_file or PGWARDEN_ADMIN_TOKEN where pgwarden runs)"
)


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
    """Serves a fixed table of GET routes, and POST actions to holders of `token`;
    anything else is a 404 or 405. Without a route of its own, "/" lists the endpoints."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        actions: Mapping[str, Action] | None = None,
        token: str | None = None,
    ) -> None:
        self._routes = dict(routes)
        self._routes.setdefault("/", self._index)
        self._actions = dict(actions or {})
        self._token = token.encode() if token else None
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
            extra = ""  # more response headers
            if method == "POST":
                (status, ctype, body), extra = await self._post(path, headers, reader, writer)
            elif method not in ("GET", "HEAD") or (handler is None and self._action(path)):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                query = dict(
                    urllib.parse.parse_qsl(target.partition("?")[2], keep_blank_values=True)
                )
                status, ctype, body = await handler(Request(headers, query))
            writer.write(
                (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
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

    async def _post(
        self,
        path: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> tuple[Response, str]:
        """A POST and the headers its answer adds: the body is read (bounded, so closing
        does not reset the connection under the answer) and ignored; then the token is
        checked, in constant time, before the action runs."""
        if "transfer-encoding" in headers:
            return (411, "text/plain", b"send a Content-Length\n"), ""
        length_text = headers.get("content-length", "0")
        if not (length_text.isascii() and length_text.isdigit()):
            return (400, "text/plain", b"bad Content-Length\n"), ""
        if int(length_text) > _MAX_BODY:
            return (413, "text/plain", b"request body too large\n"), ""
        if int(length_text):
            await asyncio.wait_for(reader.readexactly(int(length_text)), 10.0)
        found = self._action(path)
        if found is None:
            if path in self._routes:
                return (405, "text/plain", b"method not allowed\n"), ""
            return (404, "text/plain", b"not found\n"), ""
        if self._token is None:
            return json_response(403, {"error": _NO_TOKEN}), ""
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("latin-1"), self._token
        ):
            peer = writer.get_extra_info("peername")
            log.warning(
                "admin_action_refused",
                path=path,
                reason="wrong token" if given else "no token",
                client=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None,
            )
            error = json_response(401, {"error": "the admin token is missing or wrong"})
            return error, 'WWW-Authenticate: Bearer realm="pgwarden"\r\n'
        action, argument = found
        return await action(argument), ""

    def _action(self, path: str) -> tuple[Action, str] | None:
        """The action whose pattern `path` fits, with the segment that stands for `{id}`."""
        parts = path.split("/")
        for pattern, action in self._actions.items():
            expected = pattern.split("/")
            if len(expected) != len(parts):
                continue
            argument = ""
            for want, got in zip(expected, parts, strict=True):
                if want == "{id}":
                    argument = urllib.parse.unquote(got)
                elif want != got:
                    break
            else:
                if argument:
                    return action, argument
        return None

    async def _index(self, request: Request) -> Response:
        """Every endpoint, for whoever opens the bare address; actions only when usable."""
        endpoints = [{"method": "GET", "path": path} for path in sorted(self._routes)]
        if self._token is not None:
            endpoints += [{"method": "POST", "path": path} for path in sorted(self._actions)]
        return json_response(200, {"endpoints": endpoints})
