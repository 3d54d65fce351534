"""The features on the relay path, without sockets: RulesHook and TimeoutHook driven
through their hook methods, with a fake session (SessionControl) that records what they
ask of it, real rules, a real analyzer and real metrics.

Timers are a fake `call_later` fired by hand, on a clock that moves only when told to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from proxy.analysis.analyzer import Analyzer
from proxy.analysis.matching import SessionIdentity
from proxy.config import settings_from_dict
from proxy.metrics import Metrics
from proxy.protocol import messages as m
from proxy.rewriters.rules import BLOCK_MARKER, RuleEngine
from proxy.session.rules import RulesHook
from proxy.session.timeouts import CANCEL_ANSWER_TIMEOUT, TimeoutHook
from proxy.timeouts import TimeoutPolicy
from proxy.tracking.events import Running, StatementEvent
from proxy.tracking.round_trips import RoundTrips
from tests.support.fake_timers import Timers

ALICE = SessionIdentity("alice", "shop", "web")
ANALYZER = Analyzer()

FLUSH = m.Flush().encode()
SYNC = m.Sync().encode()

# ----------------------------------------------------------------------------- fakes


class Control:
    """The session, as a hook sees it: records every request in `calls`."""

    def __init__(self) -> None:
        self.identity = ALICE
        self.round_trips = RoundTrips()
        self.calls: list[tuple[Any, ...]] = []
        self.current: Running | None = None  # what running() answers
        self.cancel_done: Callable[[], None] | None = None

    def log_fields(self) -> dict[str, object]:
        return {"client": "10.0.0.7:5123", "user": "alice"}

    def running(self) -> Running | None:
        return self.current

    def edit_errors(self) -> None:
        self.calls.append(("edit_errors",))

    def pause_client(self, reason: str) -> None:
        self.calls.append(("pause_client", reason))

    def resume_client(self, reason: str) -> None:
        self.calls.append(("resume_client", reason))

    def cancel_backend(self, done: Callable[[], None]) -> None:
        self.calls.append(("cancel_backend",))
        self.cancel_done = done

    def fail(self, sqlstate: str, message: str, reason: str) -> None:
        self.calls.append(("fail", sqlstate, message, reason))


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"{name}_total", labels) or 0.0


# ------------------------------------------------------------------------------ rules

RULES = {
    "rewrites": [
        {
            "name": "limit-orders",
            "match": {"statement": "SELECT * FROM orders WHERE customer_id = $1"},
            "replace": "SELECT * FROM orders WHERE customer_id = $1 LIMIT 100",
        }
    ],
    "blocks": [
        {"name": "no-delete-all", "match": {"command": "DELETE", "without_where": True}},
        {"name": "no-drop", "match": {"command": "DROP"}, "mode": "log"},
    ],
}


def engine() -> RuleEngine:
    settings = settings_from_dict(RULES)
    return RuleEngine(settings.rewrites, settings.blocks)


class Rules:
    def __init__(self, at: tuple[bytes, int] = (b"", 0)) -> None:
        self.session = Control()
        self.metrics = Metrics()
        self.engine: RuleEngine | None = engine()
        self.hook = RulesHook(
            self.session,
            lambda: self.engine,
            ANALYZER,
            self.metrics,
            at,  # type: ignore[arg-type]
        )


def marker_error(marker: str) -> bytes:
    """What PostgreSQL answers to the marker statement."""
    return m.ErrorResponse.build("ERROR", "42601", f'syntax error at or near "{marker}"').encode()


BLOCKED = m.ErrorResponse.build(
    "ERROR", "42501", 'pgwarden: statement blocked by rule "no-delete-all"'
).encode()


def test_a_blocked_delete_becomes_the_marker_and_its_error_the_block_error() -> None:
    """DELETE without WHERE: the server gets a marker statement (it fails harmlessly), the
    session is asked to edit errors, and the marker's error comes back as pgwarden's."""
    r = Rules()
    out = r.hook.edit_client(m.Query("DELETE FROM orders").encode())
    marker = f"{BLOCK_MARKER}_1"
    assert out == m.Query(marker).encode()
    assert r.session.calls == [("edit_errors",)]
    assert r.hook.edits_errors
    assert counter(r.metrics, "pgwarden_blocks", rule="no-delete-all", mode="enforce") == 1
    assert r.hook.server_error(marker_error(marker)) == BLOCKED
    assert not r.hook.edits_errors


def test_other_errors_pass_while_a_block_is_owed() -> None:
    r = Rules()
    r.hook.edit_client(m.Query("DELETE FROM orders").encode())
    other = m.ErrorResponse.build("ERROR", "22012", "division by zero").encode()
    assert r.hook.server_error(other) is None
    assert r.hook.edits_errors  # still owed


def test_a_skipped_block_is_forgotten_for_the_next_marker() -> None:
    """Two blocks in a pipeline, the first skipped by the server after an earlier error:
    the second's error still names the right rule, and nothing stays owed."""
    r = Rules()
    pipeline = (
        m.Parse("", "DELETE FROM orders").encode()
        + m.Parse("", "DELETE FROM customers").encode()
        + SYNC
    )
    out = r.hook.edit_client(pipeline)
    assert out == (
        m.Parse("", f"{BLOCK_MARKER}_1").encode() + m.Parse("", f"{BLOCK_MARKER}_2").encode() + SYNC
    )
    assert r.hook.server_error(marker_error(f"{BLOCK_MARKER}_2")) == BLOCKED
    assert not r.hook.edits_errors


