"""The READY relay, playbook style, without sockets or PostgreSQL: client and server bytes
in, the bytes each transport was given, the round trips, and the calls the hooks and the
session (a fake owner) received, out.

Plain mode (no analysis) frames the server stream itself; with an Inspector the relay
starts deferred (the tracker reads both streams later, from the shared Backlog) and turns
realtime when a hook asks. The Backlog arms a timer on the running loop, so those tests
run their body in `asyncio.run` (and never await, so the timer never fires).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.advice import AdviceSink
from proxy.analysis.analyzer import Analyzer
from proxy.analysis.matching import SessionIdentity
from proxy.backlog import Backlog
from proxy.config import settings_from_dict
from proxy.inspector import Analysis, Inspector
from proxy.metrics import Metrics
from proxy.protocol import messages as m
from proxy.protocol.framing import FrameDecoder, ProtocolViolation
from proxy.rewriters.rules import BLOCK_MARKER, RuleEngine
from proxy.session.hooks import SessionHook
from proxy.session.relay import Relay
from proxy.session.rules import RulesHook
from proxy.session.timeouts import TimeoutHook
from proxy.timeouts import TimeoutPolicy
from proxy.tracking.events import Running
from proxy.tracking.round_trips import CLIENT_INTEREST, RoundTrips
from tests.support.fake_timers import Timers

ALICE = SessionIdentity("alice", "shop", "web")
MAX_MESSAGE = 1 << 30

# ----------------------------------------------------------------------------- fakes


class Transport:
    """Records what is written, chunk by chunk (the objects themselves)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def is_closing(self) -> bool:
        return self.closing

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Owner:
    """The session, as the relay sees it; `log` is shared with the hooks to check order."""

    def __init__(self, log: list[tuple[Any, ...]] | None = None) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.draining = False
        self.log = log if log is not None else []
        self.violations: list[tuple[str, ProtocolViolation]] = []
        self.lost: list[Exception] = []

    def protocol_violation(self, side: str, exc: ProtocolViolation) -> None:
        self.violations.append((side, exc))

    def drain_if_idle(self) -> None:
        self.log.append(("session", "drain_if_idle"))

    def books_lost(self, exc: Exception) -> None:
        self.lost.append(exc)


class Recorder(SessionHook):
    """Records every hook call in `log`; `edit`/`error` decide what it returns."""

    def __init__(
        self,
        log: list[tuple[Any, ...]],
        name: str = "hook",
        *,
        edit: Callable[[bytes], bytes] | None = None,
        error: Callable[[bytes], bytes | None] | None = None,
        wants_errors: bool = False,
    ) -> None:
        self.log = log
        self.name = name
        self.edit = edit
        self.error = error
        self.wants_errors = wants_errors

    def edit_client(self, data: bytes) -> bytes:
        self.log.append((self.name, "edit_client", bytes(data)))
        return self.edit(data) if self.edit is not None else data

    def client_sent(self) -> None:
        self.log.append((self.name, "client_sent"))

    def server_error(self, raw: bytes) -> bytes | None:
        self.log.append((self.name, "server_error", raw))
        return self.error(raw) if self.error is not None else None

    @property
    def edits_errors(self) -> bool:
        return self.wants_errors

    def round_trip_end(self, status: bytes, idle: bool) -> None:
        self.log.append((self.name, "round_trip_end", status, idle))

    def server_sent(self) -> None:
        self.log.append((self.name, "server_sent"))

    def close(self) -> None:
        self.log.append((self.name, "close"))


class RealtimeRecorder(Recorder):
    realtime = True


