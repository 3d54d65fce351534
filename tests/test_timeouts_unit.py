"""Statement and transaction timeouts without a network: which limit applies
(TimeoutPolicy), when timers fire (TimeoutGuard on a fake clock), and the byte-level
helpers (ErrorEditor, rewrite_cancel, flush_after_executes).

Messages are built by hand here, not with pgwarden's codec, so a codec bug cannot hide
itself.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from proxy.analysis.analyzer import Parsed, StatementInfo
from proxy.analysis.matching import SessionIdentity
from proxy.config import ConfigError, TimeoutSettings, settings_from_dict
from proxy.protocol import messages as m
from proxy.protocol.editor import ErrorEditor, flush_after_executes
from proxy.timeouts import Limit, TimeoutGuard, TimeoutPolicy, rewrite_cancel
from proxy.tracking.events import Running, StatementEvent
from tests.support.rawpg import error_fields

ALICE = SessionIdentity("alice", "shop", "web")
BOB = SessionIdentity("bob", "analytics", "reporter")


# ----------------------------------------------------------------------------- helpers


def timeouts(**config: Any) -> TimeoutSettings:
    """`timeouts:` settings through the real loader, as a config file would give them."""
    return settings_from_dict({"timeouts": config}).timeouts


def info(
    command: str = "SELECT",
    tables: tuple[str, ...] = (),
    fingerprint: str | None = None,
    normalized: str | None = None,
) -> StatementInfo:
    """A statement's analysis; the fingerprint defaults to something unique to its shape."""
    normalized = normalized or f"{command} $1 FROM {', '.join(tables) or 'nothing'}"
    return StatementInfo(
        fingerprint=fingerprint or f"fp-{abs(hash(normalized)):x}",
        normalized=normalized,
        command=command,
        tables=tables,
    )


