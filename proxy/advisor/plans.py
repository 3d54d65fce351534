"""What the advisor reads in EXPLAIN (FORMAT JSON, VERBOSE) output: total cost, the scans
that read a whole table, and whether an index is used. Filter and condition texts may
quote parameter values, so nothing here returns them: only node types, names and numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Scan", "plan_root", "reads", "seq_scans", "total_cost", "uses_index"]


@dataclass(frozen=True, slots=True)
class Scan:
    """A Seq Scan node: the table it reads and the rows the planner expects it to keep."""

    schema: str
    table: str
    rows: float
    filtered: bool  # it has a Filter: it reads rows only to drop most of them


def plan_root(explained: Any) -> dict[str, Any]:
    """The top plan node of one EXPLAIN (FORMAT JSON) result ([{"Plan": ...}])."""
    if isinstance(explained, list) and explained and isinstance(explained[0], dict):
        plan = explained[0].get("Plan")
        if isinstance(plan, dict):
            return plan
    raise ValueError("not an EXPLAIN (FORMAT JSON) result")


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans") or ():
        yield from _nodes(child)


def total_cost(plan: dict[str, Any]) -> float:
    return float(plan.get("Total Cost", 0.0))


def seq_scans(plan: dict[str, Any]) -> list[Scan]:
    return [
        Scan(
            schema=str(node.get("Schema", "public")),
            table=str(node.get("Relation Name", "")),
            rows=float(node.get("Plan Rows", 0.0)),
            filtered="Filter" in node,
        )
        for node in _nodes(plan)
        if node.get("Node Type") == "Seq Scan" and node.get("Relation Name")
    ]


def reads(plan: dict[str, Any], schema: str, table: str) -> str | None:
    """The type of the first node that reads `table` (Seq Scan, Index Scan...), if any."""
    for node in _nodes(plan):
        if node.get("Relation Name") == table and node.get("Schema", "public") == schema:
            return str(node.get("Node Type"))
    return None


def uses_index(plan: dict[str, Any], name: str) -> bool:
    return any(node.get("Index Name") == name for node in _nodes(plan))
