"""What the advisor reads from one database's catalog: tables (plain tables and
materialized views outside the system schemas; a partitioned table takes no CREATE INDEX
CONCURRENTLY) with their row estimates, columns (type, distinct values), valid indexes
and the foreign keys pointing at them; the
extensions it can use; and a signature that changes when relations do. Reading pg_class,
pg_index and pg_constraint needs no privilege; pg_stats shows only tables the role may
SELECT, and a column without statistics counts as few distinct values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.advisor.planner import Planner
from proxy.advisor.predicates import TableRef
from proxy.advisor.sql import quote_ident

__all__ = ["Catalog", "ForeignKey", "Index", "Table"]


@dataclass(frozen=True, slots=True)
class Index:
    method: str
    columns: tuple[str | None, ...]  # key columns in order; None for an expression


@dataclass(frozen=True, slots=True)
class ForeignKey:
    """A foreign key of `table` (columns in order) that references the table it is listed
    under."""

    schema: str
    table: str
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Table:
    schema: str
    name: str
    rows: float  # the planner's estimate (pg_class.reltuples; -1 when never analysed)
    columns: dict[str, tuple[str, float]]  # name -> (type, distinct values estimated)
    indexes: tuple[Index, ...]  # valid, ready and not partial
    referencing: tuple[ForeignKey, ...]

    def covered(self, method: str, columns: tuple[str, ...]) -> bool:
        """Whether a valid index already starts with `columns` (same access method)."""
        return any(
            index.method == method and index.columns[: len(columns)] == columns
            for index in self.indexes
        )


_TABLE = """
SELECT c.oid, n.nspname, c.relname, c.reltuples::float8
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s) AND c.relkind IN ('r', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
"""
_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), s.n_distinct::float8
FROM pg_attribute a
LEFT JOIN pg_stats s ON s.schemaname = %s AND s.tablename = %s AND s.attname = a.attname
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
"""
_INDEXES = """
SELECT am.amname,
       ARRAY(SELECT a.attname FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY
             AS k(attnum, position)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             ORDER BY k.position)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_am am ON am.oid = ic.relam
WHERE i.indrelid = %s AND i.indisvalid AND i.indisready AND i.indpred IS NULL
"""
_REFERENCING = """
SELECT n.nspname, c.relname,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, position)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
             ORDER BY k.position)
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE con.contype = 'f' AND con.confrelid = %s
"""
_EXTENSIONS = "SELECT extname FROM pg_extension WHERE extname IN ('hypopg', 'pg_trgm')"
# relations and indexes of the user's schemas: a new index, table or column changes it
_SIGNATURE = """
SELECT md5(coalesce(string_agg(c.oid || c.relkind || c.relnatts
                               || coalesce(i.indisvalid::text, ''), ',' ORDER BY c.oid), ''))
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = c.oid
WHERE n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> 'information_schema'
  AND c.relkind IN ('r', 'p', 'm', 'i')
"""


class Catalog:
    """One database's catalog as read by the advisor's planner, tables cached for the
    examination of one statement."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner
        self._tables: dict[TableRef, Table | None] = {}

    async def _rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        return await self.planner.query(query, params or None)

    async def extensions(self) -> frozenset[str]:
        return frozenset(row[0] for row in await self._rows(_EXTENSIONS))

    async def signature(self) -> str:
        return str((await self._rows(_SIGNATURE))[0][0])

    async def table(self, ref: TableRef) -> Table | None:
        """The table `ref` names as the database resolves it, or None (not a table)."""
        if ref not in self._tables:
            self._tables[ref] = await self._read(ref)
        return self._tables[ref]

    async def _read(self, ref: TableRef) -> Table | None:
        schema, name = ref
        written = (
            quote_ident(name) if schema is None else f"{quote_ident(schema)}.{quote_ident(name)}"
        )
        found = await self._rows(_TABLE, written)
        if not found:
            return None
        oid, schema_name, table_name, rows = found[0]
        columns = {}
        for column, type_name, n_distinct in await self._rows(
            _COLUMNS, schema_name, table_name, oid
        ):
            distinct = 1.0 if n_distinct is None else n_distinct
            if distinct < 0:  # a fraction of the rows
                distinct = -distinct * max(rows, 1.0)
            columns[column] = (type_name, distinct)
        indexes = tuple(
            Index(method, tuple(names)) for method, names in await self._rows(_INDEXES, oid)
        )
        referencing = tuple(
            ForeignKey(s, t, tuple(cols)) for s, t, cols in await self._rows(_REFERENCING, oid)
        )
        return Table(schema_name, table_name, rows, columns, indexes, referencing)