def test_round_trip_end_forgets_blocks_once_nothing_is_owed() -> None:
    r = Rules()
    r.hook.edit_client(m.Query("DELETE FROM orders").encode())
    r.session.round_trips.awaiting = 1  # a round trip still owed: keep waiting
    r.hook.round_trip_end(b"I", False)
    assert r.hook.edits_errors
    r.session.round_trips.awaiting = 0
    r.hook.round_trip_end(b"I", True)
    assert not r.hook.edits_errors
    assert r.hook.server_error(marker_error(f"{BLOCK_MARKER}_1")) is None


def test_a_rewrite_rule_rewrites_the_query() -> None:
    r = Rules()
    out = r.hook.edit_client(m.Query("SELECT * FROM orders WHERE customer_id = 7").encode())
    assert out == m.Query("SELECT * FROM orders WHERE customer_id = 7 LIMIT 100").encode()
    assert r.session.calls == []  # a rewrite needs no error editing
    assert counter(r.metrics, "pgwarden_rewrites", rule="limit-orders", mode="enforce") == 1


def test_parse_is_handled_like_query() -> None:
    """Statement name and parameter types are kept; only the text changes."""
    r = Rules()
    parse = m.Parse("s1", "SELECT * FROM orders WHERE customer_id = $1", (23,)).encode()
    out = r.hook.edit_client(parse)
    assert (
        out
        == m.Parse("s1", "SELECT * FROM orders WHERE customer_id = $1 LIMIT 100", (23,)).encode()
    )
    out = r.hook.edit_client(m.Parse("s2", "DELETE FROM orders", (25, 23)).encode())
    assert out == m.Parse("s2", f"{BLOCK_MARKER}_1", (25, 23)).encode()


def test_a_statement_no_rule_matches_passes_byte_for_byte() -> None:
    r = Rules()
    query = m.Query("SELECT * FROM orders WHERE id = 1").encode()
    assert r.hook.edit_client(query) == query
    # whole messages, no Query or Parse: the very chunk object (no copy)
    other = m.Bind("", "s1").encode() + m.Execute("").encode() + SYNC
    assert r.hook.edit_client(other) is other
    # a message cut in its body: each part passes as it is
    bind = m.Bind("", "s1").encode()
    head, tail = bind[:6], bind[6:]
    assert r.hook.edit_client(head) is head
    assert r.hook.edit_client(tail) is tail
    # a header cut in two: held until whole (its type decides), then the same bytes
    assert r.hook.edit_client(bind[:3]) == b""
    rest = bind[3:] + SYNC
    out = r.hook.edit_client(rest)
    assert out == bind + SYNC and out is not rest
    assert r.session.calls == [] and not r.hook.edits_errors