class Control:
    """The session as RulesHook and TimeoutHook see it, on a real relay: what the relay
    does not answer is recorded in `calls`."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.identity = ALICE
        self.round_trips = relay.round_trips
        self.calls: list[tuple[Any, ...]] = []

    def log_fields(self) -> dict[str, object]:
        return {}

    def running(self) -> Running | None:
        return self.relay.running()

    def edit_errors(self) -> None:
        self.relay.edit_errors()

    def pause_client(self, reason: str) -> None:
        self.calls.append(("pause_client", reason))

    def resume_client(self, reason: str) -> None:
        self.calls.append(("resume_client", reason))

    def cancel_backend(self, done: Callable[[], None]) -> None:
        self.calls.append(("cancel_backend",))

    def fail(self, sqlstate: str, message: str, reason: str) -> None:
        self.calls.append(("fail", sqlstate, reason))


class Playbook:
    """One relay with fake transports and owner; `inspector` None for plain mode;
    `round_trips` as authentication left them (fresh by default)."""

    def __init__(
        self, analysis: Analysis | None = None, round_trips: RoundTrips | None = None
    ) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.owner = Owner(self.log)
        self.client = Transport()
        self.server = Transport()
        self.round_trips = round_trips if round_trips is not None else RoundTrips()
        # as Session builds `_client_frames`
        self.client_frames = FrameDecoder(CLIENT_INTEREST, inspect_limit=0, max_length=MAX_MESSAGE)
        self.inspector = Inspector(analysis, ALICE) if analysis is not None else None
        self.relay = Relay(
            self.owner,
            self.client,  # type: ignore[arg-type]
            self.server,  # type: ignore[arg-type]
            self.round_trips,
            self.client_frames,
            self.inspector,
            MAX_MESSAGE,
        )

    def hook(self, name: str = "hook", cls: type[Recorder] = Recorder, **kw: Any) -> Recorder:
        hook = cls(self.log, name, **kw)
        self.relay.add_hook(hook)
        return hook

    def calls(self, *names: str) -> list[tuple[Any, ...]]:
        """The log without edit_client entries (or only the calls named)."""
        return [
            entry
            for entry in self.log
            if entry[1] != "edit_client" and (not names or entry[1] in names)
        ]


def analysis(backlog: Backlog | None = None) -> Analysis:
    return Analysis(Analyzer(), AdviceSink(600), Metrics(), backlog=backlog or Backlog())


def encode(*messages: m._Message) -> bytes:
    return b"".join(x.encode() for x in messages)


ROWS = (
    m.RowDescription((m.Column("?column?", 0, 0, 23, 4, -1, 0),)),
    m.DataRow((b"1",)),
    m.CommandComplete("SELECT 1"),
)
CLIENT_STREAM = encode(
    m.Query("SELECT 1"),
    m.Parse("s1", "SELECT $1::int", (23,)),
    m.Bind("", "s1", (0,), (b"7",), ()),
    m.Describe(b"P", ""),
    m.Execute("", 0),
    m.Sync(),
)
SERVER_STREAM = encode(
    *ROWS,
    m.ReadyForQuery(b"I"),
    m.ParseComplete(),
    m.BindComplete(),
    *ROWS,
    m.ReadyForQuery(b"I"),
)
ERROR = m.ErrorResponse.build("ERROR", "22012", "division by zero").encode()
NOTICE = m.NoticeResponse.build("NOTICE", "00000", "hello").encode()
READY_I = m.ReadyForQuery(b"I").encode()
READY_T = m.ReadyForQuery(b"T").encode()


# -------------------------------------------------------------------- bytes, plain


def test_client_bytes_reach_the_server_as_they_are() -> None:
    """No hooks, the stream cut at any byte: each client chunk goes to the server as it is
    (the very object), and the round trips count both the Query and the Sync."""
    for cut in range(1, len(CLIENT_STREAM)):
        pb = Playbook()
        first, second = CLIENT_STREAM[:cut], CLIENT_STREAM[cut:]
        pb.relay.client_data(first)
        pb.relay.client_data(second)
        assert pb.server.chunks == [first, second], cut
        assert pb.server.chunks[0] is first and pb.server.chunks[1] is second
        assert pb.owner.bytes_in == len(CLIENT_STREAM)
        assert pb.client.chunks == [] and pb.owner.violations == []
        assert pb.round_trips.awaiting == 2 and not pb.round_trips.unsynced, cut


def test_server_bytes_reach_the_client_as_they_are() -> None:
    """The stream cut at any byte: each server chunk goes to the client as it is, and the
    round trips count both ReadyForQuery wherever the cut falls."""
    for cut in range(1, len(SERVER_STREAM)):
        pb = Playbook()
        pb.relay.client_data(CLIENT_STREAM)
        first, second = SERVER_STREAM[:cut], SERVER_STREAM[cut:]
        pb.relay.server_data(first)
        pb.relay.server_data(second)
        assert pb.client.chunks == [first, second], cut
        assert pb.client.chunks[0] is first and pb.client.chunks[1] is second
        assert pb.owner.bytes_out == len(SERVER_STREAM)
        assert pb.round_trips.readies == 2, cut
        assert pb.round_trips.idle, cut


def test_bytes_pass_byte_by_byte() -> None:
    """One byte a chunk, both ways: the same bytes, and the same round trips."""
    pb = Playbook()
    for i in range(len(CLIENT_STREAM)):
        pb.relay.client_data(CLIENT_STREAM[i : i + 1])
    for i in range(len(SERVER_STREAM)):
        pb.relay.server_data(SERVER_STREAM[i : i + 1])
    assert pb.server.data == CLIENT_STREAM
    assert pb.client.data == SERVER_STREAM
    assert pb.round_trips.readies == 2 and pb.round_trips.idle


def test_a_round_trip_opens_and_closes() -> None:
    """Query → awaiting; rows → still awaiting; ReadyForQuery → idle."""
    pb = Playbook()
    books = pb.round_trips
    pb.relay.client_data(m.Query("SELECT 1").encode())
    assert books.awaiting == 1 and books.busy and not books.idle
    pb.relay.server_data(encode(*ROWS))
    assert books.awaiting == 1 and books.readies == 0
    pb.relay.server_data(READY_I)
    assert books.awaiting == 0 and books.readies == 1 and books.idle


def test_extended_round_trip() -> None:
    """Parse/Bind/Execute: unsynced (busy, nothing owed); Sync: one owed; ready: idle."""
    pb = Playbook()
    books = pb.round_trips
    pb.relay.client_data(encode(m.Parse("", "SELECT 1"), m.Bind("", ""), m.Execute("")))
    assert books.unsynced and books.awaiting == 0 and books.busy
    pb.relay.client_data(m.Sync().encode())
    assert not books.unsynced and books.awaiting == 1
    pb.relay.server_data(encode(m.ParseComplete(), m.BindComplete(), *ROWS))
    assert books.busy
    pb.relay.server_data(READY_T)
    assert books.awaiting == 0 and books.status == b"T" and not books.idle and not books.busy


def test_bad_client_length_is_a_violation_and_nothing_reaches_the_server() -> None:
    pb = Playbook()
    hook = pb.hook()
    pb.relay.client_data(b"Q\x00\x00\x00\x02")
    assert [(side, str(exc)) for side, exc in pb.owner.violations] == [
        ("client", "invalid length 2 for message type 0x51")
    ]
    assert pb.server.chunks == []
    assert pb.owner.bytes_in == 0
    assert hook.log == []  # no hook saw the bytes
    assert pb.round_trips.awaiting == 0


def test_bad_server_length_is_a_violation() -> None:
    """The chunk reached the client before it was read; the session is told, the hooks
    are not called for it."""
    pb = Playbook()
    pb.hook()
    bad = b"Z\x00\x00\x00\x01"
    pb.relay.server_data(bad)
    assert [(side, str(exc)) for side, exc in pb.owner.violations] == [
        ("server", "invalid length 1 for message type 0x5a")
    ]
    assert pb.client.chunks == [bad]
    assert pb.calls() == []


# -------------------------------------------------------------------------- hooks


def test_edit_client_chain_and_what_the_server_gets() -> None:
    """Each hook edits what the one before returned; the last one's output is written."""
    pb = Playbook()
    select_2 = m.Query("SELECT 2").encode()
    pb.hook("first", edit=lambda data: select_2)
    pb.hook("second", edit=lambda data: data + m.Flush().encode())
    query = m.Query("SELECT 1").encode()
    pb.relay.client_data(query)
    assert pb.server.chunks == [select_2 + m.Flush().encode()]
    assert [e for e in pb.log if e[1] == "edit_client"] == [
        ("first", "edit_client", query),
        ("second", "edit_client", select_2),
    ]
    # the round trips read the client's own bytes, not the edit
    assert pb.round_trips.awaiting == 1 and not pb.round_trips.unsynced


