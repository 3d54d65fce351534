"""Builders that turn a detected loop into its batched SQL, by editing the pglast AST.

Inputs are normalized statements (every value a `$n`), so the output never holds a value
either. Used for advice `suggested_sql`; the rewrite rules use the same deparser.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType
from pglast.parser import ParseError
from pglast.stream import RawStream

__all__ = [
    "TYPE_NAMES",
    "any_key_write_sql",
    "batched_lookup_sql",
    "multirow_insert_sql",
    "unnest_write_sql",
]

# Common type OIDs (pg_type) to the names an array cast needs. Drivers declare integers by
# the size of the value at hand (psycopg sends a small int as int2), so every integer
# becomes bigint, which assignment-casts into any integer column.
TYPE_NAMES = {
    16: "boolean",
    17: "bytea",
    20: "bigint",
    21: "bigint",
    23: "bigint",
    25: "text",
    114: "json",
    700: "real",
    701: "double precision",
    1042: "text",
    1043: "text",
    1082: "date",
    1083: "time",
    1114: "timestamp",
    1184: "timestamptz",
    1186: "interval",
    1700: "numeric",
    2950: "uuid",
    3802: "jsonb",
}


def _parse_one(statement: str) -> ast.RawStmt | None:
    try:
        (raw,) = parse_sql(statement)
    except (ParseError, ValueError):
        return None
    return raw


def _children(node: Any) -> list[Any]:
    if isinstance(node, ast.Node):
        return [getattr(node, name) for name in node]
    if isinstance(node, (tuple, list)):
        return list(node)
    return []


def _nodes(node: Any) -> list[Any]:
    """Every AST node under `node`, itself included."""
    found, stack = [], [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.Node):
            found.append(item)
        stack.extend(_children(item))
    return found


def _param_numbers(node: Any) -> list[int]:
    """The `$n` of every parameter reference under `node`, one entry per occurrence."""
    return [n.number for n in _nodes(node) if isinstance(n, ast.ParamRef)]


def _map(node: Any, replace: Any) -> Any:
    """`node` with every sub-node for which `replace(sub)` is not None replaced by it (not
    descended into); nodes are edited in place, tuples rebuilt."""
    if isinstance(node, ast.Node):
        new = replace(node)
        if new is not None:
            return new
        for name in node:
            value = getattr(node, name)
            if isinstance(value, (ast.Node, tuple, list)):
                setattr(node, name, _map(value, replace))
        return node
    if isinstance(node, (tuple, list)):
        return tuple(_map(item, replace) for item in node)
    return node


def _conjuncts(where: ast.Node | None) -> list[ast.Node]:
    if where is None:
        return []
    if isinstance(where, ast.BoolExpr) and where.boolop == BoolExprType.AND_EXPR:
        return [c for arg in where.args for c in _conjuncts(arg)]
    return [where]


def _param_of(node: ast.Node | None) -> ast.ParamRef | None:
    if isinstance(node, ast.TypeCast):
        node = node.arg
    return node if isinstance(node, ast.ParamRef) else None


def _array_type(type_name: ast.TypeName) -> ast.TypeName:
    return ast.TypeName(
        names=type_name.names,
        typmods=type_name.typmods,
        typemod=type_name.typemod,
        arrayBounds=(ast.Integer(-1),),
    )


def _as_array(node: ast.Node) -> ast.Node:
    """`$1` stays `$1` (an array parameter); `$1::int` becomes `$1::int[]`."""
    if isinstance(node, ast.TypeCast):
        return ast.TypeCast(arg=node.arg, typeName=_array_type(node.typeName))
    return node


@lru_cache(maxsize=64)
def _named_array_type(name: str) -> ast.TypeName:
    """The TypeName of `name[]`, for the names of TYPE_NAMES (constants, not user text)."""
    (raw,) = parse_sql(f"SELECT NULL::{name}[]")
    return raw.stmt.targetList[0].val.typeName  # type: ignore[no-any-return]


def _key_column(conjunct: ast.Node, param: int) -> tuple[ast.Node, ast.Node] | None:
    """(column, value) of `column = $param` or `column IN ($param)` (either side)."""
    if not isinstance(conjunct, ast.A_Expr) or [n.sval for n in conjunct.name] != ["="]:
        return None
    if conjunct.kind == A_Expr_Kind.AEXPR_IN:
        items = conjunct.rexpr
        if not isinstance(items, (tuple, list)) or len(items) != 1:
            return None
        sides: tuple[tuple[Any, Any], ...] = ((conjunct.lexpr, items[0]),)
    elif conjunct.kind == A_Expr_Kind.AEXPR_OP:
        sides = ((conjunct.lexpr, conjunct.rexpr), (conjunct.rexpr, conjunct.lexpr))
    else:
        return None
    for column, value in sides:
        ref = _param_of(value)
        if ref is not None and ref.number == param and isinstance(column, ast.ColumnRef):
            return column, value
    return None


def _to_any(where: ast.Node | None, param: int) -> bool:
    """Turns the top-level conjunct `col = $param` (or `col IN ($param)`) into
    `col = ANY($param)`, in place; False when there is none."""
    for conjunct in _conjuncts(where):
        found = _key_column(conjunct, param)
        if found is not None:
            conjunct.kind = A_Expr_Kind.AEXPR_OP_ANY
            conjunct.lexpr, conjunct.rexpr = found[0], _as_array(found[1])
            return True
    return False


def batched_lookup_sql(statement: str, param: int, *, drop_limit: bool = False) -> str | None:
    """`... WHERE col = $n ...` (or `col IN ($n)`) -> `... WHERE col = ANY($n) ...`, or
    None if not found. A LIMIT meant for one key would cut the batch short: the statement
    is refused, unless `drop_limit` (the caller knows it is LIMIT 1 on a key lookup, an
    ORM's "find one", so one row per key is what the batch returns without it)."""
    raw = _parse_one(statement)
    select = raw.stmt if raw is not None else None
    if not isinstance(select, ast.SelectStmt) or select.limitOffset is not None:
        return None
    if select.limitCount is not None:
        if not drop_limit or param in _param_numbers(select.limitCount):
            return None
        select.limitCount = None
    if _param_numbers(select).count(param) != 1 or not _to_any(select.whereClause, param):
        return None
    return RawStream()(raw)


def _unnest(arrays: list[ast.Node], alias: str, columns: list[str]) -> ast.RangeFunction:
    """`unnest(arrays...) AS alias (columns...)`, a FROM item."""
    call = ast.FuncCall(funcname=(ast.String("unnest"),), args=tuple(arrays))
    return ast.RangeFunction(
        functions=((call, None),),
        alias=ast.Alias(aliasname=alias, colnames=tuple(ast.String(c) for c in columns)),
    )


def _write_statement(statement: str) -> tuple[ast.RawStmt, Any] | None:
    """The parsed UPDATE/DELETE whose WHERE a batch can be built on: one target relation,
    no FROM/USING or WITH of its own, no subquery or row assignment to reason about."""
    raw = _parse_one(statement)
    if raw is None or not isinstance(raw.stmt, (ast.UpdateStmt, ast.DeleteStmt)):
        return None
    stmt = raw.stmt
    if stmt.whereClause is None or stmt.withClause is not None:
        return None
    if getattr(stmt, "fromClause", None) or getattr(stmt, "usingClause", None):
        return None
    if any(isinstance(n, (ast.SubLink, ast.MultiAssignRef)) for n in _nodes(stmt)):
        return None
    return raw, stmt


def any_key_write_sql(statement: str, param: int) -> str | None:
    """An UPDATE/DELETE by `col = $param` rewritten for all keys at once,
    `... WHERE col = ANY($param)`: right when only the key differs between the rows of
    the loop (every other value is the same). None when `$param` is used elsewhere too."""
    parsed = _write_statement(statement)
    if parsed is None:
        return None
    raw, stmt = parsed
    if _param_numbers(stmt).count(param) != 1 or not _to_any(stmt.whereClause, param):
        return None
    return RawStream()(raw)


def unnest_write_sql(statement: str, param_types: dict[int, int] | None = None) -> str | None:
    """An UPDATE/DELETE of one row by key rewritten to do every row of the loop at once,
    one array per parameter, joined row by row:
    `UPDATE t SET x = v.x FROM unnest($1::text[], $2::bigint[]) AS v (x, id) WHERE t.id = v.id`
    (DELETE ... USING ...). Each `$n` becomes the column of `v` named after the column it
    sets or is compared to, and keeps its number as the array's; columns of the table are
    qualified, so `n = n + $1` reads `n = t.n + v.n`. Array element types come from a
    cast in the statement, else `param_types` (OIDs; unknown: text); None for a type
    outside TYPE_NAMES or a shape the join would not reproduce row for row."""
    parsed = _write_statement(statement)
    if parsed is None:
        return None
    raw, stmt = parsed
    numbers = sorted(set(_param_numbers(stmt)))
    if not numbers or numbers != list(range(1, len(numbers) + 1)):
        return None
    relation = stmt.relation
    qualifier = relation.alias.aliasname if relation.alias is not None else relation.relname
    alias = "v" if qualifier != "v" else "v_"

    # names: the column a parameter sets, else the column it is compared to, else the
    # column whose new value it is part of (`n = n + $1`: v.n), else p<n>
    names: dict[int, str] = {}
    targets = getattr(stmt, "targetList", None) or ()
    for target in targets:
        ref = _param_of(target.val)
        if ref is not None:
            names.setdefault(ref.number, target.name)
    for conjunct in _conjuncts(stmt.whereClause):
        for number in numbers:
            found = _key_column(conjunct, number)
            if found is not None:
                names.setdefault(number, found[0].fields[-1].sval)
                if conjunct.kind == A_Expr_Kind.AEXPR_IN:  # `col IN ($n)` joins as `col = $n`
                    conjunct.kind, conjunct.rexpr = A_Expr_Kind.AEXPR_OP, found[1]
    for target in targets:
        for number in _param_numbers(target.val):
            if target.name not in names.values():
                names.setdefault(number, target.name)
    used: set[str] = set()
    for number in numbers:
        name = names.get(number, f"p{number}")
        if name in used:
            name = f"{name}_{number}"
        used.add(name)
        names[number] = name

    types: dict[int, ast.TypeName] = {}
    for node in _nodes(stmt):
        if isinstance(node, ast.TypeCast) and isinstance(node.arg, ast.ParamRef):
            types.setdefault(node.arg.number, _array_type(node.typeName))
    oids = param_types or {}
    for number in numbers:
        if number not in types:
            oid = oids.get(number, 0)
            if oid and oid not in TYPE_NAMES:
                return None  # an enum or other type whose name is not known here
            types[number] = _named_array_type(TYPE_NAMES.get(oid, "text"))

    def qualify(node: ast.Node) -> ast.Node | None:
        if isinstance(node, ast.ParamRef):
            return ast.ColumnRef(fields=(ast.String(alias), ast.String(names[node.number])))
        if isinstance(node, ast.ColumnRef) and len(node.fields) == 1:
            field = node.fields[0]
            if isinstance(field, ast.String) and field.sval in (qualifier, relation.relname):
                return None  # the row itself, as in to_jsonb(t)
            return ast.ColumnRef(fields=(ast.String(qualifier), field))
        return None

    for target in targets:
        target.val = _map(target.val, qualify)
    stmt.whereClause = _map(stmt.whereClause, qualify)
    for name in ("returningClause", "returningList"):  # pglast 8, pglast 7
        if getattr(stmt, name, None) is not None:
            setattr(stmt, name, _map(getattr(stmt, name), qualify))
    source = _unnest(
        [ast.TypeCast(arg=ast.ParamRef(number=n), typeName=types[n]) for n in numbers],
        alias,
        [names[n] for n in numbers],
    )
    if isinstance(stmt, ast.UpdateStmt):
        stmt.fromClause = (source,)
    else:
        stmt.usingClause = (source,)
    return RawStream()(raw)


def multirow_insert_sql(statement: str, param_types: dict[int, int] | None = None) -> str | None:
    """A one-row `INSERT ... VALUES (...)` rewritten to insert many rows from arrays.

    Each `$n` of the row becomes an array parameter unnested in step with the others:
    `INSERT INTO t (a, b) SELECT u.a, u.b FROM unnest($1::bigint[], $2::text[]) AS u (a, b)`.
    Expressions without parameters (now(), literals already normalized) are kept as
    they are; rows whose expressions mix parameters into other expressions return None.
    ON CONFLICT and RETURNING are kept; a parameter in the ON CONFLICT clause that is the
    value of a column of the row becomes `EXCLUDED.column` (the value that row proposed).
    """
    raw = _parse_one(statement)
    insert = raw.stmt if raw is not None else None
    if not isinstance(insert, ast.InsertStmt) or insert.selectStmt is None:
        return None
    values = insert.selectStmt.valuesLists
    if not values or len(values) != 1 or insert.withClause is not None:
        return None
    (row,) = values
    named = bool(insert.cols)
    columns = [c.name for c in insert.cols] if named else [f"c{i + 1}" for i in range(len(row))]
    if len(columns) != len(row):
        return None
    types = param_types or {}
    arrays: list[ast.Node] = []
    aliases: list[str] = []
    select_list: list[ast.Node] = []
    column_of: dict[int, str] = {}  # original $n -> the column whose value it is
    for column, item in zip(columns, row, strict=True):
        ref = _param_of(item)
        if ref is not None:
            if isinstance(item, ast.TypeCast):
                type_name = _array_type(item.typeName)
            else:
                type_name = _named_array_type(TYPE_NAMES.get(types.get(ref.number, 0), "text"))
            arrays.append(
                ast.TypeCast(arg=ast.ParamRef(number=len(arrays) + 1), typeName=type_name)
            )
            aliases.append(column)
            select_list.append(ast.ColumnRef(fields=(ast.String("u"), ast.String(column))))
            column_of.setdefault(ref.number, column)
        elif _param_numbers(item) or isinstance(item, ast.SetToDefault):
            return None  # DEFAULT is valid in VALUES only
        else:
            select_list.append(item)
    if not arrays:
        return None
    conflict = insert.onConflictClause
    if conflict is not None:
        if not named and _param_numbers(conflict):
            return None  # EXCLUDED needs the column's name
        if any(n not in column_of for n in _param_numbers(conflict)):
            return None
        insert.onConflictClause = _map(
            conflict,
            lambda node: (
                ast.ColumnRef(fields=(ast.String("excluded"), ast.String(column_of[node.number])))
                if isinstance(node, ast.ParamRef)
                else None
            ),
        )
    if _param_numbers(getattr(insert, "returningClause", None) or ()) or _param_numbers(
        getattr(insert, "returningList", None) or ()
    ):
        return None
    insert.selectStmt = ast.SelectStmt(
        targetList=tuple(ast.ResTarget(val=v) for v in select_list),
        fromClause=(_unnest(arrays, "u", aliases),),
    )
    return RawStream()(raw)