def test_a_log_mode_rule_counts_but_leaves_the_statement() -> None:
    r = Rules()
    query = m.Query("DROP TABLE orders").encode()
    assert r.hook.edit_client(query) == query
    assert counter(r.metrics, "pgwarden_blocks", rule="no-drop", mode="log") == 1
    assert r.session.calls == []


def test_no_rules_in_force_passes_everything() -> None:
    r = Rules()
    r.engine = None  # a reload removed them
    query = m.Query("DELETE FROM orders").encode()
    assert r.hook.edit_client(query) == query


def test_a_query_cut_into_chunks_is_held_until_whole() -> None:
    """Nothing of a Query goes on until the rules have it all; what follows it in the
    same chunk comes right after."""
    r = Rules()
    query = m.Query("DELETE FROM orders").encode()
    assert r.hook.edit_client(query[:3]) == b""
    assert r.hook.edit_client(query[3:10]) == b""
    assert r.hook.edit_client(query[10:] + SYNC) == m.Query(f"{BLOCK_MARKER}_1").encode() + SYNC


def test_rules_started_mid_message_pass_its_rest() -> None:
    """Started as a reload adds rules to an open session, inside a Query (as
    FrameDecoder.remaining() tells it): its rest passes as it is, the next is decided."""
    query = m.Query("DELETE FROM orders").encode()
    r = Rules(at=(b"", len(query) - 6))
    assert (
        r.hook.edit_client(query[6:] + query) == query[6:] + m.Query(f"{BLOCK_MARKER}_1").encode()
    )


# --------------------------------------------------------------------------- timeouts


def timeout_policy(**config: Any) -> TimeoutPolicy:
    return TimeoutPolicy(settings_from_dict({"timeouts": config}).timeouts)


class Timeouts:
    def __init__(self, at: tuple[bytes, int] = (b"", 0), **config: Any) -> None:
        self.session = Control()
        self.timers = Timers()
        self.metrics = Metrics()
        self.hook = TimeoutHook(
            self.session,  # type: ignore[arg-type]
            timeout_policy(**config),
            self.metrics,
            self.timers.call_later,
            at,
            clock=self.timers.clock,
        )

    def run(self, sql: str) -> StatementEvent:
        """The server starts `sql` now (as the tracker would tell)."""
        (parsed,) = ANALYZER.analyze(sql)
        now = self.timers.now
        event = StatementEvent(parsed, sent=now, started=now)
        self.session.current = Running(event, now)
        return event


REPORTS = {
    "statement": "1s",
    "rules": [{"name": "reports", "match": {"tables": ["report_runs"]}, "statement": "5s"}],
}
CANCEL = m.ErrorResponse(
    {
        "S": "ERROR",
        "V": "ERROR",
        "C": "57014",
        "M": "canceling statement due to user request",
        "F": "postgres.c",
        "L": "3297",
        "R": "ProcessInterrupts",
    }
).encode()


def test_statement_over_its_limit_is_cancelled_and_its_error_names_the_rule() -> None:
    t = Timeouts(**REPORTS)
    t.run("SELECT * FROM report_runs")
    t.hook.client_sent()
    (timer,) = t.timers.live
    assert timer.delay == 5.0
    t.timers.now += 5.0
    timer.fire()
    assert t.session.calls == [("edit_errors",), ("pause_client", "cancel"), ("cancel_backend",)]
    assert counter(t.metrics, "pgwarden_statement_timeouts", rule="reports") == 1
    assert t.hook.edits_errors
    assert t.session.cancel_done is not None
    t.session.cancel_done()  # the cancel was delivered: the client may send again
    assert t.session.calls[-1] == ("resume_client", "cancel")
    # another error first: not the cancel's, left alone
    other = m.ErrorResponse.build("ERROR", "23505", "duplicate key").encode()
    assert t.hook.server_error(other) is None
    assert t.hook.edits_errors
    rewritten = t.hook.server_error(CANCEL)
    assert rewritten is not None
    fields = m.ErrorResponse.decode(memoryview(rewritten)[5:]).fields
    assert fields == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "57014",
        "M": 'canceling statement due to statement timeout (pgwarden rule "reports", 5s)',
        "F": "postgres.c",
        "L": "3297",
        "R": "ProcessInterrupts",
    }
    assert not t.hook.edits_errors
    assert t.hook.server_error(CANCEL) is None  # one cancel, one rewrite