def message(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", 4 + len(body)) + body


def error_body(fields: dict[str, str]) -> bytes:
    return b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0"


def error(fields: dict[str, str]) -> bytes:
    return message(b"E", error_body(fields))


CANCEL_FIELDS = {
    "S": "ERROR",
    "V": "ERROR",
    "C": "57014",
    "M": "canceling statement due to user request",
    "W": 'SQL statement "SELECT pg_sleep(5)"\nPL/pgSQL function f() line 3 at PERFORM',
    "F": "postgres.c",
    "L": "3297",
    "R": "ProcessInterrupts",
}


class FakeTimer:
    """What call_later returns; `fire()` runs the callback even when it was cancelled,
    as a callback the event loop had already queued would run."""

    def __init__(self, due: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.due = due
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        self.fired = True
        self.callback(*self.args)


class FakeLoop:
    """call_later and a clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> FakeTimer:
        assert delay >= 0, delay
        timer = FakeTimer(self.now + delay, callback, args)
        self.timers.append(timer)
        return timer

    @property
    def live(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled and not t.fired]

    def advance(self, seconds: float) -> None:
        """Move the clock, firing due timers in order as asyncio would (cancelled ones not)."""
        target = self.now + seconds
        while True:
            due = [t for t in self.live if t.due <= target + 1e-9]
            if not due:
                break
            timer = min(due, key=lambda t: t.due)
            self.now = max(self.now, timer.due)
            timer.fire()
        self.now = target


class Harness:
    """A TimeoutGuard on a FakeLoop, recording what it reports."""

    def __init__(self, settings: TimeoutSettings, identity: SessionIdentity = ALICE) -> None:
        self.loop = FakeLoop()
        self.statements: list[tuple[StatementInfo, float, Limit]] = []
        self.transactions: list[tuple[str, Limit]] = []
        self.guard = TimeoutGuard(
            TimeoutPolicy(settings),
            identity,
            self.loop.call_later,
            self.loop.clock,
            lambda i, started, limit: self.statements.append((i, started, limit)),
            lambda kind, limit: self.transactions.append((kind, limit)),
        )

    def run(self, statement: StatementInfo, *later: StatementInfo) -> Running:
        """Tell the guard `statement` started now (with `later` after it in one Query)."""
        now = self.loop.now
        current = Running(StatementEvent(Parsed(statement), sent=now, started=now), now, later)
        self.guard.running(current)
        return current


# ------------------------------------------------------------------------- the policy


def test_limit_describe() -> None:
    assert Limit("x", 0.5).describe() == "500ms"
    assert Limit("x", 0.3).describe() == "300ms"
    assert Limit("x", 5.0).describe() == "5s"
    assert Limit("x", 1.5).describe() == "1.5s"
    assert Limit("x", 120.0).describe() == "120s"


def test_policy_first_matching_rule_wins() -> None:
    policy = TimeoutPolicy(
        timeouts(
            statement="30s",
            rules=[
                {"name": "reports", "match": {"tables": ["report_runs"]}, "statement": "5s"},
                {"name": "selects", "match": {"command": "SELECT"}, "statement": "1s"},
                {"name": "reports-again", "match": {"tables": ["report_runs"]}, "statement": 1},
            ],
        )
    )
    assert policy.limits(info(tables=("report_runs",)), ALICE)[0] == Limit("reports", 5.0)
    assert policy.limits(info(tables=("orders",)), ALICE)[0] == Limit("selects", 1.0)
    assert policy.limits(info("UPDATE", ("orders",)), ALICE)[0] == Limit("default", 30.0)


def test_policy_first_match_wins_even_without_a_statement_limit() -> None:
    """A matching rule that sets only `transaction` still stops the search: later rules do
    not apply, and the statement falls back to the default."""
    policy = TimeoutPolicy(
        timeouts(
            statement="30s",
            rules=[
                {"name": "batch", "match": {"application_name": "web"}, "transaction": "1m"},
                {"name": "web-stmt", "match": {"application_name": "web"}, "statement": "1s"},
            ],
        )
    )
    statement, transaction = policy.limits(info(), ALICE)
    assert statement == Limit("default", 30.0)
    assert transaction == Limit("batch", 60.0)


@pytest.mark.parametrize(
    ("field", "value", "hit", "miss_info", "miss_identity"),
    [
        ("command", "DELETE", (info("DELETE", ("t",)), ALICE), info("SELECT", ("t",)), None),
        ("fingerprint", "abc123", (info(fingerprint="abc123"), ALICE), info(), None),
        ("user", "alice", (info(), ALICE), None, BOB),
        ("database", "analytics", (info(), BOB), None, ALICE),
        ("application_name", "reporter", (info(), BOB), None, ALICE),
        ("tables", ["orders"], (info(tables=("users", "orders")), ALICE), info(), None),
    ],
)
def test_policy_each_match_field(
    field: str,
    value: Any,
    hit: tuple[StatementInfo, SessionIdentity],
    miss_info: StatementInfo | None,
    miss_identity: SessionIdentity | None,
) -> None:
    policy = TimeoutPolicy(
        timeouts(rules=[{"name": "r", "match": {field: value}, "statement": "2s"}])
    )
    assert policy.limits(*hit)[0] == Limit("r", 2.0)
    miss = (miss_info or hit[0], miss_identity or hit[1])
    assert policy.limits(*miss) == (None, None)


def test_policy_all_given_fields_must_match() -> None:
    policy = TimeoutPolicy(
        timeouts(
            rules=[
                {
                    "name": "r",
                    "match": {"tables": ["orders"], "command": "SELECT", "user": "alice"},
                    "statement": "2s",
                }
            ]
        )
    )
    assert policy.limits(info(tables=("orders",)), ALICE)[0] == Limit("r", 2.0)
    assert policy.limits(info(tables=("orders",)), BOB)[0] is None
    assert policy.limits(info("UPDATE", ("orders",)), ALICE)[0] is None
    assert policy.limits(info(tables=("users",)), ALICE)[0] is None


@pytest.mark.parametrize(
    ("rule_table", "statement_tables", "matches"),
    [
        ("report_runs", ("report_runs",), True),
        ("report_runs", ("public.report_runs",), True),  # unqualified rule: any schema
        ("report_runs", ("archive.report_runs",), True),
        ("public.report_runs", ("public.report_runs",), True),
        ("public.report_runs", ("archive.report_runs",), False),
        ("report_runs", ("report_runs_old",), False),
        ("report_runs", ("other", "s.report_runs"), True),
    ],
)
def test_policy_tables_qualified_and_unqualified(
    rule_table: str, statement_tables: tuple[str, ...], matches: bool
) -> None:
    policy = TimeoutPolicy(
        timeouts(rules=[{"name": "r", "match": {"tables": [rule_table]}, "statement": "2s"}])
    )
    expected = Limit("r", 2.0) if matches else None
    assert policy.limits(info(tables=statement_tables), ALICE)[0] == expected


def test_policy_default_fallback_and_nothing() -> None:
    assert TimeoutPolicy(timeouts()).limits(info(), ALICE) == (None, None)
    assert not TimeoutPolicy(timeouts()).enforces_anything
    policy = TimeoutPolicy(
        timeouts(
            statement="250ms",
            transaction="1m",
            rules=[{"name": "r", "match": {"user": "bob"}, "statement": "2s"}],
        )
    )
    assert policy.enforces_anything
    assert policy.limits(info(), ALICE) == (Limit("default", 0.25), Limit("default", 60.0))
    assert policy.limits(info(), BOB) == (Limit("r", 2.0), Limit("default", 60.0))


def test_policy_transaction_limits() -> None:
    policy = TimeoutPolicy(
        timeouts(
            transaction="10m",
            rules=[
                {"name": "both", "match": {"tables": ["a"]}, "statement": "1s", "transaction": 5},
                {"name": "tx", "match": {"tables": ["b"]}, "transaction": "2m"},
            ],
        )
    )
    assert policy.limits(info(tables=("a",)), ALICE) == (Limit("both", 1.0), Limit("both", 5.0))
    assert policy.limits(info(tables=("b",)), ALICE) == (None, Limit("tx", 120.0))
    assert policy.limits(info(tables=("c",)), ALICE) == (None, Limit("default", 600.0))


def test_policy_cache_keeps_identities_apart() -> None:
    """The same statement shape gets each session's own answer, however often it is asked."""
    policy = TimeoutPolicy(
        timeouts(rules=[{"name": "bob", "match": {"user": "bob"}, "statement": "2s"}])
    )
    statement = info(tables=("t",))
    for _ in range(3):
        assert policy.limits(statement, ALICE)[0] is None
        assert policy.limits(statement, BOB)[0] == Limit("bob", 2.0)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (
            {"rules": [{"name": "a", "statement": 1}, {"name": "a", "statement": 2}]},
            "rules[1].name",
        ),
        ({"rules": [{"name": "a", "match": {"schema": "x"}, "statement": 1}]}, "match.schema"),
        ({"rules": [{"name": "a", "statement": "soon"}]}, "rules[0].statement"),
        ({"rules": [{"match": {"user": "x"}, "statement": 1}]}, "rules[0].name"),
        ({"rules": [{"name": "a", "match": {"user": "x"}}]}, "rules[0]"),
        ({"statement": "-1s"}, "timeouts.statement"),
        ({"idle_in_transaction": "1 minute"}, "timeouts.idle_in_transaction"),
        ({"server_side": "yes"}, "timeouts.server_side"),
    ],
)
def test_settings_errors_name_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        timeouts(**config)
    assert key in str(caught.value)
    assert str(caught.value).startswith("timeouts.")


