"""Builders for the suggested SQL of the predicate rules, by editing the pglast AST.

`not_exists_sql` turns every `x NOT IN (SELECT y FROM ...)` of a normalized statement
into `NOT EXISTS (SELECT 1 FROM ... WHERE ... AND y = x)`; `trigram_index_sql` is the
pg_trgm index a leading-wildcard LIKE on a column needs. Inputs are normalized statements
and names from the parse tree, so the output never holds a value.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType, SortByDir, SortByNulls, SubLinkType
from pglast.parser import ParseError
from pglast.stream import RawStream

__all__ = ["not_exists_sql", "trigram_index_sql"]

# Aggregates whose value cannot be compared in the subquery's WHERE
_AGGREGATES = frozenset(
    {"count", "sum", "min", "max", "avg", "array_agg", "string_agg", "bool_and", "bool_or",
     "every", "json_agg", "jsonb_agg"}
)  # fmt: skip


def _children(node: Any) -> list[Any]:
    if isinstance(node, ast.Node):
        return [getattr(node, name) for name in node]
    if isinstance(node, (tuple, list)):
        return list(node)
    return []


def _has_aggregate(node: Any) -> bool:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.FuncCall):
            name = item.funcname[-1].sval if item.funcname else ""
            if name in _AGGREGATES or item.agg_star or item.over is not None:
                return True
        stack.extend(_children(item))
    return False


def _outer_qualifier(select: ast.Node | None) -> str | None:
    """The name an unqualified outer column can be written with, when the outer query
    reads one plain relation (its alias, or its name)."""
    if isinstance(select, (ast.UpdateStmt, ast.DeleteStmt)):
        if getattr(select, "fromClause", None) or getattr(select, "usingClause", None):
            return None
        from_clause: Any = (select.relation,)
    else:
        from_clause = getattr(select, "fromClause", None) if select is not None else None
    if not from_clause or len(from_clause) != 1 or not isinstance(from_clause[0], ast.RangeVar):
        return None
    rv = from_clause[0]
    return rv.alias.aliasname if rv.alias is not None else rv.relname


def _qualified(expr: ast.Node, qualifier: str | None) -> ast.Node:
    """`x` as `t.x`, so it still means the outer column inside the subquery."""
    if (
        qualifier is not None
        and isinstance(expr, ast.ColumnRef)
        and len(expr.fields) == 1
        and isinstance(expr.fields[0], ast.String)
    ):
        return ast.ColumnRef(fields=(ast.String(qualifier), expr.fields[0]))
    return expr


def _not_exists(node: ast.BoolExpr, qualifier: str | None) -> ast.Node | None:
    """The NOT EXISTS form of `NOT (x IN (SELECT ...))`, or None when it has no safe one."""
    if node.boolop != BoolExprType.NOT_EXPR or not node.args or len(node.args) != 1:
        return None
    link = node.args[0]
    if not isinstance(link, ast.SubLink) or link.subLinkType != SubLinkType.ANY_SUBLINK:
        return None
    if link.operName and [n.sval for n in link.operName] != ["="]:
        return None
    sub = link.subselect
    if (
        not isinstance(sub, ast.SelectStmt)
        or sub.op != 0  # UNION and friends
        or not sub.fromClause
        or not sub.targetList
        or len(sub.targetList) != 1
        or sub.groupClause
        or sub.havingClause is not None
        or sub.limitCount is not None
        or sub.limitOffset is not None
        or isinstance(link.testexpr, ast.RowExpr)
    ):
        return None
    inner = sub.targetList[0].val
    if _has_aggregate(inner):
        return None
    match = ast.A_Expr(
        kind=A_Expr_Kind.AEXPR_OP,
        name=(ast.String("="),),
        lexpr=inner,
        rexpr=_qualified(link.testexpr, qualifier),
    )
    where = sub.whereClause
    if where is None:
        sub.whereClause = match
    elif isinstance(where, ast.BoolExpr) and where.boolop == BoolExprType.AND_EXPR:
        sub.whereClause = ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(*where.args, match))
    else:
        sub.whereClause = ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(where, match))
    sub.targetList = (ast.ResTarget(val=ast.A_Const(val=ast.Integer(1))),)
    sub.distinctClause = None
    sub.sortClause = None
    return ast.BoolExpr(
        boolop=BoolExprType.NOT_EXPR,
        args=(ast.SubLink(subLinkType=SubLinkType.EXISTS_SUBLINK, subLinkId=0, subselect=sub),),
    )


def _rewrite(node: Any, select: ast.Node | None) -> int:
    """Replaces, in place, every NOT IN subquery under `node`; how many were replaced."""
    if isinstance(node, (ast.SelectStmt, ast.UpdateStmt, ast.DeleteStmt)):
        select = node
    done = 0
    if isinstance(node, ast.Node):
        for name in node:
            value = getattr(node, name)
            if isinstance(value, ast.BoolExpr):
                replacement = _not_exists(value, _outer_qualifier(select))
                if replacement is not None:
                    setattr(node, name, replacement)
                    done += 1 + _rewrite(replacement, select)
                    continue
            if isinstance(value, tuple) and any(isinstance(v, ast.BoolExpr) for v in value):
                items = list(value)
                for index, item in enumerate(items):
                    if isinstance(item, ast.BoolExpr):
                        replacement = _not_exists(item, _outer_qualifier(select))
                        if replacement is not None:
                            items[index] = replacement
                            done += 1
                setattr(node, name, tuple(items))
                value = tuple(items)
            done += _rewrite(value, select)
    elif isinstance(node, (tuple, list)):
        for item in node:
            done += _rewrite(item, select)
    return done


@lru_cache(maxsize=1024)  # a statement shape is seen again and again; the parse is ~0.2 ms
def not_exists_sql(statement: str) -> str | None:
    """`statement` (normalized) with each `x NOT IN (SELECT y ...)` as `NOT EXISTS (SELECT 1
    ... AND y = x)`, or None when there is none it can rewrite safely."""
    try:
        (raw,) = parse_sql(statement)
    except (ParseError, ValueError):
        return None
    if not _rewrite(raw.stmt, None):
        return None
    return str(RawStream()(raw))


def trigram_index_sql(table: str, column: str) -> str:
    """The pg_trgm extension and a GIN trigram index on `table` (`schema.name` or a name)."""
    schema, _, name = table.rpartition(".")
    index = ast.IndexStmt(
        relation=ast.RangeVar(
            schemaname=schema or None, relname=name, inh=True, relpersistence="p"
        ),
        accessMethod="gin",
        indexParams=(
            ast.IndexElem(
                name=column,
                opclass=(ast.String("gin_trgm_ops"),),
                ordering=SortByDir.SORTBY_DEFAULT,
                nulls_ordering=SortByNulls.SORTBY_NULLS_DEFAULT,
            ),
        ),
        concurrent=True,
    )
    return f"CREATE EXTENSION IF NOT EXISTS pg_trgm; {RawStream()(index)};"