def test_the_default_limit_applies_to_other_statements() -> None:
    t = Timeouts(**REPORTS)
    t.run("SELECT * FROM orders")
    t.hook.client_sent()
    (timer,) = t.timers.live
    assert timer.delay == 1.0
    timer.fire()
    rewritten = t.hook.server_error(CANCEL)
    assert rewritten is not None
    assert m.ErrorResponse.decode(memoryview(rewritten)[5:]).message == (
        'canceling statement due to statement timeout (pgwarden rule "default", 1s)'
    )


def test_a_server_silent_after_the_cancel_ends_the_session() -> None:
    """Hung (or cut off by the network), the server answers neither the statement nor its
    cancel: CANCEL_ANSWER_TIMEOUT after the cancel, the session ends with 57014."""
    t = Timeouts(**REPORTS)
    t.run("SELECT * FROM report_runs")
    t.hook.client_sent()
    t.timers.live[0].fire()
    wait = t.timers.all[-1]
    assert wait.delay == CANCEL_ANSWER_TIMEOUT
    t.timers.now += CANCEL_ANSWER_TIMEOUT
    wait.fire()
    sqlstate, message, reason = t.session.calls[-1][1:]
    assert (sqlstate, reason) == ("57014", "cancel_unanswered")
    assert 'pgwarden rule "reports", 5s' in message


def test_a_server_still_sending_after_the_cancel_is_waited_for() -> None:
    """Bytes from the server restart the wait (the rest of a large result comes before the
    error); the cancel's error, once through, ends it."""
    t = Timeouts(**REPORTS)
    t.run("SELECT * FROM report_runs")
    t.hook.client_sent()
    t.timers.live[0].fire()
    wait = t.timers.all[-1]
    t.timers.now += CANCEL_ANSWER_TIMEOUT - 1
    t.hook.server_sent()  # rows still coming
    t.timers.now += 1
    wait.fire()
    assert not [call for call in t.session.calls if call[0] == "fail"]
    again = t.timers.all[-1]
    assert again is not wait and again.delay == pytest.approx(CANCEL_ANSWER_TIMEOUT - 1)
    assert t.hook.server_error(CANCEL) is not None
    t.hook.server_sent()
    assert again.cancelled


def test_round_trip_end_clears_a_pending_rewrite() -> None:
    """The cancel's round trip ended without a 57014 (the statement finished first): a
    later user cancel is left as PostgreSQL wrote it."""
    t = Timeouts(**REPORTS)
    t.run("SELECT * FROM report_runs")
    t.hook.client_sent()
    t.timers.live[0].fire()
    assert t.hook.edits_errors
    t.hook.round_trip_end(b"I", True)
    assert not t.hook.edits_errors
    assert t.hook.server_error(CANCEL) is None


def test_a_statement_that_ended_in_time_is_not_cancelled() -> None:
    """The server went idle before the limit: the timer is cancelled; fired anyway (the
    loop had queued it) it does nothing."""
    t = Timeouts(**REPORTS)
    event = t.run("SELECT * FROM report_runs")
    t.hook.client_sent()
    (timer,) = t.timers.live
    event.finished = t.timers.now + 1
    t.session.current = None
    t.hook.server_sent()
    assert timer.cancelled and t.timers.live == []
    timer.fire()
    assert t.session.calls == []


def test_the_next_statement_gets_its_own_timer() -> None:
    t = Timeouts(**REPORTS)
    t.run("SELECT * FROM report_runs")
    t.hook.client_sent()
    first = t.timers.live[0]
    t.run("SELECT * FROM orders")
    t.hook.server_sent()
    assert first.cancelled
    assert [x.delay for x in t.timers.live] == [1.0]


