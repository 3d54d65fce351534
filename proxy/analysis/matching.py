"""Whether a statement, run by a given client, matches a rule's `match` block.

Timeout rules and rewrite/block rules match the same way; each kind of match block has
the fields it supports, and a field left out (None) matches anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pglast import ast, parse_sql, parser
from pglast.stream import RawStream
from pglast.visitors import Visitor

from proxy.analysis.analyzer import StatementInfo

__all__ = ["SessionIdentity", "statement_matches"]


@dataclass(frozen=True, slots=True)
class SessionIdentity:
    """Who runs the statements of a session, from its startup packet."""

    user: str
    database: str
    application_name: str


_fingerprints: dict[str, str] = {}  # keyed by statements written in the config: bounded


def _fingerprint(sql: str) -> str:
    """Statements match when their fingerprints do, which is normalizing both sides."""
    value = _fingerprints.get(sql)
    if value is None:
        value = _fingerprints[sql] = parser.fingerprint(sql)
    return value


_canonicals: dict[str, str | None] = {}


class _Params(Visitor):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.found: list[ast.ParamRef] = []

    def visit_ParamRef(self, ancestors: object, node: ast.ParamRef) -> None:
        self.found.append(node)


def _canonical(sql: str) -> str | None:
    """`sql` normalized and printed back by pglast, the same however it is spelled; None
    when it cannot be (normalize() can make SQL unparsable: `interval $1`).

    Parameters are renumbered from $1: in a Query of several statements, the literals of
    one are numbered after those of the statements before it."""
    if sql in _canonicals:
        return _canonicals[sql]
    try:
        tree = parse_sql(parser.normalize(sql))
        params = _Params()
        params(tree)
        offset = min((p.number for p in params.found), default=1) - 1
        for param in params.found:
            param.number -= offset
        value: str | None = RawStream()(tree)
    except Exception:  # a ParseError, or a node pglast cannot print
        value = None
    if len(_canonicals) >= 10_000:
        _canonicals.clear()
    _canonicals[sql] = value
    return value


def _same_statement(info: StatementInfo, statement: str) -> bool:
    """The fingerprints match and so do the normalized texts: a fingerprint alone ignores
    the order of the columns, their aliases and casts, which a replacement must keep."""
    if info.fingerprint != _fingerprint(statement):
        return False
    mine, theirs = _canonical(info.normalized), _canonical(statement)
    return mine is None or theirs is None or mine == theirs


def statement_matches(match: Any, info: StatementInfo, identity: SessionIdentity) -> bool:
    if match.fingerprint is not None and info.fingerprint != match.fingerprint:
        return False
    statement = getattr(match, "statement", None)
    if statement is not None and not _same_statement(info, statement):
        return False
    if match.command is not None and info.command != match.command.upper():
        return False
    without_where = getattr(match, "without_where", None)
    if without_where is not None:
        lacking = info.command in ("UPDATE", "DELETE") and not info.has_where
        if lacking != without_where:
            return False
    if match.tables is not None:
        referenced = set(info.tables) | {t.rsplit(".", 1)[-1] for t in info.tables}
        if not referenced.intersection(match.tables):
            return False
    if match.user is not None and identity.user != match.user:
        return False
    if match.database is not None and identity.database != match.database:
        return False
    return match.application_name is None or identity.application_name == match.application_name