def test_an_edit_to_nothing_writes_nothing() -> None:
    pb = Playbook()
    pb.hook(edit=lambda data: b"")
    pb.relay.client_data(m.Query("SELECT 1").encode())
    assert pb.server.chunks == []


def test_client_sent_once_per_chunk_that_reached_the_server() -> None:
    """Whatever the chunk holds (half a header, the rest of a message, two whole messages),
    each hook is told once, after the chunk was written to the server; a chunk the client
    framing refuses is never sent, and no hook is told."""
    pb = Playbook()
    pb.hook("a")
    pb.hook("b")
    query = m.Query("SELECT 1").encode()
    for chunk in (query[:3], query[3:], query + m.Query("SELECT 2").encode()):
        pb.log.clear()
        pb.relay.client_data(chunk)
        assert pb.server.chunks[-1] is chunk
        assert pb.log == [
            ("a", "edit_client", chunk),
            ("b", "edit_client", chunk),
            ("a", "client_sent"),
            ("b", "client_sent"),
        ]
    pb.log.clear()
    pb.relay.client_data(b"Q\x00\x00\x00\x02")
    assert pb.log == [] and len(pb.owner.violations) == 1


def test_client_sent_comes_with_the_chunk_completing_the_message() -> None:
    """A Query cut after 8 bytes (its header and 3 bytes of text): the realtime TimeoutHook
    is told after the first chunk, when nothing runs yet, and again after the chunk that
    completes the Query: the tracker has it whole then, so its statement timer is armed
    (and, fired, cancels it)."""

    async def main() -> None:
        pb = Playbook(analysis())
        control = Control(pb.relay)
        timers = Timers()
        hook = TimeoutHook(
            control,  # type: ignore[arg-type]
            TimeoutPolicy(settings_from_dict({"timeouts": {"statement": "1s"}}).timeouts),
            Metrics(),
            timers.call_later,
        )
        pb.relay.add_hook(hook)
        assert pb.relay.mode == "realtime"
        query = m.Query("SELECT pg_sleep(10)").encode()
        pb.relay.client_data(query[:8])
        assert pb.relay.running() is None
        assert timers.live == []
        pb.relay.client_data(query[8:])
        assert pb.server.data == query
        current = pb.relay.running()
        assert current is not None and current.event.info.command == "SELECT"
        (timer,) = timers.live
        assert 0.0 < timer.delay <= 1.0
        timer.fire()
        assert control.calls == [("pause_client", "cancel"), ("cancel_backend",)]
        assert pb.relay.errors is not None  # the cancel's error will be rewritten

    asyncio.run(main())


