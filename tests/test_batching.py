"""proxy.rewriters.batching: the batched SQL of `suggested_sql`, checked by parsing it back."""

from __future__ import annotations

import pytest
from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind

from proxy.rewriters.batching import batched_lookup_sql, multirow_insert_sql

INT4, INT8, TEXT, UUID = 23, 20, 25, 2950


def parse_one(sql: str) -> ast.Node:
    """The statement of a one-statement text; fails the test if it is not valid SQL."""
    (raw,) = parse_sql(sql)
    return raw.stmt


def any_conjuncts(select: ast.SelectStmt) -> list[ast.A_Expr]:
    """The `x = ANY(...)` expressions of a WHERE clause (top level or AND-ed)."""
    where = select.whereClause
    items = list(where.args) if isinstance(where, ast.BoolExpr) else [where]
    return [e for e in items if isinstance(e, ast.A_Expr) and e.kind == A_Expr_Kind.AEXPR_OP_ANY]


# -------------------------------------------------------------------------- batched lookup


@pytest.mark.parametrize(
    ("statement", "param", "column"),
    [
        ("SELECT * FROM users WHERE id = $1", 1, ["id"]),
        ("SELECT * FROM users WHERE $1 = id", 1, ["id"]),
        (
            "SELECT b.id, b.title FROM books b WHERE b.author_id = $1 ORDER BY b.id",
            1,
            ["b", "author_id"],
        ),
        ("SELECT * FROM users WHERE org = $1 AND id = $2", 2, ["id"]),
        ("SELECT * FROM users WHERE org = $1 AND id = $2 FOR UPDATE", 2, ["id"]),
    ],
)
def test_batched_lookup_uses_any(statement: str, param: int, column: list[str]) -> None:
    sql = batched_lookup_sql(statement, param)
    assert sql is not None
    select = parse_one(sql)
    assert isinstance(select, ast.SelectStmt)
    (expr,) = any_conjuncts(select)
    assert [f.sval for f in expr.lexpr.fields] == column
    assert isinstance(expr.rexpr, ast.ParamRef) and expr.rexpr.number == param
    assert f"ANY(${param})" in sql


def test_batched_lookup_keeps_the_other_conditions() -> None:
    sql = batched_lookup_sql("SELECT * FROM users WHERE org = $1 AND id = $2 AND active", 2)
    assert sql == "SELECT * FROM users WHERE org = $1 AND id = ANY($2) AND active"


def test_batched_lookup_keeps_the_cast_as_an_array_cast() -> None:
    sql = batched_lookup_sql("SELECT * FROM users WHERE id = $1::int", 1)
    assert sql is not None
    (expr,) = any_conjuncts(parse_one(sql))
    assert isinstance(expr.rexpr, ast.TypeCast)
    assert expr.rexpr.arg.number == 1
    assert expr.rexpr.typeName.arrayBounds  # int[]
    assert [n.sval for n in expr.rexpr.typeName.names][-1] == "int4"


def test_batched_lookup_of_a_varchar_keeps_its_modifier() -> None:
    sql = batched_lookup_sql("SELECT * FROM t WHERE code = $1::varchar(10)", 1)
    assert sql is not None
    (expr,) = any_conjuncts(parse_one(sql))
    assert expr.rexpr.typeName.typmods and expr.rexpr.typeName.arrayBounds


@pytest.mark.parametrize(
    ("statement", "param"),
    [
        ("SELECT * FROM users WHERE id = $1", 2),  # no such parameter
        ("SELECT * FROM users WHERE id > $1", 1),
        ("SELECT * FROM users WHERE id = $1 OR email = $2", 1),
        ("SELECT * FROM users WHERE lower(email) = $1", 1),
        ("SELECT * FROM users WHERE id = ANY($1)", 1),
        ("UPDATE users SET a = 1 WHERE id = $1", 1),
        ("DELETE FROM users WHERE id = $1", 1),
        ("SELECT 1; SELECT 2", 1),
        ("not sql at all", 1),
        # a LIMIT written for one key would truncate the batch
        ("SELECT * FROM users WHERE id = $1 LIMIT $2", 1),
        ("SELECT * FROM posts WHERE author_id = $1 ORDER BY created DESC LIMIT 5", 1),
        ("SELECT * FROM posts WHERE author_id = $1 OFFSET $2", 1),
    ],
)
def test_batched_lookup_unsupported_shapes(statement: str, param: int) -> None:
    assert batched_lookup_sql(statement, param) is None


# ------------------------------------------------------------------------- multirow insert


