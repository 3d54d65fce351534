"""Which columns a statement filters, joins and sorts on, read from its parse tree: the
raw material of index candidates. Works on the normalized text, where every value is a
`$n`, so it sees shapes only, never values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType, SetOperation

__all__ = ["ColumnUse", "TableRef", "column_uses", "delete_target"]

TableRef = tuple[str | None, str]  # (schema as written, or None; table)

_RANGE_OPS: Final = frozenset({"<", ">", "<=", ">="})
_JSON_EXISTS: Final = frozenset({"?", "?|", "?&"})
_LIKE_OPS: Final = frozenset({"~~", "~~*"})
_BETWEEN: Final = frozenset(
    {A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_BETWEEN_SYM}  # not the NOT forms
)


@dataclass(frozen=True, slots=True)
class ColumnUse:
    """One column a statement could use an index on. `kind`: eq (=, IN, = ANY, a join
    condition), range (<, >, BETWEEN), sort (ORDER BY with LIMIT), contains (jsonb @>),
    exists (jsonb ?, ?|, ?&), like (LIKE/ILIKE; `param` is the pattern's $n, 0 when not
    a parameter). `tables`: the table it belongs to, or those it may belong to when the
    statement leaves it unqualified (the catalog tells which)."""

    kind: str
    column: str
    tables: tuple[TableRef, ...]
    param: int = 0
    join: bool = False


Scope = dict[str, TableRef]  # alias (or table name) -> table, for one query level


def column_uses(sql: str) -> list[ColumnUse]:
    """Every column use of the one statement in `sql`, in the order written; none when it
    does not parse or holds several statements."""
    try:
        statements = parse_sql(sql)
    except Exception:
        return []
    if len(statements) != 1:
        return []
    found: list[ColumnUse] = []
    _statement(statements[0].stmt, [], found)
    return found


def delete_target(sql: str) -> TableRef | None:
    """The table a DELETE removes rows from (whose foreign keys' checks then run)."""
    try:
        statements = parse_sql(sql)
    except Exception:
        return None
    node = statements[0].stmt if len(statements) == 1 else None
    if not isinstance(node, ast.DeleteStmt):
        return None
    return node.relation.schemaname, node.relation.relname


def _statement(node: Any, outer: list[Scope], found: list[ColumnUse]) -> None:
    with_clause = getattr(node, "withClause", None)
    if with_clause is not None:
        for cte in with_clause.ctes or ():
            _statement(cte.ctequery, outer, found)
    scope: Scope = {}
    chain = [scope, *outer]
    conditions: list[tuple[Any, bool]] = []
    if isinstance(node, ast.SelectStmt):
        if node.op != SetOperation.SETOP_NONE:
            _statement(node.larg, outer, found)
            _statement(node.rarg, outer, found)
            return
        for item in node.fromClause or ():
            _from_item(item, scope, outer, conditions, found)
    elif isinstance(node, ast.UpdateStmt | ast.DeleteStmt):
        _from_item(node.relation, scope, outer, conditions, found)
        others = node.fromClause if isinstance(node, ast.UpdateStmt) else node.usingClause
        for item in others or ():
            _from_item(item, scope, outer, conditions, found)
    elif isinstance(node, ast.InsertStmt):
        if node.selectStmt is not None:
            _statement(node.selectStmt, outer, found)
        return
    else:
        return
    where = getattr(node, "whereClause", None)
    if where is not None:
        conditions.append((where, False))
    for condition, join in conditions:
        _condition(condition, chain, join, found)
    if isinstance(node, ast.SelectStmt) and node.limitCount is not None and node.sortClause:
        columns = [_column(sort.node, chain) for sort in node.sortClause]
        if all(c is not None for c in columns):
            found.extend(ColumnUse("sort", *c) for c in columns if c is not None)


def _from_item(
    item: Any,
    scope: Scope,
    outer: list[Scope],
    conditions: list[tuple[Any, bool]],
    found: list[ColumnUse],
) -> None:
    if isinstance(item, ast.RangeVar):
        table: TableRef = (item.schemaname, item.relname)
        scope[item.alias.aliasname if item.alias is not None else item.relname] = table
    elif isinstance(item, ast.JoinExpr):
        _from_item(item.larg, scope, outer, conditions, found)
        _from_item(item.rarg, scope, outer, conditions, found)
        if item.quals is not None:
            conditions.append((item.quals, True))
    elif isinstance(item, ast.RangeSubselect):
        _statement(item.subquery, outer, found)


def _condition(node: Any, chain: list[Scope], join: bool, found: list[ColumnUse]) -> None:
    if isinstance(node, ast.BoolExpr):
        if node.boolop == BoolExprType.AND_EXPR:
            for arg in node.args:
                _condition(arg, chain, join, found)
        else:  # OR, NOT: no one index serves them, but their subqueries may use one
            _sublinks(node.args, chain, found)
    elif isinstance(node, ast.SubLink):
        _statement(node.subselect, chain, found)
    elif isinstance(node, ast.A_Expr):
        _operator(node, chain, join, found)


def _sublinks(nodes: Iterable[Any], chain: list[Scope], found: list[ColumnUse]) -> None:
    for node in nodes:
        if isinstance(node, ast.SubLink):
            _statement(node.subselect, chain, found)
        elif isinstance(node, ast.BoolExpr):
            _sublinks(node.args, chain, found)


def _operator(node: ast.A_Expr, chain: list[Scope], join: bool, found: list[ColumnUse]) -> None:
    name = node.name[-1].sval if node.name else ""
    kind = node.kind
    left = _column(node.lexpr, chain)
    if kind == A_Expr_Kind.AEXPR_OP and name == "=":
        right = _column(node.rexpr, chain)
        if left is not None and right is not None:
            found.append(ColumnUse("eq", *left, join=True))
            found.append(ColumnUse("eq", *right, join=True))
        elif left is not None and _is_value(node.rexpr):
            found.append(ColumnUse("eq", *left, join=join))
        elif right is not None and _is_value(node.lexpr):
            found.append(ColumnUse("eq", *right, join=join))
        return
    if left is None:
        return
    if (
        kind == A_Expr_Kind.AEXPR_OP and name in _RANGE_OPS and _is_value(node.rexpr)
    ) or kind in _BETWEEN:
        found.append(ColumnUse("range", *left))
    elif kind == A_Expr_Kind.AEXPR_OP and name == "@>":
        found.append(ColumnUse("contains", *left))
    elif kind == A_Expr_Kind.AEXPR_OP and name in _JSON_EXISTS:
        found.append(ColumnUse("exists", *left))
    elif kind in (A_Expr_Kind.AEXPR_IN, A_Expr_Kind.AEXPR_OP_ANY) and name == "=":
        found.append(ColumnUse("eq", *left))
    elif name in _LIKE_OPS:
        found.append(ColumnUse("like", *left, param=_param(node.rexpr)))


def _param(node: Any) -> int:
    while isinstance(node, ast.TypeCast):
        node = node.arg
    return node.number if isinstance(node, ast.ParamRef) else 0


def _is_value(node: Any) -> bool:
    """A parameter, a constant, or an expression of those (a cast, now()): not a column."""
    if isinstance(node, ast.ParamRef | ast.A_Const | ast.SQLValueFunction):
        return True
    if isinstance(node, ast.TypeCast):
        return _is_value(node.arg)
    if isinstance(node, ast.FuncCall):
        return all(_is_value(arg) for arg in node.args or ())
    if isinstance(node, ast.A_Expr):
        return _is_value(node.lexpr) and _is_value(node.rexpr)
    return False


def _column(node: Any, chain: Sequence[Scope]) -> tuple[str, tuple[TableRef, ...]] | None:
    """(column, the tables it may belong to) of a plain column reference, else None."""
    if not isinstance(node, ast.ColumnRef):
        return None
    names = [f.sval for f in node.fields if isinstance(f, ast.String)]
    if len(names) != len(node.fields) or not names:
        return None  # t.* or an indirection
    column = names[-1]
    if len(names) == 3:
        return column, ((names[0], names[1]),)
    if len(names) == 2:
        for scope in chain:
            if names[0] in scope:
                return column, (scope[names[0]],)
        return None
    # unqualified: a table of the innermost query level first, then the outer ones
    tables = tuple(table for scope in chain for table in scope.values())
    return (column, tables) if tables else None
