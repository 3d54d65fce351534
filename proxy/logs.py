"""structlog setup: JSON lines for machines by default, a console renderer for people.

Lines are rendered by the caller and handed to a LogSink, which one writer thread drains
to standard output. A stdout that fails or stalls (closed pipe, full disk, a log shipper
that stops reading) costs log lines, counted by reason for pgwarden_log_lines_dropped_total,
never a connection, a signal or the event loop.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from typing import Final

import structlog

__all__ = [
    "DROP_REASONS",
    "LogSink",
    "configure_logging",
    "dropped_lines",
    "flush_logs",
    "get_logger",
]

# Why a line was lost: the reader of stdout left (EPIPE), a write failed otherwise
# (ENOSPC, EIO, ...), or the queue was full because writes stalled.
DROP_REASONS: Final = ("broken_pipe", "error", "full")
# The queue rides out a stalled reader for a while (about 4000 typical lines) and bounds
# what a reader that never comes back costs.
MAX_QUEUED_LINES: Final = 10_000
MAX_QUEUED_CHARS: Final = 1 << 20
# After these, later writes cannot succeed: the reader is gone, or there is no stdout.
_FOR_GOOD: Final = {errno.EPIPE: "broken_pipe", errno.EBADF: "error"}
STDOUT: Final = 1


class LogSink:
    """Lines queued for one daemon thread that writes them to `fd` with blocking writes.

    `write` only appends to a bounded queue under a lock the writer never holds while
    writing, so the caller (the event loop) never waits for the reader of `fd`. A full
    queue drops the line; a failed write drops the lines it carried; after EPIPE or EBADF
    nothing more is written and every later line is dropped. Drops are counted by reason;
    nothing raises into the caller.
    """

    def __init__(
        self, fd: int, max_lines: int = MAX_QUEUED_LINES, max_chars: int = MAX_QUEUED_CHARS
    ) -> None:
        self.fd = fd
        self.max_lines = max_lines
        self.max_chars = max_chars
        self._lines: deque[str] = deque()
        self._chars = 0
        self._in_flight = 0  # lines the writer took and is writing
        self._gone: str | None = None  # the drop reason of every line, once fd is gone
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits for lines
        self._done = threading.Condition(self._lock)  # flush() waits for the writer
        self._thread = threading.Thread(target=self._run, name="pgwarden-log-writer", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        """Queues `line` (without its newline), or counts it as dropped."""
        with self._lock:
            if self._gone is not None:
                self._dropped[self._gone] += 1
            elif len(self._lines) >= self.max_lines or self._chars + len(line) > self.max_chars:
                self._dropped["full"] += 1
            else:
                self._lines.append(line)
                self._chars += len(line)
                self._work.notify()

    def dropped(self) -> dict[str, int]:
        """Lines lost so far, by reason (every reason present)."""
        with self._lock:
            return dict(self._dropped)

    def flush(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for the queued lines to be written or dropped;
        whether they were (a reader that stopped reading keeps them queued)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._lines or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._lines:
                    self._work.wait()
                batch, self._lines = self._lines, deque()
                self._chars = 0
                self._in_flight = len(batch)
            reason, lost = self._write(batch)
            with self._lock:
                self._in_flight = 0
                if lost:
                    self._dropped[reason] += lost
                self._done.notify_all()

    def _write(self, batch: deque[str]) -> tuple[str, int]:
        """Writes `batch`, one line each; on failure, the drop reason and how many of its
        lines were not written whole."""
        chunks = [f"{line}\n".encode("utf-8", "backslashreplace") for line in batch]
        data = memoryview(b"".join(chunks))
        written = 0
        try:
            while written < len(data):
                try:
                    written += os.write(self.fd, data[written:])
                except BlockingIOError:  # someone made the fd non-blocking: wait for room
                    select.select([], [self.fd], [])
        except OSError as exc:
            gone = _FOR_GOOD.get(exc.errno or 0)
            if gone is not None:
                with self._lock:
                    self._gone = gone
                    self._dropped[gone] += len(self._lines)  # queued behind this batch
                    self._lines.clear()
                    self._chars = 0
            end = whole = 0
            for chunk in chunks:
                end += len(chunk)
                if end > written:
                    break
                whole += 1
            return gone or "error", len(chunks) - whole
        return "", 0


class _SinkLogger:
    """structlog's end of the chain: every level hands the rendered line to the sink."""

    def __init__(self, sink: LogSink) -> None:
        self.sink = sink

    def msg(self, message: str) -> None:
        self.sink.write(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_sink: LogSink | None = None


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Sets the format and level; the first call starts the sink on stdout, later calls
    (a reload) keep it and what it queued."""
    global _sink
    if _sink is None:
        _sink = LogSink(STDOUT)
    logger = _SinkLogger(_sink)
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *args: logger,
        cache_logger_on_first_use=False,
    )


def dropped_lines() -> dict[str, int]:
    """Log lines lost so far, by reason, for the metric; zeros before logging starts."""
    return _sink.dropped() if _sink is not None else dict.fromkeys(DROP_REASONS, 0)


def flush_logs(timeout: float) -> bool:
    """At exit: waits up to `timeout` seconds for the queued lines; whether all went."""
    return _sink.flush(timeout) if _sink is not None else True


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(logger_name=name)