def test_round_trip_end_once_per_chunk_holding_a_ready() -> None:
    """Status and idleness as the round trips have them after the chunk: a BEGIN's ready
    says T; two readies in one chunk give one call; a chunk without one gives none."""
    pb = Playbook()
    pb.hook()
    pb.relay.client_data(m.Query("BEGIN").encode())
    pb.relay.server_data(m.CommandComplete("BEGIN").encode())
    assert pb.calls("round_trip_end") == []
    pb.relay.server_data(READY_T)
    assert pb.calls("round_trip_end") == [("hook", "round_trip_end", b"T", True)]
    pb.log.clear()
    # two pipelined Queries: the first ready leaves one owed (not idle)
    pb.relay.client_data(m.Query("SELECT 1").encode() + m.Query("COMMIT").encode())
    pb.relay.server_data(encode(*ROWS) + READY_T)
    pb.relay.server_data(m.CommandComplete("COMMIT").encode() + READY_I)
    assert pb.calls("round_trip_end") == [
        ("hook", "round_trip_end", b"T", False),
        ("hook", "round_trip_end", b"I", True),
    ]
    pb.log.clear()
    pb.relay.client_data(m.Query("SELECT 1").encode() + m.Query("SELECT 2").encode())
    pb.relay.server_data(encode(*ROWS) + READY_I + encode(*ROWS) + READY_I)
    assert pb.calls("round_trip_end") == [("hook", "round_trip_end", b"I", True)]


def test_round_trip_end_with_extended_messages_unsynced() -> None:
    """A ready while Parse/Bind/Execute wait for their Sync: not idle."""
    pb = Playbook()
    pb.hook()
    pb.relay.client_data(m.Sync().encode() + encode(m.Parse("", "SELECT 1"), m.Bind("", "")))
    pb.relay.server_data(READY_I)
    assert pb.calls("round_trip_end") == [("hook", "round_trip_end", b"I", False)]


