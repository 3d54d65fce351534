"""Builders for the suggested SQL of check_then_write, by editing the pglast AST.

`for_update_sql` adds the row lock a read-then-update needs (`FOR UPDATE`, `OF` the read
table when the SELECT joins others); `on_conflict_sql` makes a check-then-insert one
atomic `INSERT … ON CONFLICT (key) DO NOTHING`, and `unique_constraint_sql` is the
constraint that ON CONFLICT needs. Inputs are normalized statements and names from the
parse tree, so the output never holds a value.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import (
    AlterTableType,
    ConstrType,
    LockClauseStrength,
    LockWaitPolicy,
    ObjectType,
    OnConflictAction,
    SetOperation,
    SortByDir,
    SortByNulls,
)
from pglast.parser import ParseError
from pglast.stream import RawStream

__all__ = ["for_update_sql", "on_conflict_sql", "unique_constraint_sql"]

_NAME_LIMIT = 63  # PostgreSQL's identifier length (NAMEDATALEN - 1)


def _range_vars(node: Any) -> list[ast.RangeVar]:
    """The plain relations of a FROM list, through its joins (not into subqueries)."""
    found: list[ast.RangeVar] = []
    stack = list(node or ())
    while stack:
        item = stack.pop()
        if isinstance(item, ast.RangeVar):
            found.append(item)
        elif isinstance(item, ast.JoinExpr):
            stack.extend((item.larg, item.rarg))
    return found


def _relation(table: str) -> ast.RangeVar:
    schema, _, name = table.rpartition(".")
    return ast.RangeVar(schemaname=schema or None, relname=name, inh=True, relpersistence="p")


@lru_cache(maxsize=1024)  # a statement shape is seen again and again; the parse is ~0.2 ms
def for_update_sql(statement: str, table: str) -> str | None:
    """`statement` (a normalized SELECT reading `table`) with `FOR UPDATE`, `OF` that table
    when it reads others too; None when PostgreSQL would refuse the lock there (DISTINCT,
    GROUP BY, set operations, windows) or it locks already."""
    try:
        (raw,) = parse_sql(statement)
    except (ParseError, ValueError):
        return None
    select = raw.stmt
    if (
        not isinstance(select, ast.SelectStmt)
        or select.op != SetOperation.SETOP_NONE
        or select.lockingClause
        or select.distinctClause
        or select.groupClause
        or select.havingClause is not None
        or select.windowClause
        or not select.fromClause
    ):
        return None
    relations = _range_vars(select.fromClause)
    locked: tuple[ast.RangeVar, ...] | None = None
    if len(select.fromClause) > 1 or not isinstance(select.fromClause[0], ast.RangeVar):
        schema, _, name = table.rpartition(".")
        mine = [r for r in relations if r.relname == name and (r.schemaname or "") == schema]
        if len(mine) != 1:
            return None  # the table read twice, or only inside a subquery: no one name
        rv = mine[0]
        name = rv.alias.aliasname if rv.alias else rv.relname
        locked = (ast.RangeVar(relname=name, inh=True),)
    select.lockingClause = (
        ast.LockingClause(
            lockedRels=locked,
            strength=LockClauseStrength.LCS_FORUPDATE,
            waitPolicy=LockWaitPolicy.LockWaitBlock,
        ),
    )
    return str(RawStream()(raw))


@lru_cache(maxsize=1024)
def on_conflict_sql(statement: str, columns: tuple[str, ...]) -> str | None:
    """`statement` (a normalized INSERT without ON CONFLICT) with `ON CONFLICT (columns)
    DO NOTHING`, or None when it is not one."""
    try:
        (raw,) = parse_sql(statement)
    except (ParseError, ValueError):
        return None
    insert = raw.stmt
    if not isinstance(insert, ast.InsertStmt) or insert.onConflictClause is not None:
        return None
    insert.onConflictClause = ast.OnConflictClause(
        action=OnConflictAction.ONCONFLICT_NOTHING,
        infer=ast.InferClause(
            indexElems=tuple(
                ast.IndexElem(
                    name=column,
                    ordering=SortByDir.SORTBY_DEFAULT,
                    nulls_ordering=SortByNulls.SORTBY_NULLS_DEFAULT,
                )
                for column in columns
            )
        ),
    )
    return str(RawStream()(raw))


def unique_constraint_sql(table: str, columns: tuple[str, ...]) -> str:
    """`ALTER TABLE table ADD CONSTRAINT table_cols_key UNIQUE (columns)`, named as
    PostgreSQL names such a constraint itself."""
    name = "_".join((table.rpartition(".")[2], *columns, "key"))
    if len(name) > _NAME_LIMIT:
        name = name[: _NAME_LIMIT - 4] + "_key"
    stmt = ast.AlterTableStmt(
        relation=_relation(table),
        cmds=(
            ast.AlterTableCmd(
                subtype=AlterTableType.AT_AddConstraint,
                def_=ast.Constraint(
                    contype=ConstrType.CONSTR_UNIQUE,
                    conname=name,
                    keys=tuple(ast.String(column) for column in columns),
                ),
                behavior=0,
            ),
        ),
        objtype=ObjectType.OBJECT_TABLE,
    )
    return str(RawStream()(stmt))
