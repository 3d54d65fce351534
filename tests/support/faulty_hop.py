"""A TCP hop between pgwarden and PostgreSQL that misbehaves on command: it delays, stalls
or cuts the connections it relays, per direction, at once or after N more bytes.

Modelled on asyncpg's `_testbase/fuzzer.py`. It runs its own asyncio loop in a thread, so
a test drives it from synchronous code while its clients block. A fault set on the hop
applies to the connections open now (counting `after` from where each stands) and to
those opened later (counting from their start), until `heal()`. pgwarden opens one
upstream connection per client session, plus one per cancel request and per /readyz probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Self, TypeVar

__all__ = ["BOTH", "TO_CLIENT", "TO_SERVER", "Direction", "FaultyHop"]

T = TypeVar("T")

_CHUNK = 1 << 16
_CONTROL_TIMEOUT = 5.0


class Direction(enum.Enum):
    TO_SERVER = "to_server"  # pgwarden -> PostgreSQL
    TO_CLIENT = "to_client"  # PostgreSQL -> pgwarden


TO_SERVER = Direction.TO_SERVER
TO_CLIENT = Direction.TO_CLIENT
BOTH = (TO_SERVER, TO_CLIENT)


class _Fault:
    """A stall or a cut, due once `at` bytes went the pipe's way (counted from its start)."""

    __slots__ = ("at", "kind")

    def __init__(self, kind: str, at: int) -> None:
        self.kind = kind  # "stall" or "cut"
        self.at = at


class _Pipe:
    """One direction of one link: where the bytes come from and go to, and its faults."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.forwarded = 0
        self.delay = 0.0
        self.fault: _Fault | None = None
        self.flowing = asyncio.Event()  # cleared while stalled
        self.flowing.set()


class _Link:
    """One relayed connection: pgwarden's side, PostgreSQL's side, a pipe each way."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.writers = (client[1], server[1])
        self.pipes = {
            TO_SERVER: _Pipe(client[0], server[1]),
            TO_CLIENT: _Pipe(server[0], client[1]),
        }
        self.tasks: list[asyncio.Task[None]] = []
        self.cut_done = False

    def cut(self) -> None:
        """Close both sides abruptly: a TCP RST each way, anything unsent dropped."""
        self.cut_done = True
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def close(self) -> None:
        """Close both sides in order: what was written is sent first."""
        for writer in self.writers:
            writer.close()


class FaultyHop:
    """Listens on 127.0.0.1 (a free port) and relays each connection to `upstream`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # one per accepted connection
        self._delay = {TO_SERVER: 0.0, TO_CLIENT: 0.0}
        self._faults: dict[Direction, tuple[str, int]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        self._thread.start()
        self._server = self._call(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stops listening, cuts what is still relayed and ends the thread."""
        if not self._thread.is_alive():
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.cut()
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=_CONTROL_TIMEOUT / 2)

        self._call(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_CONTROL_TIMEOUT)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """host:port for pgwarden's `upstream.address`."""
        return f"127.0.0.1:{self.port}"

    @property
    def links_open(self) -> int:
        return self._run(lambda: len(self._links))

    # ------------------------------------------------------------------ controls

    def delay(self, seconds: float, direction: Direction | Iterable[Direction] = BOTH) -> None:
        """Each chunk waits `seconds` before it is forwarded (0: no delay)."""

        def apply() -> None:
            for way in _ways(direction):
                self._delay[way] = seconds
                for link in self._links:
                    link.pipes[way].delay = seconds

        self._run(apply)

    def stall(self, direction: Direction | Iterable[Direction] = BOTH, after: int = 0) -> None:
        """Stop forwarding after `after` more bytes: the hop stops reading that side, so
        the sender fills its socket buffers and gets backpressure, as from a hung peer."""
        self._fault("stall", direction, after)

    def cut(self, direction: Direction | Iterable[Direction] = BOTH, after: int = 0) -> None:
        """After `after` more bytes in `direction`, close both sides abruptly (RST)."""
        self._fault("cut", direction, after)

    def heal(self) -> None:
        """No more faults or delays; stalled links forward again."""

        def apply() -> None:
            self._faults.clear()
            self._delay = {TO_SERVER: 0.0, TO_CLIENT: 0.0}
            for link in self._links:
                for pipe in link.pipes.values():
                    pipe.fault = None
                    pipe.delay = 0.0
                    pipe.flowing.set()

        self._run(apply)

    def _fault(self, kind: str, direction: Direction | Iterable[Direction], after: int) -> None:
        def apply() -> None:
            for way in _ways(direction):
                self._faults[way] = (kind, after)
                for link in list(self._links):
                    pipe = link.pipes[way]
                    pipe.fault = _Fault(kind, pipe.forwarded + after)
                    if kind == "cut" and after == 0:
                        link.cut()

        self._run(apply)

    # ----------------------------------------------------------------- relaying

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        try:
            server = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        link = _Link((reader, writer), server)
        self._links.add(link)
        for way, pipe in link.pipes.items():
            pipe.delay = self._delay[way]
            if way in self._faults:
                kind, after = self._faults[way]
                pipe.fault = _Fault(kind, after)
        link.tasks = [asyncio.ensure_future(self._pump(link, pipe)) for pipe in link.pipes.values()]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            if not link.cut_done:
                link.close()

    async def _pump(self, link: _Link, pipe: _Pipe) -> None:
        """Forwards one direction until EOF, an error or a cut; then closes the link."""
        try:
            while await self._due(link, pipe):
                data = await pipe.reader.read(_CHUNK)
                if not data:
                    break
                while data:
                    if not await self._due(link, pipe):
                        return
                    head = data
                    if pipe.fault is not None:
                        head = data[: pipe.fault.at - pipe.forwarded]
                    data = data[len(head) :]
                    if pipe.delay:
                        await asyncio.sleep(pipe.delay)
                    pipe.writer.write(head)
                    pipe.forwarded += len(head)
                    await pipe.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not link.cut_done:
                link.close()

    async def _due(self, link: _Link, pipe: _Pipe) -> bool:
        """Applies the pipe's fault once its bytes went through: waits out a stall (until
        `heal`); False once the link was cut."""
        while not link.cut_done:
            fault = pipe.fault
            if fault is None or pipe.forwarded < fault.at:
                return True
            if fault.kind == "cut":
                link.cut()
                return False
            pipe.flowing.clear()
            await pipe.flowing.wait()
        return False

    # ------------------------------------------------------------------ threads

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the hop's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CONTROL_TIMEOUT)

    def _run(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the hop's loop, between two of its steps, and returns its result."""

        async def call() -> T:
            return fn()

        return self._call(call())


def _ways(direction: Direction | Iterable[Direction]) -> tuple[Direction, ...]:
    return (direction,) if isinstance(direction, Direction) else tuple(direction)