def test_hook_order_on_the_server_path() -> None:
    """Per server chunk: round_trip_end (if a ready passed), the drain check (while
    draining), then server_sent, each hook in the order installed."""
    pb = Playbook()
    pb.hook("a")
    pb.hook("b")
    pb.relay.client_data(m.Query("SELECT 1").encode())
    pb.owner.draining = True
    pb.relay.server_data(encode(*ROWS))
    pb.relay.server_data(READY_I)
    assert pb.calls("round_trip_end", "server_sent", "drain_if_idle") == [
        ("session", "drain_if_idle"),
        ("a", "server_sent"),
        ("b", "server_sent"),
        ("a", "round_trip_end", b"I", True),
        ("b", "round_trip_end", b"I", True),
        ("session", "drain_if_idle"),
        ("a", "server_sent"),
        ("b", "server_sent"),
    ]


def test_drain_check_per_server_chunk_only_while_draining() -> None:
    pb = Playbook()
    pb.relay.server_data(NOTICE)
    assert pb.log == []
    pb.owner.draining = True
    pb.relay.server_data(NOTICE)
    pb.relay.server_data(NOTICE[:3])
    pb.relay.server_data(NOTICE[3:])
    assert pb.log == [("session", "drain_if_idle")] * 3


def test_server_error_only_once_errors_are_edited() -> None:
    """Before `edit_errors` no hook sees errors; after it each ErrorResponse (not a
    Notice) goes to the hooks whole, and the first non-None answer replaces it."""
    pb = Playbook()
    edited = m.ErrorResponse.build("ERROR", "42501", "edited").encode()
    pb.hook("a", wants_errors=True)
    pb.hook("b", error=lambda raw: edited, wants_errors=True)
    pb.relay.server_data(ERROR)
    assert pb.calls("server_error") == []
    assert pb.client.chunks == [ERROR]
    pb.relay.edit_errors()
    pb.relay.server_data(NOTICE + ERROR[:9])
    pb.relay.server_data(ERROR[9:] + READY_I)
    assert pb.calls("server_error") == [("a", "server_error", ERROR), ("b", "server_error", ERROR)]
    assert pb.client.data == ERROR + NOTICE + edited + READY_I
    assert pb.relay.errors is not None  # the hooks still want errors


def test_an_error_no_hook_edits_passes_as_it_is() -> None:
    pb = Playbook()
    pb.hook("a", wants_errors=True)
    pb.relay.edit_errors()
    pb.relay.server_data(ERROR)
    assert pb.client.data == ERROR
    assert pb.calls("server_error") == [("a", "server_error", ERROR)]


def test_error_editor_dropped_at_a_boundary_once_unwanted() -> None:
    """No hook edits errors any more: the editor goes once a chunk ends on a message
    boundary, not while it holds part of a message."""
    pb = Playbook()
    pb.hook(wants_errors=False)
    pb.relay.edit_errors()
    assert pb.relay.errors is not None
    pb.relay.server_data(ERROR[:3])  # a partial header is held by the editor
    assert pb.client.data == b""
    assert pb.relay.errors is not None
    pb.relay.server_data(ERROR[3:7])
    assert pb.relay.errors is not None
    pb.relay.server_data(ERROR[7:] + NOTICE)
    assert pb.relay.errors is None
    assert pb.client.data == ERROR + NOTICE
    pb.relay.server_data(ERROR)
    assert pb.calls("server_error") == [("hook", "server_error", ERROR)]  # only the first


def test_edit_errors_mid_stream() -> None:
    """Started while the client has part of a Notice's header: the rest of that message
    passes unedited, the next error is edited."""
    pb = Playbook()
    pb.hook(error=lambda raw: READY_I, wants_errors=True)  # an absurd edit, easy to see
    pb.relay.server_data(NOTICE[:3])
    pb.relay.edit_errors()
    pb.relay.server_data(NOTICE[3:] + ERROR)
    assert pb.client.data == NOTICE + READY_I
    pb.log.clear()
    pb.relay.server_data(ERROR[:10])
    assert pb.client.chunks[-1] == b""  # held until whole
    pb.relay.server_data(ERROR[10:])
    assert pb.client.data == NOTICE + READY_I * 2