# -------------------------------------------------------------------------- the guard


def test_guard_arms_for_the_running_statement() -> None:
    h = Harness(timeouts(statement="2s"))
    statement = info(tables=("t",))
    started = h.loop.now
    h.run(statement)
    assert [t.due - started for t in h.loop.live] == [2.0]
    h.loop.advance(1.999)
    assert h.statements == []
    h.loop.advance(0.002)
    assert h.statements == [(statement, started, Limit("default", 2.0))]


def test_guard_nothing_armed_without_a_limit() -> None:
    h = Harness(timeouts(rules=[{"name": "r", "match": {"tables": ["x"]}, "statement": 1}]))
    h.run(info(tables=("t",)))
    assert h.loop.live == []
    h.loop.advance(100)
    assert h.statements == []


def test_guard_rearms_when_the_statement_changes() -> None:
    h = Harness(
        timeouts(
            statement="2s", rules=[{"name": "fast", "match": {"tables": ["f"]}, "statement": 1}]
        )
    )
    first = h.run(info(tables=("t",)))
    first_timer = h.loop.live[0]
    h.guard.running(first)  # told again about the same statement: the timer stays
    assert h.loop.live == [first_timer]
    h.loop.advance(1.5)
    second = info(tables=("f",))
    h.run(second)
    assert first_timer.cancelled
    [second_timer] = h.loop.live
    assert second_timer.due == pytest.approx(h.loop.now + 1.0)
    h.loop.advance(0.9)  # past the first statement's deadline, not the second's
    assert h.statements == []
    h.loop.advance(0.2)
    assert [(s, limit) for s, _, limit in h.statements] == [(second, Limit("fast", 1.0))]


