"""The admin HTTP server, in pgwarden's own event loop, and its /metrics, /healthz, /readyz.

A deliberately small HTTP/1.1 responder (one request per connection) so the proxy needs
no web framework; it is not on the relay path. It serves the routes it is given and
knows nothing of the proxy: the server wires each endpoint to what it reads. GET routes
read; actions (POST, e.g. ending a session) change something, so they exist only with a
token configured and answer only a request that bears it. With a token, every path but
the open ones (probes, maybe /metrics) needs it too: the pages show what the database is
asked, by whom. Every answer carries the security headers of a page that shows text
its clients wrote: a strict Content-Security-Policy whose only script and style are
the ones bearing the request's nonce, and no MIME sniffing.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hmac
import json
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from proxy.config import Address
from proxy.logs import get_logger

__all__ = [
    "OPEN_PATHS",
    "Action",
    "AdminServer",
    "Handler",
    "Request",
    "Response",
    "content_security_policy",
    "healthz",
    "json_response",
    "metrics_endpoint",
    "readiness_endpoint",
    "token_matches",
]

log = get_logger("pgwarden.admin")

Response = tuple[int, str, bytes]


class Request(dict[str, str]):
    """What a GET route is given: the request's headers (names lower-cased), as the dict
    handlers always got, its query parameters in `query` (a repeated name: the last), and
    the `nonce` an HTML answer puts on its <script> and <style>, the only ones the
    answer's Content-Security-Policy lets run."""

    def __init__(
        self, headers: dict[str, str], query: dict[str, str] | None = None, nonce: str = ""
    ) -> None:
        super().__init__(headers)
        self.query: dict[str, str] = query or {}
        self.nonce = nonce or secrets.token_urlsafe(18)


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
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes answer without the token
_CHALLENGE = (  # Bearer for scripts; Basic so that a browser asks for the token
    'WWW-Authenticate: Bearer realm="pgwarden"\r\n'
    'WWW-Authenticate: Basic realm="pgwarden", charset="UTF-8"\r\n'
)
_NO_TOKEN = (
    "admin actions are off: no admin token is configured "
    "(set admin.token_file or PGWARDEN_ADMIN_TOKEN where pgwarden runs)"
)


def json_response(status: int, payload: object) -> Response:
    return status, "application/json", json.dumps(payload).encode()


def content_security_policy(nonce: str) -> str:
    """Nothing from elsewhere, no inline code but what bears `nonce`, no framing: a
    statement that smuggled markup into a page still cannot run or load anything."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


def _security_headers(nonce: str) -> str:
    return (
        f"Content-Security-Policy: {content_security_policy(nonce)}\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "X-Frame-Options: DENY\r\n"
        "Referrer-Policy: no-referrer\r\n"
        "Cross-Origin-Opener-Policy: same-origin\r\n"
        "Cross-Origin-Resource-Policy: same-origin\r\n"
        "Cache-Control: no-store\r\n"
    )


def token_matches(authorization: str, token: bytes) -> bool:
    """Whether an Authorization header bears `token`: `Bearer TOKEN`, or Basic with the
    token as password (any user name); compared in constant time."""
    scheme, _, credentials = authorization.strip().partition(" ")
    given = credentials.strip().encode("latin-1", "replace")
    if scheme.lower() == "basic":
        try:
            decoded = binascii.a2b_base64(given, strict_mode=True)
        except (binascii.Error, ValueError):
            return False
        given = decoded.partition(b":")[2]
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given, token)


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
    anything else is a 404 or 405. With a token, only `open_paths` answer without it.
    "/" lists the endpoints when it has no route of its own, or when asked for JSON."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        actions: Mapping[str, Action] | None = None,
        token: str | None = None,
        open_paths: Collection[str] = OPEN_PATHS,
    ) -> None:
        self._routes = dict(routes)
        self._routes.setdefault("/", self._index)
        self._actions = dict(actions or {})
        self._token = token.encode() if token else None
        self._open = frozenset(open_paths)
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
            if path == "/" and _wants_json(headers.get("accept", "")):
                handler = self._index  # scripts that read the index keep their JSON
            query = dict(urllib.parse.parse_qsl(target.partition("?")[2], keep_blank_values=True))
            request = Request(headers, query)
            extra = ""  # more response headers
            if method == "POST":
                (status, ctype, body), extra = await self._post(path, headers, reader, writer)
            elif method not in ("GET", "HEAD") or (handler is None and self._action(path)):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            elif not self._allowed(path, headers):
                status, ctype, body = json_response(401, {"error": "the admin token is needed"})
                extra = _CHALLENGE
            else:
                status, ctype, body = await handler(request)
            writer.write(
                (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                    f"{_security_headers(request.nonce)}Connection: close\r\n\r\n"
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
        given = headers.get("authorization", "")
        if not token_matches(given, self._token):
            peer = writer.get_extra_info("peername")
            log.warning(
                "admin_action_refused",
                path=path,
                reason="wrong token" if given else "no token",
                client=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None,
            )
            error = json_response(401, {"error": "the admin token is missing or wrong"})
            return error, _CHALLENGE
        action, argument = found
        return await action(argument), ""

    def _allowed(self, path: str, headers: Mapping[str, str]) -> bool:
        """Whether a GET of `path` may be answered: always without a token, else on an
        open path or with the token."""
        if self._token is None or path in self._open:
            return True
        return token_matches(headers.get("authorization", ""), self._token)

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


def _wants_json(accept: str) -> bool:
    """An Accept header that asks for JSON and not for HTML (a browser asks for HTML)."""
    return "application/json" in accept and "text/html" not in accept
