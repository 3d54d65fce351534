"""Builders that turn a detected loop into its batched SQL, by editing the pglast AST.

Inputs are normalized statements (every value a `$n`), so the output never holds a value
either. Used for advice `suggested_sql`; the rewrite rules use the same deparser.
"""

from __future__ import annotations

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType
from pglast.parser import ParseError
from pglast.stream import RawStream

__all__ = ["TYPE_NAMES", "batched_lookup_sql", "multirow_insert_sql"]

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


def _as_array(node: ast.Node) -> ast.Node:
    """`$1` stays `$1` (an array parameter); `$1::int` becomes `$1::int[]`."""
    if isinstance(node, ast.TypeCast):
        type_name = node.typeName
        return ast.TypeCast(
            arg=node.arg,
            typeName=ast.TypeName(
                names=type_name.names,
                typmods=type_name.typmods,
                typemod=type_name.typemod,
                arrayBounds=(ast.Integer(-1),),
            ),
        )
    return node


def batched_lookup_sql(statement: str, param: int) -> str | None:
    """`... WHERE col = $n ...` -> `... WHERE col = ANY($n) ...`, or None if not found."""
    try:
        (raw,) = parse_sql(statement)
    except (ParseError, ValueError):
        return None
    select = raw.stmt
    if not isinstance(select, ast.SelectStmt):
        return None
    if select.limitCount is not None or select.limitOffset is not None:
        return None  # a LIMIT meant for one key would cut the batch short
    for conjunct in _conjuncts(select.whereClause):
        if not isinstance(conjunct, ast.A_Expr) or conjunct.kind != A_Expr_Kind.AEXPR_OP:
            continue
        if [n.sval for n in conjunct.name] != ["="]:
            continue
        for column_side, value_side in (("lexpr", "rexpr"), ("rexpr", "lexpr")):
            value = getattr(conjunct, value_side)
            ref = _param_of(value)
            if ref is None or ref.number != param:
                continue
            if not isinstance(getattr(conjunct, column_side), ast.ColumnRef):
                continue
            conjunct.kind = A_Expr_Kind.AEXPR_OP_ANY
            conjunct.lexpr = getattr(conjunct, column_side)
            conjunct.rexpr = _as_array(value)
            return RawStream()(raw)
    return None


def multirow_insert_sql(statement: str, param_types: dict[int, int] | None = None) -> str | None:
    """A one-row `INSERT ... VALUES (...)` rewritten to insert many rows from arrays.

    Each `$n` of the row becomes an array parameter unnested in step with the others:
    `INSERT INTO t (a, b) SELECT * FROM unnest($1::integer[], $2::text[]) AS u (a, b)`.
    Expressions without parameters (now(), literals already normalized) are kept as
    they are; rows whose expressions mix parameters into other expressions return None.
    """
    try:
        (raw,) = parse_sql(statement)
    except (ParseError, ValueError):
        return None
    insert = raw.stmt
    if not isinstance(insert, ast.InsertStmt) or insert.selectStmt is None:
        return None
    values = insert.selectStmt.valuesLists
    if not values or len(values) != 1:
        return None
    (row,) = values
    columns = (
        [c.name for c in insert.cols] if insert.cols else [f"c{i + 1}" for i in range(len(row))]
    )
    if len(columns) != len(row):
        return None
    types = param_types or {}
    arrays: list[str] = []
    aliases: list[str] = []
    select_list: list[str] = []
    stream = RawStream()
    for column, item in zip(columns, row, strict=True):
        ref = _param_of(item)
        if ref is not None:
            if isinstance(item, ast.TypeCast):
                type_name = stream(item.typeName)
            else:
                type_name = TYPE_NAMES.get(types.get(ref.number, 0), "text")
            arrays.append(f"${len(arrays) + 1}::{type_name}[]")
            aliases.append(column)
            select_list.append(f"u.{column}")
        elif "ParamRef" in repr(item) or isinstance(item, ast.SetToDefault):
            return None  # DEFAULT is valid in VALUES only
        else:
            select_list.append(RawStream()(item))
    if not arrays:
        return None
    template = (
        f"SELECT {', '.join(select_list)} FROM unnest({', '.join(arrays)}) "
        f"AS u ({', '.join(aliases)})"
    )
    try:
        (replacement,) = parse_sql(template)
    except ParseError:
        return None
    insert.selectStmt = replacement.stmt
    return RawStream()(raw)