def test_guard_late_timer_never_hits_the_next_statement() -> None:
    """A timer whose callback was already on its way when its statement ended reports
    nothing: neither for the old statement nor against the one running now."""
    h = Harness(timeouts(statement="1s"))
    h.run(info(tables=("t",)))
    old = h.loop.live[0]
    h.loop.now += 1.0  # the deadline passes while the loop is busy elsewhere...
    h.guard.running(None)  # ...and the statement's end is seen first
    old.fire()
    assert h.statements == []
    h.run(info(tables=("next",)))  # the next statement: its own full limit
    old.fire()
    assert h.statements == []
    [new] = h.loop.live
    assert new is not old and new.due == pytest.approx(h.loop.now + 1.0)
    h.loop.advance(0.99)
    assert h.statements == []


def test_guard_late_timer_after_a_direct_switch() -> None:
    """Statement A ends and B starts in the same batch of replies (a pipeline)."""
    h = Harness(timeouts(statement="1s"))
    h.run(info(tables=("a",)))
    old = h.loop.live[0]
    h.loop.now += 1.0
    b = info(tables=("b",))
    h.run(b)
    old.fire()
    assert h.statements == []
    h.loop.advance(1.0)
    assert [s for s, _, _ in h.statements] == [b]


def test_guard_timer_ignores_a_finished_statement() -> None:
    """The tracker marked the event finished but the guard was not told yet."""
    h = Harness(timeouts(statement="1s"))
    current = h.run(info())
    current.event.finished = h.loop.now + 0.5
    h.loop.advance(2)
    assert h.statements == []


def test_guard_multi_statement_deadlines_are_cumulative() -> None:
    """Statements of one Query: each deadline counts the limits before it; one with no limit
    is assumed quick. `SELECT 1; slow (1s); slower (500ms)`: the 1s statement's deadline
    (t0+1s) comes before the 500ms one's (t0+1.5s)."""
    h = Harness(
        timeouts(
            rules=[
                {"name": "one", "match": {"tables": ["slow"]}, "statement": 1},
                {"name": "half", "match": {"tables": ["slower"]}, "statement": "500ms"},
            ]
        )
    )
    t0 = h.loop.now
    quick, slow, slower = info(), info(tables=("slow",)), info(tables=("slower",))
    h.run(quick, slow, slower)
    [timer] = h.loop.live
    assert timer.due == pytest.approx(t0 + 1.0)
    h.loop.advance(1.0)
    assert h.statements == [(slow, t0, Limit("one", 1.0))]