def test_close_closes_every_hook() -> None:
    pb = Playbook()
    pb.hook("a")
    pb.hook("b")
    pb.relay.close()
    assert pb.calls("close") == [("a", "close"), ("b", "close")]
    assert pb.relay.hooks == []
    pb.relay.server_data(READY_I)
    assert pb.calls("server_sent") == []


def test_gone_client_gets_nothing_but_the_books_go_on() -> None:
    """After the client left (`relay.client = None`) the server stream is still read."""
    pb = Playbook()
    pb.relay.client_data(m.Query("SELECT 1").encode())
    pb.relay.client = None
    pb.relay.server_data(READY_I)
    assert pb.client.chunks == []
    assert pb.round_trips.idle


# ------------------------------------------------------- the switch from authentication


def test_track_server_reads_bytes_the_client_already_has() -> None:
    """What followed the first ReadyForQuery in its chunk went to the client with it; the
    session hands it to `track_server`: the reader takes the stream from there (at a
    boundary), nothing is written or counted as relayed, and the stream goes on. Here the
    tail ends inside the reply's ReadyForQuery."""
    books = RoundTrips()
    books.awaiting = 1  # a Query pipelined behind the startup packet
    pb = Playbook(round_trips=books)
    pb.hook()
    reply = encode(*ROWS) + READY_I
    assert pb.relay.track_server(reply[:-3])
    assert pb.client.chunks == [] and pb.owner.bytes_out == 0
    assert books.readies == 0 and books.awaiting == 1
    assert pb.relay.server_position() == (READY_I[:3], 0)
    pb.relay.server_data(reply[-3:])
    assert pb.client.chunks == [reply[-3:]]
    assert books.readies == 1 and books.idle
    assert pb.calls("round_trip_end") == [("hook", "round_trip_end", b"I", True)]


def test_track_server_counts_a_whole_ready() -> None:
    books = RoundTrips()
    books.awaiting = 1
    pb = Playbook(round_trips=books)
    assert pb.relay.track_server(encode(*ROWS) + READY_I)
    assert books.readies == 1 and books.idle
    assert pb.relay.server_position() == (b"", 0)


def test_track_server_deferred_queues_the_tail() -> None:
    async def main() -> None:
        books = RoundTrips()
        books.awaiting = 1
        pb = Playbook(analysis(Backlog(max_chunks=1000, delay=60)), books)
        assert pb.relay.track_server(encode(*ROWS) + READY_I)
        assert len(pb.inspector.backlog) == 1  # type: ignore[union-attr]
        assert pb.client.chunks == [] and books.readies == 0
        pb.relay.catch_up()
        assert books.readies == 1 and books.idle

    asyncio.run(main())


def test_track_server_refuses_what_is_no_protocol_3_stream() -> None:
    pb = Playbook()
    pb.hook()
    assert not pb.relay.track_server(b"Z\x00\x00\x00\x01")
    assert [(side, str(exc)) for side, exc in pb.owner.violations] == [
        ("server", "invalid length 1 for message type 0x5a")
    ]
    assert pb.client.chunks == [] and pb.calls() == []


def test_a_ready_in_the_tail_at_the_switch_reaches_the_hooks() -> None:
    """As the session does it: BEGIN pipelined behind the startup packet, its reply in the
    chunk of the first ReadyForQuery; that ready counted, the relay built, a realtime
    TimeoutHook added, then the tail tracked. The client now sits idle in a transaction:
    the idle-in-transaction timer must be armed."""

    async def main() -> None:
        books = RoundTrips()
        books.client([(ord("Q"), None)])  # the pipelined BEGIN
        books.ready(b"I", 0.0)  # authentication's ReadyForQuery
        pb = Playbook(analysis(), books)
        control = Control(pb.relay)
        timers = Timers()
        policy = {"idle_in_transaction": "2s"}
        hook = TimeoutHook(
            control,  # type: ignore[arg-type]
            TimeoutPolicy(settings_from_dict({"timeouts": policy}).timeouts),
            Metrics(),
            timers.call_later,
        )
        pb.relay.add_hook(hook)
        assert pb.relay.track_server(m.CommandComplete("BEGIN").encode() + READY_T)
        assert books.readies == 2 and books.status == b"T"
        assert [t.delay for t in timers.live] == [2.0]

    asyncio.run(main())