def test_edit_client_inserts_a_flush_after_a_pipelined_execute() -> None:
    """Bind/Execute/Bind/Execute/Sync: a Flush after the first Execute, none before the
    Sync; an Execute ending the chunk gets one too."""
    t = Timeouts(**REPORTS)
    bind = m.Bind("", "s1", (), (b"1",), ()).encode()
    execute = m.Execute("", 0).encode()
    out = t.hook.edit_client(bind + execute + bind + execute + SYNC)
    assert out == bind + execute + FLUSH + bind + execute + SYNC
    assert t.hook.edit_client(bind + execute) == bind + execute + FLUSH
    assert t.hook.edit_client(SYNC) == SYNC


def test_edit_client_across_chunks_and_mid_stream() -> None:
    """An Execute cut by a chunk boundary gets its Flush when it ends; started inside an
    Execute's body (its header unseen) the hook adds none for it."""
    execute = m.Execute("portal", 0).encode()
    t = Timeouts(**REPORTS)
    assert t.hook.edit_client(execute[:7]) == execute[:7]
    assert t.hook.edit_client(execute[7:] + execute) == execute[7:] + FLUSH + execute + FLUSH
    late = Timeouts(at=(b"", len(execute) - 7), **REPORTS)
    assert late.hook.edit_client(execute[7:] + SYNC) == execute[7:] + SYNC


def test_transaction_timeout_ends_the_session() -> None:
    t = Timeouts(transaction="10s")
    t.hook.round_trip_end(b"T", True)  # BEGIN's ready: the transaction's clock starts
    (timer,) = t.timers.live
    assert timer.delay == 10.0
    t.timers.now += 10
    timer.fire()
    assert t.session.calls == [
        (
            "fail",
            "57014",
            'terminating connection due to transaction timeout (pgwarden rule "default", 10s)',
            "transaction_timeout",
        )
    ]
    assert t.metrics.transaction_timeouts["transaction"]._value.get() == 1


def test_idle_in_transaction_timeout_ends_the_session() -> None:
    t = Timeouts(idle_in_transaction="2s")
    t.hook.round_trip_end(b"T", True)
    (timer,) = t.timers.live
    assert timer.delay == 2.0
    timer.fire()
    assert t.session.calls == [
        (
            "fail",
            "25P03",
            "terminating connection due to idle-in-transaction timeout (pgwarden, 2s)",
            "idle_in_transaction_timeout",
        )
    ]
    assert t.metrics.transaction_timeouts["idle_in_transaction"]._value.get() == 1


def test_idle_timer_only_while_the_client_is_the_one_to_act() -> None:
    """Not idle (more owed): no idle timer; the client sending again cancels it; the
    transaction's end cancels every timer."""
    t = Timeouts(idle_in_transaction="2s", transaction="1m")
    t.hook.round_trip_end(b"T", False)
    assert [x.delay for x in t.timers.live] == [60.0]
    t.hook.round_trip_end(b"T", True)
    idle = t.timers.live[-1]
    assert idle.delay == 2.0
    t.hook.client_sent()
    assert idle.cancelled
    t.hook.round_trip_end(b"I", True)
    assert t.timers.live == []
    assert t.session.calls == []


def test_close_releases_every_timer() -> None:
    t = Timeouts(statement="1s", transaction="1m")
    t.run("SELECT 1")
    t.hook.client_sent()
    t.hook.round_trip_end(b"T", False)
    assert len(t.timers.live) == 2
    t.hook.close()
    assert t.timers.live == []


@pytest.mark.parametrize("status", [b"I", b"E"])
def test_no_transaction_timer_outside_a_transaction(status: bytes) -> None:
    """I ends any transaction; E (failed, still open) keeps its clock running."""
    t = Timeouts(transaction="10s")
    t.hook.round_trip_end(status, True)
    assert len(t.timers.live) == (0 if status == b"I" else 1)