def test_guard_multi_statement_later_limit_counts_from_the_earlier_ones() -> None:
    """`slow (1s); unlimited; slower (500ms)` moving on to the second statement: the
    500ms one is due 500ms after the (assumed quick) unlimited one starts."""
    h = Harness(
        timeouts(
            rules=[
                {"name": "one", "match": {"tables": ["slow"]}, "statement": 1},
                {"name": "half", "match": {"tables": ["slower"]}, "statement": "500ms"},
            ]
        )
    )
    h.run(info(tables=("slow",)), info(), info(tables=("slower",)))
    h.loop.advance(0.3)  # the first statement's reply arrives: the second runs
    t1 = h.loop.now
    slower = info(tables=("slower",))
    h.run(info(), slower)
    [timer] = h.loop.live
    assert timer.due == pytest.approx(t1 + 0.5)
    h.loop.advance(0.5)
    assert h.statements == [(slower, t1, Limit("half", 0.5))]


def test_guard_counts_from_when_the_statement_started() -> None:
    """A statement the tracker says started earlier (pipelined) is due from its start."""
    h = Harness(timeouts(statement="1s"))
    started = h.loop.now - 0.4
    event = StatementEvent(Parsed(info()), sent=started, started=started)
    h.guard.running(Running(event, started))
    assert h.loop.live[0].due == pytest.approx(started + 1.0)
    h.loop.advance(0.6)
    assert [s for _, s, _ in h.statements] == [started]


def test_guard_idle_in_transaction() -> None:
    h = Harness(timeouts(idle_in_transaction="2s"))
    h.guard.ready(b"T", idle=True)
    [idle] = h.loop.live
    h.loop.advance(1.5)
    h.guard.client_active()  # the client sends the next statement
    assert idle.cancelled
    h.guard.ready(b"T", idle=False)  # a reply with more owed: not idle yet
    assert h.loop.live == []
    h.loop.advance(10)
    assert h.transactions == []
    h.guard.ready(b"T", idle=True)
    h.loop.advance(1.999)
    assert h.transactions == []
    h.loop.advance(0.002)
    assert h.transactions == [("idle_in_transaction", Limit("default", 2.0))]


def test_guard_idle_timer_rearmed_and_ended_by_commit() -> None:
    h = Harness(timeouts(idle_in_transaction="2s"))
    h.guard.ready(b"T", idle=True)
    h.loop.advance(1.5)
    h.guard.ready(b"E", idle=True)  # a failed statement: still in the transaction
    h.loop.advance(1.5)
    assert h.transactions == []  # counted from the latest ReadyForQuery
    h.guard.ready(b"I", idle=True)
    assert h.loop.live == []
    h.loop.advance(10)
    assert h.transactions == []


def test_guard_idle_timer_late_fire_after_commit() -> None:
    h = Harness(timeouts(idle_in_transaction="1s"))
    h.guard.ready(b"T", idle=True)
    [idle] = h.loop.live
    h.loop.now += 1.0
    h.guard.ready(b"I", idle=True)
    idle.fire()
    assert h.transactions == []


def test_guard_transaction_timer() -> None:
    h = Harness(timeouts(transaction="3s"))
    t0 = h.loop.now
    h.guard.ready(b"T", idle=True)
    for _ in range(5):  # many short statements do not move the deadline
        h.loop.advance(0.5)
        h.guard.client_active()
        h.run(info())
        h.guard.running(None)
        h.guard.ready(b"T", idle=True)
    assert h.transactions == []
    h.loop.advance(t0 + 3.0 - h.loop.now)
    assert h.transactions == [("transaction", Limit("default", 3.0))]