# -------------------------------------------------------------------- with analysis


def test_round_trip_end_for_a_ready_a_catch_up_read() -> None:
    """Deferred: a ReadyForQuery is counted when the session catches up (here `running()`
    asks), not as its chunk passes; the hooks hear of it with the next server chunk, once."""

    async def main() -> None:
        pb = Playbook(analysis(Backlog(max_chunks=1000, delay=60)))
        pb.hook()
        pb.relay.client_data(m.Query("BEGIN").encode())
        pb.relay.server_data(m.CommandComplete("BEGIN").encode() + READY_T)
        assert pb.round_trips.readies == 0 and pb.calls("round_trip_end") == []
        assert pb.relay.running() is None  # caught up
        assert pb.round_trips.readies == 1 and pb.round_trips.status == b"T"
        assert pb.calls("round_trip_end") == []
        pb.relay.server_data(NOTICE)
        assert pb.calls("round_trip_end") == [("hook", "round_trip_end", b"T", True)]
        pb.relay.server_data(NOTICE)
        assert len(pb.calls("round_trip_end")) == 1

    asyncio.run(main())


def test_plain_without_inspector() -> None:
    pb = Playbook()
    assert pb.relay.mode == "plain"
    assert pb.relay.running() is None
    pb.relay.server_data(NOTICE[:7])
    assert pb.relay.server_position() == (b"", len(NOTICE) - 7)


def test_deferred_books_current_after_catch_up() -> None:
    """With an Inspector, the server side of the round trips waits in the Backlog until
    the relay catches up; the client side is counted at once; bytes pass unchanged."""

    async def main() -> None:
        pb = Playbook(analysis())
        relay, books = pb.relay, pb.round_trips
        assert relay.mode == "deferred"
        query = m.Query("SELECT 1").encode()
        relay.client_data(query)
        reply = encode(*ROWS) + READY_I
        relay.server_data(reply)
        assert pb.server.chunks == [query] and pb.client.chunks == [reply]
        assert books.awaiting == 1 and books.readies == 0  # not read yet
        assert len(pb.inspector.backlog) == 2  # type: ignore[union-attr]
        relay.catch_up()
        assert books.readies == 1 and books.idle
        assert len(pb.inspector.backlog) == 0  # type: ignore[union-attr]

    asyncio.run(main())


def test_catch_up_leaves_other_sessions_queued() -> None:
    """Two relays on one Backlog: catching one up analyses its chunks only."""

    async def main() -> None:
        shared = analysis(Backlog(max_chunks=1000, delay=60))
        a, b = Playbook(shared), Playbook(shared)
        for pb in (a, b):
            pb.relay.client_data(m.Query("SELECT 1").encode())
            pb.relay.server_data(encode(*ROWS) + READY_I)
        assert len(shared.backlog) == 4
        a.relay.catch_up()
        assert a.round_trips.idle and a.round_trips.readies == 1
        assert b.round_trips.awaiting == 1 and b.round_trips.readies == 0
        assert len(shared.backlog) == 2
        assert {item[0] for item in shared.backlog._items} == {b.inspector}
        b.relay.catch_up()
        assert b.round_trips.idle and len(shared.backlog) == 0

    asyncio.run(main())


def test_running_and_position_catch_up_first() -> None:
    """`running()` and `server_position()` bring the tracker current before answering."""

    async def main() -> None:
        pb = Playbook(analysis())
        relay = pb.relay
        relay.client_data(m.Query("SELECT pg_sleep(10)").encode())
        current = relay.running()
        assert current is not None
        assert current.event.info.command == "SELECT"
        rows = encode(*ROWS)
        relay.server_data(rows[:3])
        assert relay.server_position() == (rows[:3], 0)  # a partial header
        relay.server_data(rows[3:9])
        assert relay.server_position() == (b"", len(ROWS[0].encode()) - 9)
        relay.server_data(rows[9:] + READY_I)
        assert relay.running() is None
        assert relay.server_position() == (b"", 0)
        assert pb.round_trips.idle

    asyncio.run(main())


