"""One statement examined: its plans, its index candidates, and the proof of each.

With HypoPG in the database, a b-tree candidate is created as a hypothetical index on the
advisor's session and the statement planned again; it is accepted when the planner uses it
and the cost falls by at least min_saving. GIN candidates (HypoPG cannot make them), and
every candidate where HypoPG is missing, are accepted only for a sequential scan that keeps
under 10% of a table of at least min_table_rows rows, and marked unverified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from proxy.advisor.candidates import Candidate, candidates, foreign_key_candidates
from proxy.advisor.catalog import Catalog, Table
from proxy.advisor.planner import Planner
from proxy.advisor.plans import reads, seq_scans, total_cost, uses_index
from proxy.advisor.predicates import ColumnUse, column_uses, delete_target
from proxy.advisor.sql import IndexSpec
from proxy.analysis.analyzer import StatementInfo
from proxy.detectors.missing_index import MissingIndexOptions
from proxy.fingerprints import Sample

__all__ = ["Finding", "examine"]

_SELECTIVE: Final = 0.1  # a scan keeping under this share of its table's rows


@dataclass(frozen=True, slots=True)
class Finding:
    """An index one statement would gain from, with the planner's figures."""

    spec: IndexSpec
    reason: str
    verified: bool
    table_rows: float
    plan_node: str  # e.g. "Seq Scan on jobs": node and table, never a condition
    cost_before: float
    cost_after: float | None  # None when unverified
    generic_before: float | None = None  # the generic plan's, when a sample was used
    generic_after: float | None = None


@dataclass
class _Context:
    planner: Planner
    catalog: Catalog
    options: MissingIndexOptions
    hypopg: bool


async def examine(
    planner: Planner,
    catalog: Catalog,
    info: StatementInfo,
    samples: list[Sample],
    types: tuple[int, ...],
    options: MissingIndexOptions,
    extensions: frozenset[str],
) -> list[Finding]:
    """The indexes `info`'s statement would gain from (at most one per table), proven
    inside one READ ONLY transaction that is rolled back. A statement without candidates
    (its tables small, or already indexed) costs catalog reads only, no plan."""
    context = _Context(planner, catalog, options, "hypopg" in extensions)
    statement = info.normalized.strip().rstrip(";")
    count = info.param_count
    sample = samples[-1] if samples else None

    def leading_wildcard(param: int) -> bool:
        if sample is None or not 0 < param <= len(sample):
            return False
        value, fmt, _ = sample[param - 1]
        return value is not None and fmt == 0 and value[:1] in (b"%", b"_")

    uses = await _resolve(catalog, column_uses(statement))
    worth: list[tuple[Candidate, Table]] = []
    for candidate in candidates(uses, leading_wildcard, "pg_trgm" in extensions):
        table = await catalog.table((candidate.spec.schema, candidate.spec.table))
        if table is not None and table.rows >= options.min_table_rows:
            worth.append((candidate, table))
    if not worth and info.command != "DELETE":
        return []
    found: list[Finding] = []
    tables_done: set[tuple[str, str]] = set()
    async with planner.transaction():
        if worth:
            plans = _Plans(planner, statement, types, count, sample)
            before, generic_before = await plans.costs()
            for candidate, table in worth:
                if (table.schema, table.name) in tables_done:
                    continue
                finding = await _prove(context, plans, candidate, table, before, generic_before)
                if finding is not None:
                    found.append(finding)
                    tables_done.add((table.schema, table.name))
        if info.command == "DELETE":
            found.extend(await _foreign_keys(context, statement, tables_done))
    return found


async def _resolve(catalog: Catalog, uses: list[ColumnUse]) -> list[tuple[ColumnUse, Table]]:
    """Each use with the table whose column it is (the first that has it, innermost
    query level first); uses of tables the catalog does not know are dropped."""
    resolved = []
    for use in uses:
        for ref in use.tables:
            table = await catalog.table(ref)
            if table is not None and use.column in table.columns:
                resolved.append((use, table))
                break
    return resolved