def test_guard_transaction_timer_ends_with_the_transaction() -> None:
    h = Harness(timeouts(transaction="3s"))
    h.guard.ready(b"T", idle=True)
    h.loop.advance(2)
    h.guard.ready(b"I", idle=True)
    h.loop.advance(5)
    assert h.transactions == []
    h.guard.ready(b"T", idle=True)  # the next transaction gets its own full limit
    h.loop.advance(2.9)
    assert h.transactions == []
    h.loop.advance(0.2)
    assert [kind for kind, _ in h.transactions] == ["transaction"]


@pytest.mark.parametrize("position", [0, 1])
def test_guard_transaction_opened_within_one_query(position: int) -> None:
    """`BEGIN; UPDATE ...; SELECT pg_sleep(30)` in one Query: no ReadyForQuery comes until
    it all ends, so the transaction clock starts when the Query starts."""
    h = Harness(timeouts(transaction="1s"))
    statements = [info("BEGIN", normalized="BEGIN"), info("UPDATE", ("t",)), info()]
    if position:
        statements.insert(0, info(normalized="SELECT $1"))  # quick, before the BEGIN
    t0 = h.loop.now
    h.run(*statements)
    h.loop.advance(0.999)
    assert h.transactions == []
    h.loop.advance(0.002)
    assert h.transactions == [("transaction", Limit("default", 1.0))]
    assert h.loop.now - t0 < 1.01


@pytest.mark.parametrize(
    "commands",
    [
        ["SELECT", "UPDATE"],  # an implicit transaction is not a transaction block
        ["BEGIN", "UPDATE", "COMMIT", "SELECT"],  # the long one runs after the COMMIT
        ["BEGIN", "UPDATE", "ROLLBACK"],
    ],
)
def test_guard_no_transaction_clock_unless_one_stays_open(commands: list[str]) -> None:
    h = Harness(timeouts(transaction="1s"))
    h.run(*(info(c, normalized=f"{c} {i}") for i, c in enumerate(commands)))
    h.loop.advance(5)
    assert h.transactions == []


def test_guard_transaction_rule_tightens_but_never_loosens() -> None:
    h = Harness(
        timeouts(
            transaction="10s",
            rules=[
                {"name": "tight", "match": {"tables": ["hot"]}, "transaction": "2s"},
                {"name": "loose", "match": {"tables": ["cold"]}, "transaction": "1m"},
            ],
        )
    )
    t0 = h.loop.now
    h.guard.ready(b"T", idle=True)
    h.loop.advance(0.5)
    h.run(info(tables=("cold",)))
    h.guard.running(None)
    h.guard.ready(b"T", idle=True)
    h.loop.advance(0.5)
    h.run(info(tables=("hot",)))
    h.guard.running(None)
    h.guard.ready(b"T", idle=True)
    h.loop.advance(t0 + 2.0 - h.loop.now - 0.01)
    assert h.transactions == []
    h.loop.advance(0.02)
    assert h.transactions == [("transaction", Limit("tight", 2.0))]


def test_guard_close_disarms_everything() -> None:
    h = Harness(timeouts(statement="1s", transaction="2s", idle_in_transaction="1s"))
    h.guard.ready(b"T", idle=True)
    h.guard.client_active()
    h.run(info())
    assert h.loop.live
    h.guard.close()
    assert h.loop.live == []
    for timer in h.loop.timers:
        timer.fire()
    assert h.statements == [] and h.transactions == []


# ------------------------------------------------------------------ the error editor


def server_stream(rng: random.Random) -> tuple[list[bytes], list[int]]:
    """A plausible server reply stream as messages, and which of them are ErrorResponses."""
    messages = [
        message(b"1", b""),
        message(b"2", b""),
        message(b"T", b"\0\x01a\0" + b"\0" * 18),
        *(message(b"D", b"\0\x01" + struct.pack("!I", n) + b"x" * n) for n in (0, 3, 70000)),
        message(b"C", b"SELECT 3\0"),
        error(CANCEL_FIELDS),
        message(b"N", error_body({"S": "NOTICE", "C": "00000", "M": "hello"})),
        message(b"Z", b"E"),
        error({"S": "ERROR", "C": "42P01", "M": "relation does not exist"}),
        message(b"E", b""),  # an empty one is still handed over
        message(b"Z", b"I"),
    ]
    for _ in range(20):
        n = rng.randrange(0, 300)
        messages.append(message(b"D", b"\0\x01" + struct.pack("!I", n) + bytes(n)))
    messages.append(error(CANCEL_FIELDS))
    errors = [i for i, msg in enumerate(messages) if msg[:1] == b"E"]
    return messages, errors


