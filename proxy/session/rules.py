"""Rewrite and block rules on a session's relay path.

Each Query and Parse is held until whole (StatementEditor), decided by the rule engine,
and passed on as sent, rewritten, or replaced by a statement that fails with a marker.
The marker's error is turned back into pgwarden's block error on its way to the client,
so the client sees `42501 … blocked by rule "…"` while the server saw a harmless failure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from proxy.analysis.analyzer import Analyzer, StatementInfo
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.protocol import messages as m
from proxy.protocol.editor import StatementEditor
from proxy.rewriters.rules import BLOCK_MARKER, Decision, RuleEngine, rewrite_statements
from proxy.session.hooks import SessionControl, SessionHook

__all__ = ["RulesHook"]

log = get_logger("pgwarden.session")


def _as_sent(raw: bytes) -> bytes:
    """A closed hook's edit: none."""
    return raw


class RulesHook(SessionHook):
    """`at` says where the client stream stands when the rules start (a reload can add
    rules to open sessions): the start of a header already passed on, and the rest of a
    message being passed on, as `FrameDecoder.remaining()` tells it."""

    # each round trip's end must come as it passes: it drops the markers of blocks the
    # server skipped (after an earlier error of their pipeline), which stops error editing
    realtime = True

    def __init__(
        self,
        session: SessionControl,
        rules: Callable[[], RuleEngine | None],
        analyzer: Analyzer,
        metrics: Metrics,
        at: tuple[bytes, int] = (b"", 0),
    ) -> None:
        self.session = session
        self.rules = rules  # the engine of the config now in force
        self.analyzer = analyzer
        self.metrics = metrics
        self._editor = StatementEditor(self._apply, header_sent=at[0], passing=at[1])
        self._blocked: deque[tuple[str, str]] = deque()  # (marker, rule) of blocks sent
        self._blocks_sent = 0

    def edit_client(self, data: bytes) -> bytes:
        return self._editor.feed(data)

    @property
    def edits_errors(self) -> bool:
        return bool(self._blocked)

    def server_error(self, raw: bytes) -> bytes | None:
        if not self._blocked:
            return None
        try:
            error = m.ErrorResponse.decode(memoryview(raw)[5:])
        except ValueError:
            return None
        if BLOCK_MARKER not in error.message:
            return None
        # Errors come back in order; a block with no error of its own was skipped by the
        # server after an earlier error of its pipeline.
        while self._blocked:
            marker, rule = self._blocked.popleft()
            if f'"{marker}"' in error.message:
                return m.ErrorResponse.build(
                    "ERROR", "42501", f'pgwarden: statement blocked by rule "{rule}"'
                ).encode()
        return None

    def round_trip_end(self, status: bytes, idle: bool) -> None:
        if self._blocked and not self.session.round_trips.busy:
            self._blocked.clear()  # nothing is owed: the blocks left were skipped

    def close(self) -> None:
        # The editor calls back into this hook, which holds the session: the cycle would
        # keep the closed session in memory until the seldom full collection (cli.py).
        self._editor.edit = _as_sent

    def _apply(self, raw: bytes) -> bytes:
        """A Query or Parse as it should reach the server: rewritten, blocked or as sent."""
        rules = self.rules()
        if rules is None:
            return raw
        try:
            message = m.decode(m.FRONTEND, raw[0], memoryview(raw)[5:])
        except ValueError:
            return raw  # malformed: the server will say so
        assert isinstance(message, m.Query | m.Parse)
        sql = message.sql
        identity = self.session.identity
        decisions = []
        for index, statement in enumerate(self.analyzer.analyze(sql)):
            decision = rules.decide(statement.info, identity)
            if decision is not None:
                self._used(rules, statement.info, decision)
                if decision.enforce:
                    decisions.append((index, decision))
        if not decisions:
            return raw
        block = next((d for _, d in decisions if d.kind == "block"), None)
        if block is not None:
            self._blocks_sent += 1
            new_sql = f"{BLOCK_MARKER}_{self._blocks_sent}"
            self._blocked.append((new_sql, block.rule))
            self.session.edit_errors()
        else:
            rewritten = rewrite_statements(sql, [(i, d.replace) for i, d in decisions])
            if rewritten is None:
                log.warning("rewrite_skipped", reason="literals could not be carried over")
                return raw
            new_sql = rewritten
        if isinstance(message, m.Query):
            return m.Query(new_sql).encode()
        return m.Parse(message.name, new_sql, message.param_types).encode()

    def _used(self, rules: RuleEngine, info: StatementInfo, decision: Decision) -> None:
        mode = "enforce" if decision.enforce else "log"
        counter = self.metrics.rewrites if decision.kind == "rewrite" else self.metrics.blocks
        counter.labels(decision.rule, mode).inc()
        if rules.first_use(decision.rule, info.fingerprint):
            log.info(
                "rule_applied" if decision.enforce else "rule_would_apply",
                kind=decision.kind,
                rule=decision.rule,
                statement=info.normalized,
                fingerprint=info.fingerprint,
                **self.session.log_fields(),
            )