def unnest_of(insert: ast.InsertStmt) -> tuple[ast.SelectStmt, ast.FuncCall, ast.RangeFunction]:
    """The SELECT ... FROM unnest(...) AS u (...) that replaced the VALUES row."""
    select = insert.selectStmt
    assert isinstance(select, ast.SelectStmt) and not select.valuesLists
    (source,) = select.fromClause
    assert isinstance(source, ast.RangeFunction)
    ((call, _),) = source.functions
    assert [n.sval for n in call.funcname] == ["unnest"]
    return select, call, source


def array_casts(call: ast.FuncCall) -> list[tuple[int, str]]:
    """(parameter number, element type name) of each unnest argument."""
    out = []
    for arg in call.args:
        assert isinstance(arg, ast.TypeCast) and isinstance(arg.arg, ast.ParamRef)
        assert arg.typeName.arrayBounds
        out.append((arg.arg.number, arg.typeName.names[-1].sval))
    return out


def test_multirow_insert_from_arrays() -> None:
    sql = multirow_insert_sql("INSERT INTO t (a, b) VALUES ($1, $2)", {1: INT4, 2: TEXT})
    assert sql is not None
    insert = parse_one(sql)
    assert isinstance(insert, ast.InsertStmt)
    assert [c.name for c in insert.cols] == ["a", "b"]
    select, call, source = unnest_of(insert)
    assert [n for n, _ in array_casts(call)] == [1, 2]
    assert array_casts(call)[1][1] == "text"
    assert array_casts(call)[0][1] in ("int4", "int8")  # integers as int or bigint
    assert source.alias.aliasname == "u"
    assert [c.sval for c in source.alias.colnames] == ["a", "b"]
    assert [[f.sval for f in t.val.fields] for t in select.targetList] == [["u", "a"], ["u", "b"]]


def test_multirow_insert_defaults_to_text_arrays() -> None:
    sql = multirow_insert_sql("INSERT INTO t (a, b) VALUES ($1, $2)")
    assert sql is not None
    assert [t for _, t in array_casts(unnest_of(parse_one(sql))[1])] == ["text", "text"]


def test_multirow_insert_known_types() -> None:
    sql = multirow_insert_sql("INSERT INTO t (id, n) VALUES ($1, $2)", {1: UUID, 2: INT8})
    assert sql is not None
    assert [t for _, t in array_casts(unnest_of(parse_one(sql))[1])] == ["uuid", "int8"]


def test_multirow_insert_keeps_casts_and_constant_expressions() -> None:
    sql = multirow_insert_sql(
        "INSERT INTO t (a, created, c) VALUES ($1::int, now(), $2)", {2: TEXT}
    )
    assert sql is not None
    select, call, source = unnest_of(parse_one(sql))
    assert array_casts(call) == [(1, "int4"), (2, "text")]
    assert [c.sval for c in source.alias.colnames] == ["a", "c"]
    assert isinstance(select.targetList[1].val, ast.FuncCall)  # now() stays per row


def test_multirow_insert_keeps_on_conflict_and_returning() -> None:
    sql = multirow_insert_sql(
        "INSERT INTO s.t AS x (a, b) VALUES ($1, $2) "
        "ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b RETURNING id",
        {1: INT4, 2: TEXT},
    )
    assert sql is not None
    insert = parse_one(sql)
    assert insert.relation.schemaname == "s" and insert.relation.relname == "t"
    assert insert.onConflictClause is not None
    assert insert.onConflictClause.infer is not None
    assert [t.val.fields[0].sval for t in insert.returningClause.exprs] == ["id"]
    unnest_of(insert)


def test_multirow_insert_without_column_list() -> None:
    sql = multirow_insert_sql("INSERT INTO t VALUES ($1, $2)", {1: INT4, 2: TEXT})
    assert sql is not None
    insert = parse_one(sql)
    assert not insert.cols
    assert len(array_casts(unnest_of(insert)[1])) == 2


def test_multirow_insert_holds_no_value() -> None:
    sql = multirow_insert_sql("INSERT INTO t (a, b, c) VALUES ($1, $2, $3)")
    assert sql is not None
    assert "'" not in sql


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO t (a) VALUES ($1), ($2)",  # already multi-row
        "INSERT INTO t (a, b) VALUES ($1, lower($2))",  # a parameter inside an expression
        "INSERT INTO t (a, b) VALUES ($1, DEFAULT)",  # DEFAULT is not valid in a SELECT
        "INSERT INTO t (a) SELECT x FROM s",
        "INSERT INTO t DEFAULT VALUES",
        "INSERT INTO t (a) VALUES (now())",  # nothing varies
        "INSERT INTO t (a, b) VALUES ($1)",  # column count mismatch
        "SELECT 1",
        "UPDATE t SET a = $1",
        "garbage",
    ],
)
def test_multirow_insert_unsupported_shapes(statement: str) -> None:
    assert multirow_insert_sql(statement) is None
