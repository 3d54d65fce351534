"""Connections to the upstream PostgreSQL: TLS negotiation per sslmode, and cancel requests.

The SSLRequest exchange happens on the raw socket before a transport exists, so the
protocol that relays the session sees only the TLS-wrapped (or plain) stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
from collections.abc import Callable

from proxy.config import UpstreamSettings
from proxy.protocol.startup import CancelRequest, SSLRequest

__all__ = ["UpstreamError", "connect", "probe", "send_cancel", "upstream_ssl_context"]


class UpstreamError(ConnectionError):
    """The upstream could not be reached or refused the required encryption."""


def upstream_ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | None:
    """The client-side TLS context for `sslmode`; None for disable.

    prefer and require encrypt without verifying, as libpq does; verify-full checks the
    chain against sslrootcert and the host name.
    """
    if settings.sslmode == "disable":
        return None
    if settings.sslmode == "verify-full":
        ctx = ssl.create_default_context(cafile=settings.sslrootcert)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _open_socket(settings: UpstreamSettings) -> socket.socket:
    loop = asyncio.get_running_loop()
    addr = settings.address
    infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise UpstreamError(f"could not connect to upstream {addr}: {last or 'no address'}")


async def _negotiate_tls(
    sock: socket.socket, settings: UpstreamSettings
) -> tuple[ssl.SSLContext | None, str | None]:
    """Sends SSLRequest when sslmode asks for it; returns the context to wrap with, if any."""
    ctx = upstream_ssl_context(settings)
    if ctx is None:
        return None, None
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, SSLRequest().encode())
    answer = await loop.sock_recv(sock, 1)
    if answer == b"S":
        return ctx, settings.address.host
    if answer == b"N" and settings.sslmode == "prefer":
        return None, None
    if answer == b"N":
        raise UpstreamError(
            f"upstream {settings.address} does not support SSL, but sslmode is {settings.sslmode}"
        )
    raise UpstreamError(f"upstream {settings.address} answered SSLRequest with {answer!r}")


async def connect(
    settings: UpstreamSettings, protocol_factory: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Opens a relay connection to the upstream, TLS-wrapped as sslmode requires."""
    loop = asyncio.get_running_loop()

    async def attempt() -> tuple[asyncio.Transport, asyncio.Protocol]:
        sock = await _open_socket(settings)
        try:
            ctx, hostname = await _negotiate_tls(sock, settings)
            transport, protocol = await loop.create_connection(
                protocol_factory, sock=sock, ssl=ctx, server_hostname=hostname
            )
        except BaseException:
            sock.close()
            raise
        return transport, protocol  # type: ignore[return-value]

    try:
        return await asyncio.wait_for(attempt(), settings.connect_timeout or None)
    except TimeoutError:
        raise UpstreamError(
            f"timed out connecting to upstream {settings.address} "
            f"after {settings.connect_timeout:g}s"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        if isinstance(exc, UpstreamError):
            raise
        raise UpstreamError(f"could not connect to upstream {settings.address}: {exc}") from None


async def send_cancel(settings: UpstreamSettings, process_id: int, secret_key: bytes) -> None:
    """Asks the upstream to cancel what backend `process_id` is running.

    PostgreSQL answers a CancelRequest by closing the connection, so this waits for EOF
    (bounded) to know the request was read.
    """
    request = CancelRequest(process_id, secret_key).encode()
    sock = await _open_socket(settings)
    try:
        ctx, hostname = await _negotiate_tls(sock, settings)
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=hostname)
    except BaseException:
        sock.close()
        raise
    try:
        writer.write(request)
        await writer.drain()
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def probe(settings: UpstreamSettings, timeout: float | None) -> str | None:
    """Why the upstream would not take a session now, or None when it speaks the protocol:
    it answers an SSLRequest with S or N within `timeout` seconds (None: as long as the OS
    lets a connect take), and does TLS after an S.

    A TCP connect alone passes for anything listening there. Nothing follows the SSLRequest
    and the handshake, so PostgreSQL closes without a line in its log, where a
    StartupMessage would log a FATAL for every probe.
    """
    addr = settings.address

    async def exchange() -> bytes:
        loop = asyncio.get_running_loop()
        sock = await _open_socket(settings)
        try:
            await loop.sock_sendall(sock, SSLRequest().encode())
            answer = await loop.sock_recv(sock, 1)
            if answer != b"S":
                sock.close()
                return answer
            # Left mid-handshake, PostgreSQL would log it: even sslmode disable finishes it.
            mode = "require" if settings.sslmode == "disable" else settings.sslmode
            ctx = upstream_ssl_context(dataclasses.replace(settings, sslmode=mode))
            _, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=addr.host)
        except BaseException:
            sock.close()
            raise
        writer.close()  # the TLS shutdown goes on without us
        return answer

    try:
        answer = await asyncio.wait_for(exchange(), timeout)
    except TimeoutError:
        return f"no answer from upstream {addr} within {timeout or 0:g}s"
    except UpstreamError as exc:
        return str(exc)
    except OSError as exc:  # ssl.SSLError included
        return f"upstream {addr}: {exc}"
    if answer == b"N" and settings.sslmode in ("require", "verify-full"):
        return f"upstream {addr} does not support SSL, but sslmode is {settings.sslmode}"
    if answer not in (b"S", b"N"):
        return f"upstream {addr} answered an SSLRequest with {answer!r}"
    return None