def test_a_realtime_hook_switches_to_realtime_after_catching_up() -> None:
    """The session's queued chunks are analysed first (the round trips current), other
    sessions' stay queued, and from then on the tracker reads each chunk as it passes."""

    async def main() -> None:
        shared = analysis(Backlog(max_chunks=1000, delay=60))
        pb, other = Playbook(shared), Playbook(shared)
        for p in (pb, other):
            p.relay.client_data(m.Query("BEGIN").encode())
            p.relay.server_data(m.CommandComplete("BEGIN").encode() + READY_T)
        pb.hook("plain")
        assert pb.relay.mode == "deferred"
        pb.hook("now", cls=RealtimeRecorder)
        assert pb.relay.mode == "realtime"
        assert pb.round_trips.status == b"T" and pb.round_trips.readies == 1
        assert other.round_trips.readies == 0
        assert len(shared.backlog) == 2
        pb.relay.client_data(m.Query("COMMIT").encode())
        pb.relay.server_data(m.CommandComplete("COMMIT").encode() + READY_I)
        assert len(shared.backlog) == 2  # nothing queued for the realtime session
        assert pb.round_trips.readies == 2 and pb.round_trips.idle
        assert pb.calls("round_trip_end") == [
            ("plain", "round_trip_end", b"I", True),
            ("now", "round_trip_end", b"I", True),
        ]

    asyncio.run(main())


def test_a_plain_relay_stays_plain_with_a_realtime_hook() -> None:
    pb = Playbook()
    pb.hook(cls=RealtimeRecorder)
    assert pb.relay.mode == "plain"


def test_edit_errors_deferred_starts_where_the_tracker_stands() -> None:
    """Deferred: `edit_errors` catches up, then starts the editor where the stream stands,
    so a message half sent passes unedited and the next error goes to the hooks."""

    async def main() -> None:
        pb = Playbook(analysis())
        pb.hook(error=lambda raw: NOTICE, wants_errors=True)
        pb.relay.client_data(m.Query("SELECT 1/0").encode())
        pb.relay.server_data(ERROR[:8])
        pb.relay.edit_errors()
        pb.relay.server_data(ERROR[8:] + ERROR + READY_I)
        assert pb.client.data == ERROR + NOTICE + READY_I
        pb.relay.catch_up()
        assert pb.round_trips.idle

    asyncio.run(main())


def test_books_lost_when_the_tracker_cannot_read_the_server() -> None:
    """Deferred: garbage from the server is found when the tracker reads it; the tracker
    kept the books, so the session is told they are lost."""

    async def main() -> None:
        pb = Playbook(analysis())
        pb.relay.server_data(b"Z\x00\x00\x00\x01")
        assert pb.owner.violations == [] and pb.owner.lost == []
        pb.relay.catch_up()
        assert [type(exc) for exc in pb.owner.lost] == [ProtocolViolation]

    asyncio.run(main())


# ----------------------------------------------------------- rules on a relay with analysis


def test_rules_clear_a_skipped_block_at_the_round_trip_end() -> None:
    """A pipeline whose first statement fails: the server skips the blocked Parse, so its
    marker error never comes; the round trip's end must forget it and stop editing. The
    rules turn the relay realtime, so that end comes with the chunk holding the ready."""

    async def main() -> None:
        settings = settings_from_dict(
            {
                "blocks": [
                    {"name": "no-delete-all", "match": {"command": "DELETE", "without_where": True}}
                ]
            }
        )
        engine = RuleEngine(settings.rewrites, settings.blocks)
        pb = Playbook(analysis(Backlog(max_chunks=1000, delay=60)))
        hook = RulesHook(Control(pb.relay), lambda: engine, Analyzer(), Metrics())  # type: ignore[arg-type]
        assert pb.relay.mode == "deferred"
        pb.relay.add_hook(hook)
        assert pb.relay.mode == "realtime"
        pipeline = encode(
            m.Parse("", "SELECT 1/0"),
            m.Bind("", ""),
            m.Execute(""),
            m.Parse("", "DELETE FROM orders"),
            m.Bind("", ""),
            m.Execute(""),
            m.Sync(),
        )
        pb.relay.client_data(pipeline)
        assert BLOCK_MARKER.encode() in pb.server.data
        assert hook.edits_errors and pb.relay.errors is not None
        pb.relay.server_data(encode(m.ParseComplete(), m.BindComplete()) + ERROR + READY_I)
        assert not hook.edits_errors
        assert pb.relay.errors is None

    asyncio.run(main())