def chunked(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut at random places, from single bytes to large pieces."""
    chunks, pos = [], 0
    while pos < len(data):
        size = rng.choice((1, 2, 3, 4, 5, 6, rng.randrange(1, 64), rng.randrange(1, 100000)))
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def mark(raw: bytes) -> bytes:
    """An edit that changes an error's length and content, and is easy to spot."""
    fields = error_fields(raw[5:])
    fields["M"] = "EDITED " + fields.get("M", "") + " " + "z" * 40
    return error(fields)


@pytest.mark.parametrize("seed", range(12))
def test_error_editor_passes_every_other_byte(seed: int) -> None:
    rng = random.Random(seed)
    messages, errors = server_stream(rng)
    seen: list[bytes] = []

    def edit(raw: bytes) -> bytes:
        seen.append(raw)
        return mark(raw)

    editor = ErrorEditor(edit)
    out = b"".join(editor.feed(chunk) for chunk in chunked(b"".join(messages), rng))
    expected = [mark(msg) if i in errors else msg for i, msg in enumerate(messages)]
    assert out == b"".join(expected)
    assert seen == [messages[i] for i in errors]
    assert editor.at_boundary


def test_error_editor_identity_edit_is_byte_identical() -> None:
    rng = random.Random(99)
    messages, _ = server_stream(rng)
    data = b"".join(messages)
    editor = ErrorEditor(lambda raw: raw)
    assert b"".join(editor.feed(c) for c in chunked(data, rng)) == data


def test_error_editor_passes_non_errors_unbuffered() -> None:
    """Only ErrorResponses are held: a DataRow goes out as it arrives, byte by byte."""
    row = message(b"D", b"\0\x01" + struct.pack("!I", 10) + b"0123456789")
    editor = ErrorEditor(mark)
    assert editor.feed(row[:5]) == row[:5]
    assert [editor.feed(row[i : i + 1]) for i in range(5, len(row))] == [
        row[i : i + 1] for i in range(5, len(row))
    ]
    held = error(CANCEL_FIELDS)
    editor = ErrorEditor(mark)
    assert editor.feed(held[:-1]) == b""
    assert editor.feed(held[-1:]) == mark(held)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("where", ["header", "body"])
def test_error_editor_starting_mid_message(seed: int, where: str) -> None:
    """Taking over a stream inside a message (an ErrorResponse, even): its rest passes
    untouched, and the errors after it are edited."""
    rng = random.Random(seed)
    messages, errors = server_stream(rng)
    data = b"".join(messages)
    first = errors[0]  # cut inside this error: it already started going out unedited
    start = sum(len(m) for m in messages[:first])
    length = len(messages[first])
    if where == "header":
        cut = start + rng.randrange(1, 5)
        editor = ErrorEditor(mark, header_sent=data[start:cut])
    else:
        cut = start + rng.randrange(5, length)
        editor = ErrorEditor(mark, passing=start + length - cut)
    out = b"".join(editor.feed(chunk) for chunk in chunked(data[cut:], rng))
    expected = [mark(msg) if i in errors[1:] else msg for i, msg in enumerate(messages)]
    assert out == b"".join(expected)[cut:]


# ------------------------------------------------------------------ rewrite_cancel


def test_rewrite_cancel_changes_only_the_message() -> None:
    raw = error(CANCEL_FIELDS)
    rewritten = rewrite_cancel(raw, Limit("reports", 5.0))
    assert rewritten is not None
    assert rewritten[:1] == b"E"
    assert struct.unpack("!I", rewritten[1:5])[0] == len(rewritten) - 1
    fields = error_fields(rewritten[5:])
    assert list(fields) == list(CANCEL_FIELDS)  # same fields, same order
    assert {k: v for k, v in fields.items() if k != "M"} == {
        k: v for k, v in CANCEL_FIELDS.items() if k != "M"
    }
    assert fields["M"] == (
        'canceling statement due to statement timeout (pgwarden rule "reports", 5s)'
    )
    assert error_fields(rewrite_cancel(raw, Limit("default", 0.5))[5:])["M"] == (  # type: ignore[index]
        'canceling statement due to statement timeout (pgwarden rule "default", 500ms)'
    )


@pytest.mark.parametrize(
    "raw",
    [
        error({"S": "ERROR", "C": "42P01", "M": 'relation "x" does not exist'}),
        error({"S": "FATAL", "C": "57P01", "M": "terminating connection"}),
        error({"S": "ERROR", "M": "no sqlstate"}),
        message(b"E", b"C57014\0Mtruncated"),  # malformed: no terminators
    ],
)
def test_rewrite_cancel_leaves_other_errors(raw: bytes) -> None:
    assert rewrite_cancel(raw, Limit("r", 1.0)) is None


# ------------------------------------------------------------ flush_after_executes

H = message(b"H", b"")
S = message(b"S", b"")
P = message(b"P", b"\0SELECT 1\0\0\0")
B = message(b"B", b"\0\0\0\0\0\0\0\0")
D = message(b"D", b"P\0")
E = message(b"E", b"\0\0\0\0\0")
E_NAMED = message(b"E", b"portal\0\0\0\0\x0a")


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([P, B, E, S], [P, B, E, S]),
        ([P, B, E, H], [P, B, E, H]),
        ([P, B, D, E], [P, B, D, E, H]),  # Execute last in the chunk
        ([P, B, E, B, E, S], [P, B, E, H, B, E, S]),
        ([B, E_NAMED, B, E, P, B, E, S], [B, E_NAMED, H, B, E, H, P, B, E, S]),
        ([B, E, H, B, E, S, B, E], [B, E, H, B, E, S, B, E, H]),
        ([P, S], [P, S]),
        ([message(b"Q", b"SELECT 1\0")], [message(b"Q", b"SELECT 1\0")]),
    ],
)
def test_flush_after_executes(messages: list[bytes], expected: list[bytes]) -> None:
    assert flush_after_executes(b"".join(messages)) == b"".join(expected)


