"""Index candidates for one statement, from the columns it uses (proxy.advisor.predicates)
resolved against the catalog: b-tree keys ordered equality -> range -> sort, GIN for
jsonb containment and for LIKE patterns with a leading wildcard, and never an index that
an existing valid one already covers (same method, same leading columns). Which of them
helps is for the planner to say (proxy.advisor.proof)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from proxy.advisor.catalog import Table
from proxy.advisor.predicates import ColumnUse
from proxy.advisor.sql import IndexSpec, quote_ident

__all__ = ["Candidate", "candidates", "foreign_key_candidates"]

_MAX_KEYS: Final = 4  # wider indexes cost more to write than the reads they save
_TEXT: Final = ("text", "character varying", "character", "citext")


@dataclass(frozen=True, slots=True)
class Candidate:
    spec: IndexSpec
    reason: str  # what it serves: filter, join, sort, containment, pattern, foreign key


def candidates(
    uses: Iterable[tuple[ColumnUse, Table]],
    leading_wildcard: Callable[[int], bool],
    trigram: bool,
) -> list[Candidate]:
    """The candidates for the resolved column uses of one statement. `leading_wildcard(n)`
    says whether the pattern parameter $n starts with % or _ (in the samples); `trigram`:
    pg_trgm is installed, so its GIN operator class exists."""
    by_table: dict[tuple[str, str], tuple[Table, list[ColumnUse]]] = {}
    for use, table in uses:
        by_table.setdefault((table.schema, table.name), (table, []))[1].append(use)
    found: list[Candidate] = []
    for table, table_uses in by_table.values():
        found.extend(_btree(table, table_uses))
        found.extend(_gin(table, table_uses, leading_wildcard, trigram))
    seen: set[IndexSpec] = set()
    unique = []
    for candidate in found:
        if candidate.spec not in seen:
            seen.add(candidate.spec)
            unique.append(candidate)
    return unique


def _ordered(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _btree(table: Table, uses: list[ColumnUse]) -> list[Candidate]:
    eq = _ordered(u.column for u in uses if u.kind == "eq")
    # most distinct values first: the first key narrows the most; ties keep query order
    eq.sort(key=lambda column: -table.columns[column][1])
    eq = eq[: _MAX_KEYS - 1]
    ranges = [c for c in _ordered(u.column for u in uses if u.kind == "range") if c not in eq]
    sorts = _ordered(u.column for u in uses if u.kind == "sort")
    joined = {u.column for u in uses if u.join}
    keys: list[tuple[list[str], str]] = []
    if ranges:
        keys.append(([*eq, ranges[0]], "filter"))
    if sorts:
        keys.append(([*eq, *(c for c in sorts if c not in eq)], "sort"))
    if eq:
        keys.append((eq, "join" if set(eq) <= joined else "filter"))
        keys.append((eq[:1], "join" if eq[0] in joined else "filter"))
    elif ranges:
        keys.append((ranges[:1], "filter"))
    return [
        Candidate(IndexSpec(table.schema, table.name, tuple(columns[:_MAX_KEYS])), reason)
        for columns, reason in keys
        if columns and not table.covered("btree", tuple(columns[:_MAX_KEYS]))
    ]


def _gin(
    table: Table,
    uses: list[ColumnUse],
    leading_wildcard: Callable[[int], bool],
    trigram: bool,
) -> list[Candidate]:
    found = []
    for column in _ordered(u.column for u in uses if u.kind in ("contains", "exists")):
        if table.columns[column][0] != "jsonb" or table.covered("gin", (column,)):
            continue
        kinds = {u.kind for u in uses if u.column == column and u.kind in ("contains", "exists")}
        opclass = "jsonb_path_ops" if kinds == {"contains"} else None
        found.append(
            Candidate(IndexSpec(table.schema, table.name, (column,), "gin", opclass), "containment")
        )
    if trigram:
        for use in uses:
            if (
                use.kind == "like"
                and table.columns[use.column][0].startswith(_TEXT)
                and leading_wildcard(use.param)
                and not table.covered("gin", (use.column,))
            ):
                spec = IndexSpec(table.schema, table.name, (use.column,), "gin", "gin_trgm_ops")
                found.append(Candidate(spec, "pattern"))
    return found


def foreign_key_candidates(parent: Table, children: Iterable[Table]) -> list[tuple[Candidate, str]]:
    """For rows deleted from `parent`: each foreign key pointing at it whose columns no
    index of the referencing table leads with, as (candidate, the check PostgreSQL runs
    for each deleted row, which the index serves)."""
    found = []
    by_name = {(t.schema, t.name): t for t in children}
    for key in parent.referencing:
        child = by_name.get((key.schema, key.table))
        if child is None or child.covered("btree", key.columns):
            continue
        spec = IndexSpec(child.schema, child.name, key.columns)
        condition = " AND ".join(
            f"{quote_ident(column)} = ${i}" for i, column in enumerate(key.columns, 1)
        )
        check = f"SELECT 1 FROM ONLY {spec.relation} WHERE {condition}"
        found.append((Candidate(spec, "foreign key"), check))
    return found
