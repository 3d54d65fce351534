"""Builders for the suggested SQL of the result-size rules, by editing the pglast AST.

`explicit_columns_sql` expands the `*` (or `t.*`) of a SELECT into the columns its
RowDescription named, less the wide ones a caller does not need; `paginated_sql` bounds a
SELECT with `LIMIT $n`, in keyset form (`AND key > $k`) when it is ordered by plain
columns. Inputs are normalized statements and column names from the protocol, so the
output never holds a value.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import (
    A_Expr_Kind,
    BoolExprType,
    CoercionForm,
    LimitOption,
    SortByDir,
    SortByNulls,
)
from pglast.parser import ParseError
from pglast.stream import RawStream

__all__ = ["explicit_columns_sql", "paginated_sql"]


def _select(statement: str) -> tuple[Any, ast.SelectStmt] | None:
    """The parse of a one-statement normalized SELECT, and its SelectStmt."""
    try:
        (raw,) = parse_sql(statement)
    except (ParseError, ValueError):
        return None
    stmt = raw.stmt
    if not isinstance(stmt, ast.SelectStmt) or stmt.intoClause is not None:
        return None
    return raw, stmt


def _is_star(target: Any) -> bool:
    val = target.val if isinstance(target, ast.ResTarget) else None
    return isinstance(val, ast.ColumnRef) and isinstance(val.fields[-1], ast.A_Star)


@lru_cache(maxsize=256)  # judged about once a minute per statement shape and session
def explicit_columns_sql(
    statement: str, columns: tuple[str, ...], drop: frozenset[str]
) -> str | None:
    """`statement` (normalized) with its one `*` or `t.*` target replaced by the result
    `columns` it stood for (the RowDescription's names, in order), except those in `drop`;
    None when the star cannot be expanded unambiguously (several stars, `*` over a join,
    a set operation, names that repeat) or nothing would be left out."""
    parsed = _select(statement)
    if parsed is None:
        return None
    raw, stmt = parsed
    targets = stmt.targetList
    if stmt.op != 0 or not targets or len(columns) < len(targets):
        return None
    stars = [i for i, target in enumerate(targets) if _is_star(target)]
    if len(stars) != 1:
        return None
    index = stars[0]
    starred = columns[index : len(columns) - (len(targets) - index - 1)]
    qualifier = tuple(targets[index].val.fields[:-1])
    if not qualifier:
        # a bare `*` is one relation's columns only when the query reads one relation
        sources: tuple[Any, ...] = stmt.fromClause or ()
        if len(sources) != 1 or isinstance(sources[0], ast.JoinExpr):
            return None
    if not starred or len(set(starred)) != len(starred):
        return None
    kept = [name for name in starred if name not in drop]
    if len(kept) == len(starred) or (not kept and len(targets) == 1):
        return None
    expanded = [
        ast.ResTarget(val=ast.ColumnRef(fields=(*qualifier, ast.String(name)))) for name in kept
    ]
    stmt.targetList = (*targets[:index], *expanded, *targets[index + 1 :])
    return str(RawStream()(raw))


def _has_window(node: Any) -> bool:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.FuncCall) and item.over is not None:
            return True
        if isinstance(item, ast.Node):
            stack.extend(getattr(item, name) for name in item)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return False


def _keyset_columns(stmt: ast.SelectStmt) -> tuple[list[ast.ColumnRef], bool] | None:
    """The ORDER BY columns a keyset condition can compare with the last row's values,
    and whether they are descending; None when the order is not one of plain columns in
    one direction, or a WHERE on them would not mean the same rows."""
    sorts = stmt.sortClause
    if not sorts or stmt.op != 0 or _has_window(stmt.targetList):
        return None
    refs: list[ast.ColumnRef] = []
    directions = set()
    for sort in sorts:
        node = sort.node
        if (
            not isinstance(node, ast.ColumnRef)
            or not all(isinstance(f, ast.String) for f in node.fields)
            or sort.sortby_nulls != SortByNulls.SORTBY_NULLS_DEFAULT
            or sort.sortby_dir == SortByDir.SORTBY_USING
        ):
            return None
        refs.append(node)
        directions.add(sort.sortby_dir == SortByDir.SORTBY_DESC)
    if len(directions) != 1:
        return None
    # an output column's own name (an alias, a function's) may be ordered by, not filtered on
    aliases = set()
    for target in stmt.targetList or ():
        if isinstance(target, ast.ResTarget):
            if target.name:
                aliases.add(target.name)
            elif isinstance(target.val, ast.FuncCall):
                aliases.add(target.val.funcname[-1].sval)
    if any(len(ref.fields) == 1 and ref.fields[0].sval in aliases for ref in refs):
        return None
    return refs, directions.pop()


@lru_cache(maxsize=1024)
def paginated_sql(statement: str, param_count: int) -> tuple[str, tuple[str, ...]] | None:
    """`statement` (normalized, its highest parameter `$param_count`) with `LIMIT $n` added,
    and, when it is ordered by plain columns in one direction, the keyset condition
    `AND (cols) > ($k, ...)` (`<` when descending) for the page after the last row seen;
    with the ORDER BY columns the condition names (none: LIMIT only). None when it
    already has a LIMIT or is not a plain SELECT."""
    parsed = _select(statement)
    if parsed is None:
        return None
    raw, stmt = parsed
    if stmt.limitCount is not None or stmt.limitOffset is not None:
        return None
    number = param_count + 1
    keyset = _keyset_columns(stmt)
    named: tuple[str, ...] = ()
    if keyset is not None:
        refs, descending = keyset
        params = [ast.ParamRef(number=number + i) for i in range(len(refs))]
        number += len(refs)
        left: ast.Node = refs[0]
        right: ast.Node = params[0]
        if len(refs) > 1:
            left = ast.RowExpr(args=tuple(refs), row_format=CoercionForm.COERCE_IMPLICIT_CAST)
            right = ast.RowExpr(args=tuple(params), row_format=CoercionForm.COERCE_IMPLICIT_CAST)
        after = ast.A_Expr(
            kind=A_Expr_Kind.AEXPR_OP,
            name=(ast.String("<" if descending else ">"),),
            lexpr=left,
            rexpr=right,
        )
        where = stmt.whereClause
        if where is None:
            stmt.whereClause = after
        elif isinstance(where, ast.BoolExpr) and where.boolop == BoolExprType.AND_EXPR:
            stmt.whereClause = ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(*where.args, after))
        else:
            stmt.whereClause = ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(where, after))
        named = tuple(".".join(f.sval for f in ref.fields) for ref in refs)
    stmt.limitCount = ast.ParamRef(number=number)
    stmt.limitOption = LimitOption.LIMIT_OPTION_COUNT
    return str(RawStream()(raw)), named
