"""leading_wildcard: LIKE/ILIKE with a pattern starting with % or _, which no b-tree index
can serve, whether the pattern is written in the statement or bound as a parameter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from proxy.advice import Advice
from proxy.analysis.analyzer import LikePredicate
from proxy.detectors.base import (
    NO_ADVICE,
    Applications,
    Detector,
    DetectorOptions,
    SessionIdentity,
)
from proxy.durations import Duration
from proxy.rewriters.predicates import trigram_index_sql
from proxy.tracking.events import StatementEvent

__all__ = ["LeadingWildcard", "LeadingWildcardOptions"]


@dataclass(frozen=True)
class LeadingWildcardOptions(DetectorOptions):
    warn_above: Duration = Duration(0.01)  # severity warning past this duration, else info


_TEXT_TYPES: Final = frozenset({25, 1042, 1043, 19})  # text, bpchar, varchar, name


def _is_placeholder(token: str) -> bool:
    return token[:1] == "$" and token[1:].isdigit()


def _leading_wildcard(event: StatementEvent, param: int) -> bool:
    """Whether `$param`'s value (a lifted literal, or a Bind value in text form) starts
    with % or _; the value is only looked at, never kept."""
    literals = event.parsed.literals
    if literals:
        # normalize() numbers the literals it lifts after the statement's own parameters
        offset = max((int(t[1:]) for t in literals if _is_placeholder(t)), default=0)
        if param > offset:
            constants = [t for t in literals if not _is_placeholder(t)]
            index = param - offset - 1
            if index < len(constants):
                token = constants[index].strip()
                # a plain or E'' string literal: its first character after the quote
                if token[:2].lower() == "e'":
                    token = token[1:]
                return token[:1] == "'" and token[1:2] in ("%", "_")
            return False
    params = event.params()
    if params is None or param > len(params):
        return False
    raw, fmt = params[param - 1]
    if raw is None or raw[:1] not in (b"%", b"_"):
        return False
    if fmt == 0:
        return True
    # binary: only text types, whose binary form is the text itself (asyncpg sends them so)
    types = event.param_types
    return param <= len(types) and types[param - 1] in _TEXT_TYPES


class LeadingWildcard(Detector):
    rule: ClassVar[str] = "leading_wildcard"
    options_type: ClassVar[type[DetectorOptions]] = LeadingWildcardOptions

    def __init__(
        self,
        options: LeadingWildcardOptions,
        identity: SessionIdentity,
        applications: Applications | None = None,
    ) -> None:
        super().__init__(options, identity, applications)
        self.warn_above = float(options.warn_above)

    def observe(self, event: StatementEvent) -> Sequence[Advice]:
        likes = event.info.likes
        if not likes or event.sqlstate is not None:
            return NO_ADVICE
        found: LikePredicate | None = None
        for like in likes:
            if like.leading_wildcard if like.param == 0 else _leading_wildcard(event, like.param):
                found = like
                break
        if found is None:
            return NO_ADVICE
        slow = not event.reply_batched and event.duration > self.warn_above
        if found.column is not None and found.table is not None:
            where = f"{found.table}.{found.column}"
            suggested: str | None = trigram_index_sql(found.table, found.column)
            fix = "A trigram index (pg_trgm, suggested_sql) serves such patterns."
        else:
            where = "an expression"
            suggested = None
            fix = "A trigram index (pg_trgm) on the matched expression serves such patterns."
        return [
            self.advice(
                event,
                severity="warning" if slow else "info",
                count=1,
                suggestion=(
                    f"LIKE on {where} with a pattern starting with a wildcard (% or _): no "
                    f"b-tree index can serve it, so every row is read. {fix}"
                ),
                suggested_sql=suggested,
                time_spent_s=event.duration,
                evidence={
                    "duration_ms": round(event.duration * 1000, 3),
                    "warn_above_ms": round(self.warn_above * 1000, 3),
                },
            )
        ]