class _Plans:
    """The statement's plan as proof is measured: with the sample's values when there is
    one (the generic plan beside it), else the generic plan."""

    def __init__(
        self,
        planner: Planner,
        statement: str,
        types: tuple[int, ...],
        count: int,
        sample: Sample | None,
    ) -> None:
        self.planner = planner
        self.statement = statement
        self.types = types
        self.count = count
        self.sample = sample if count and sample is not None and len(sample) == count else None
        self._base: dict[str, Any] | None = None

    async def base(self) -> dict[str, Any]:
        if self._base is None:
            self._base = await self.main()
        return self._base

    async def main(self) -> dict[str, Any]:
        if self.sample is not None:
            return await self.planner.custom(self.statement, self.sample)
        return await self.generic()

    async def generic(self) -> dict[str, Any]:
        return await self.planner.generic(self.statement, self.types, self.count)

    async def costs(self) -> tuple[float, float | None]:
        """(cost of the main plan, cost of the generic plan when the main one is not)."""
        main = total_cost(await self.base())
        if self.sample is None:
            return main, None
        return main, total_cost(await self.generic())


async def _prove(
    context: _Context,
    plans: _Plans,
    candidate: Candidate,
    table: Table,
    before: float,
    generic_before: float | None,
) -> Finding | None:
    spec = candidate.spec
    base = await plans.base()
    plan_node = f"{reads(base, table.schema, table.name) or 'no scan'} on {spec.relation}"
    if context.hypopg and spec.method == "btree":
        async with context.planner.hypothetical(spec.hypothetical_sql()) as name:
            after_plan = await plans.main()
            generic_after = (
                total_cost(await plans.generic()) if generic_before is not None else None
            )
        after = total_cost(after_plan)
        if not uses_index(after_plan, name) or before <= 0:
            return None
        if (before - after) / before < context.options.min_saving:
            return None
        return Finding(
            spec,
            candidate.reason,
            True,
            table.rows,
            plan_node,
            before,
            after,
            generic_before,
            generic_after,
        )
    scan = next(
        (s for s in seq_scans(base) if (s.schema, s.table) == (table.schema, table.name)), None
    )
    if scan is None or not scan.filtered or scan.rows >= _SELECTIVE * table.rows:
        return None
    return Finding(spec, candidate.reason, False, table.rows, plan_node, before, None)


async def _foreign_keys(
    context: _Context, statement: str, tables_done: set[tuple[str, str]]
) -> list[Finding]:
    """The foreign keys checked for each row the DELETE removes, whose referencing
    columns no index serves: proven on the check PostgreSQL runs (a generic plan)."""
    target = delete_target(statement)
    parent = await context.catalog.table(target) if target is not None else None
    if parent is None:
        return []
    children = [
        child
        for key in parent.referencing
        if (child := await context.catalog.table((key.schema, key.table))) is not None
    ]
    found = []
    planner = context.planner
    for candidate, check in foreign_key_candidates(parent, children):
        spec = candidate.spec
        table = next(c for c in children if (c.schema, c.name) == (spec.schema, spec.table))
        if (spec.schema, spec.table) in tables_done or table.rows < context.options.min_table_rows:
            continue
        plan = await planner.generic(check, (), len(spec.columns))
        before = total_cost(plan)
        node = f"{reads(plan, table.schema, table.name)} on {spec.relation} (foreign key check)"
        if not context.hypopg:
            if seq_scans(plan):
                found.append(Finding(spec, candidate.reason, False, table.rows, node, before, None))
            continue
        async with planner.hypothetical(spec.hypothetical_sql()) as name:
            after_plan = await planner.generic(check, (), len(spec.columns))
        after = total_cost(after_plan)
        saved = (before - after) / before if before > 0 else 0.0
        if uses_index(after_plan, name) and saved >= context.options.min_saving:
            found.append(Finding(spec, candidate.reason, True, table.rows, node, before, after))
    return found