def test_flush_after_executes_leaves_a_partial_message() -> None:
    """An Execute cut by the chunk boundary is not complete: nothing is inserted into it."""
    data = b"".join([B, E, B]) + E[:3]
    assert flush_after_executes(data) == b"".join([B, E, H, B]) + E[:3]
    assert flush_after_executes(E[:5]) == E[:5]
    assert flush_after_executes(b"") == b""


def test_flush_after_executes_ignores_execute_bytes_inside_bodies() -> None:
    """An 'E' inside a Parse's SQL or a Bind parameter is not a message."""
    parse = message(b"P", b"\0SELECT 'E\0\0\0\x04'\0\0\0")
    data = b"".join([parse, B, S])
    assert flush_after_executes(data) == data


def test_flush_after_executes_resumes_mid_message() -> None:
    """A chunk that starts inside a message still gets Flushes after its whole Executes."""
    bind = m.Bind("", "s", (), (b"x" * 40,), ()).encode()
    execute = m.Execute("", 0).encode()
    stream = bind + execute + bind + execute + m.Sync().encode()
    split = 17  # inside the first Bind
    tail = stream[split:]
    out = flush_after_executes(tail, len(bind) - split)
    flush = m.Flush().encode()
    expected = stream[split : len(bind)] + execute + flush + bind + execute + m.Sync().encode()
    assert out == expected
