"""Whether a statement, run by a given client, matches a rule's `match` block.

Timeout rules and rewrite/block rules match the same way; each kind of match block has
the fields it supports, and a field left out (None) matches anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pglast import parser

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


def statement_matches(match: Any, info: StatementInfo, identity: SessionIdentity) -> bool:
    if match.fingerprint is not None and info.fingerprint != match.fingerprint:
        return False
    statement = getattr(match, "statement", None)
    if statement is not None and info.fingerprint != _fingerprint(statement):
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
