"""Statement text -> StatementInfo, with pglast, cached so a repeated statement costs a lookup.

Costs measured with pglast 8 on this machine: parse_sql_json ~9 µs, normalize ~7 µs,
fingerprint ~14 µs, parse_sql (Python objects) ~230 µs. So the hot path keys its cache
twice: first by the exact text (prepared statements, repeated literals-free SQL), then by
the normalized text, which makes texts that differ only in literals (the simple protocol
with client-side interpolation) one cache entry after a single `normalize` call. Shape
facts come from the JSON parse tree of the normalized text, where every literal is a
`$n` parameter, so a fact such as "equality on parameter 2" means the same for Bind
values and for literals lifted out of a simple Query.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from pglast import ast, parser

__all__ = [
    "COMMANDS",
    "Analyzer",
    "LikePredicate",
    "Lookup",
    "Parsed",
    "StatementInfo",
    "extract_literals",
    "split_statements",
]

_PLACEHOLDER = re.compile(r"\$(\d+)")
# What normalize() replaces by `$n`: a whole constant, so a piece of the original text is
# taken for a literal only if it is one (a segment found inside a string is not an end).
_LITERAL = re.compile(
    r"""
      -?\s*(?:0[xob][0-9a-f_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:e[-+]?\d+)?)
    | (?:e'(?:[^'\\]|\\.|'')*'|(?:[bx]|u&)?'(?:[^']|'')*')(?:\s*\n\s*'(?:[^']|'')*')*
    | \$(\w*)\$.*?\$\1\$
    | true | false | null
    | \$\d+
    """,
    re.IGNORECASE | re.DOTALL | re.VERBOSE,
)

_COMMANDS = {
    "SelectStmt": "SELECT",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
    "CopyStmt": "COPY",
    "VariableSetStmt": "SET",
    "VariableShowStmt": "SHOW",
    "ExplainStmt": "EXPLAIN",
    "CallStmt": "CALL",
    "DoStmt": "DO",
    "ListenStmt": "LISTEN",
    "NotifyStmt": "NOTIFY",
    "UnlistenStmt": "UNLISTEN",
    "TruncateStmt": "TRUNCATE",
    "DropStmt": "DROP",
    "CreateStmt": "CREATE",
    "IndexStmt": "CREATE",
    "ViewStmt": "CREATE",
    "CreateTableAsStmt": "CREATE",
    "AlterTableStmt": "ALTER",
    "VacuumStmt": "VACUUM",
    "LockStmt": "LOCK",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE",
    "DeclareCursorStmt": "DECLARE",
    "FetchStmt": "FETCH",
    "ClosePortalStmt": "CLOSE",
}
_TRANSACTION_KINDS = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "BEGIN",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}
_TRANSACTION_ENDS = ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK", "TRANS_STMT_PREPARE")
_EMPTY = "EMPTY"  # the command of a Query with no statement in it
# Parse tree nodes named like statements that are never a statement of their own
_NOT_STATEMENTS = ("RawStmt", "SetOperationStmt", "PLAssignStmt", "ReturnStmt")


def _command(kind: str, transaction_kind: str = "") -> str:
    """The command name of a statement whose parse tree node is `kind`: what metrics,
    advice and the `command` of rule matches call it."""
    if kind == "TransactionStmt":
        return _TRANSACTION_KINDS.get(transaction_kind, "TRANSACTION")
    command = _COMMANDS.get(kind) or kind.removesuffix("Stmt").upper()
    for verb in ("CREATE", "ALTER", "DROP"):  # CreateFunctionStmt, AlterRoleStmt, ...
        if command.startswith(verb):
            return verb
    return command


def _all_commands() -> frozenset[str]:
    """Every command name _command gives, for every statement node pglast knows."""
    kinds = [name for name in dir(ast) if name.endswith("Stmt") and name not in _NOT_STATEMENTS]
    names = {_command(kind) for kind in kinds if kind != "TransactionStmt"}
    return frozenset(names | set(_TRANSACTION_KINDS.values()) | {_EMPTY})


# What a statement's `command` can be once parsed, so a config naming another one (a typo
# such as DELET) is refused at load instead of silently never matching.
COMMANDS: frozenset[str] = _all_commands()


@dataclass(frozen=True, slots=True)
class Lookup:
    """`column = $param` in the top-level AND of a WHERE clause."""

    column: str
    param: int
    table: str | None  # the table the column belongs to, when that can be told


@dataclass(frozen=True, slots=True)
class LikePredicate:
    """`column LIKE pattern` (ILIKE, `~~`, `~~*` and the NOT forms alike)."""

    column: str | None  # the column matched, when the left side is a plain column
    table: str | None  # its table, when that can be told
    param: int  # the `$n` the pattern is; 0 when it is a string constant
    leading_wildcard: bool = False  # a constant pattern starting with % or _


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """What pgwarden knows about one statement, independent of its parameter values."""

    fingerprint: str
    normalized: str
    command: str
    tables: tuple[str, ...] = ()
    lookups: tuple[Lookup, ...] = ()  # equality lookups on parameters (or lifted literals)
    batched_lookup: bool = False  # `col = ANY($n)` or `col IN (...)`
    values_rows: int = 0  # rows in INSERT ... VALUES; 0 when not a VALUES insert
    insert_columns: tuple[str, ...] = ()
    select_star: bool = False
    has_limit: bool = False
    limit_param: int = 0  # the `$n` a SELECT's LIMIT / FETCH FIRST count is (0: none, or not one)
    has_where: bool = False
    for_update: bool = False
    on_conflict: bool = False
    has_join: bool = False
    aggregate_only: bool = False
    param_count: int = 0  # highest $n in the normalized text
    not_in_subquery: bool = False  # `x NOT IN (SELECT ...)` somewhere in it
    likes: tuple[LikePredicate, ...] = ()  # LIKE/ILIKE predicates on a pattern
    # the table an INSERT, UPDATE or DELETE writes (schema-qualified when written so)
    target: str | None = None
    # per column of a one-row INSERT ... VALUES, the `$n` its value is (0: an expression)
    insert_params: tuple[int, ...] = ()
    set_columns: tuple[str, ...] = ()  # the columns an UPDATE sets, in order
    set_params: tuple[int, ...] = ()  # per set column, the `$n` its new value is (0: other)
    set_reads_columns: bool = False  # a new value is computed from columns (`n = n + 1`)
    order_by: tuple[str, ...] = ()  # the plain columns of a SELECT's top-level ORDER BY
    catalog_only: bool = False  # reads only information_schema / pg_catalog relations
    modifies: bool = False  # a SELECT whose WITH writes (INSERT/UPDATE/DELETE/MERGE)
    # the isolation level a BEGIN / START TRANSACTION / SET TRANSACTION asks for, lower
    # case ("read committed"...), and whether it holds for the transaction or the session
    # (SET SESSION CHARACTERISTICS, SET default_transaction_isolation); "?" when the
    # level is a value the statement text does not hold
    isolation: str = ""
    isolation_scope: str = ""
    # COMMIT, ROLLBACK or PREPARE TRANSACTION: the transaction block is over (not ROLLBACK
    # TO SAVEPOINT, not AND CHAIN, which opens the next one at once)
    ends_transaction: bool = False
    # an UPDATE or DELETE whose WHERE has a condition besides its `col = $n` lookups (a
    # version or state check such as `updated_at < $3`, `processed IS FALSE`)
    guarded: bool = False
    advisory_lock: bool = False  # calls pg_advisory_* / pg_try_advisory_* (lock or unlock)
    error: str | None = None  # why pglast could not parse it

    @property
    def single_row_insert(self) -> bool:
        return self.command == "INSERT" and self.values_rows == 1


class Parsed:
    """One analysed statement of a client message, with its literal values if it had any.

    The literals are lifted out of the text only when asked for: most statements never
    need them, and on the simple protocol every statement text is new.
    """

    __slots__ = ("_literals", "_texts", "info")

    def __init__(
        self,
        info: StatementInfo,
        literals: tuple[str, ...] | None = None,
        *,
        texts: tuple[str, str] | None = None,  # (original, normalized), to extract from
    ) -> None:
        self.info = info
        self._literals = literals
        self._texts = texts

    @property
    def literals(self) -> tuple[str, ...] | None:  # never logged
        if self._texts is not None:
            self._literals = extract_literals(*self._texts)
            self._texts = None
        return self._literals

    def __repr__(self) -> str:
        return f"Parsed({self.info!r})"


def extract_literals(original: str, normalized: str) -> tuple[str, ...] | None:
    """The literal tokens `normalize` replaced, in order, or None if they cannot be aligned.

    normalize() rewrites constants in place and keeps every other character, so the
    text between placeholders is found verbatim in the original; each piece taken for a
    literal must be a whole constant, and the reconstruction must equal the original.
    """
    pieces = _PLACEHOLDER.split(normalized)
    segments = pieces[0::2]
    if len(segments) == 1:
        return () if normalized == original else None
    literals: list[str] = []
    pos = len(segments[0])
    if not original.startswith(segments[0]):
        return None
    for segment in segments[1:]:
        end = pos
        while True:  # the first end that makes a whole constant
            end = original.find(segment, end + 1) if segment else len(original)
            if end < 0:
                return None
            if _LITERAL.fullmatch(original, pos, end):
                break
            if not segment:
                return None
        literals.append(original[pos:end])
        pos = end + len(segment)
    if pos != len(original):
        return None
    return tuple(literals)


class _LRU:
    """Holds an OrderedDict rather than being one: mypyc cannot compile that subclass."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get_hit(self, key: str) -> Any:
        items = self._items
        value = items.get(key)
        if value is not None:
            items.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        items = self._items
        items[key] = value
        if len(items) > self.size:
            items.popitem(last=False)


class Analyzer:
    """Cached statement analysis; safe to share between sessions of one event loop."""

    def __init__(self, cache_size: int = 10000, max_statement_length: int = 100_000) -> None:
        self._by_text = _LRU(cache_size)
        self._by_normalized = _LRU(cache_size)
        self.max_statement_length = max_statement_length
        self.hits = 0
        self.misses = 0
        self.unparsed = 0

    def resize(self, cache_size: int) -> None:
        self._by_text.size = self._by_normalized.size = cache_size

    def analyze(self, sql: str) -> tuple[Parsed, ...]:
        """Every statement of a Query or Parse text, with literals lifted out."""
        cached = self._by_text.get_hit(sql)
        if cached is not None:
            self.hits += 1
            return cached
        if len(sql) > self.max_statement_length:
            self.unparsed += 1
            return (Parsed(_unparsable(sql[:200], "statement too long to analyse")),)
        try:
            normalized = parser.normalize(sql)
        except (parser.ParseError, UnicodeEncodeError) as exc:
            # UnicodeEncodeError: bytes that are not UTF-8 (another client_encoding); its
            # message would quote one of them, so it is not kept
            error = str(exc) if isinstance(exc, parser.ParseError) else "not UTF-8 text"
            self.unparsed += 1
            self.misses += 1
            result: tuple[Parsed, ...] = (Parsed(_unparsable(sql, error)),)
            self._by_text.put(sql, result)
            return result
        infos = self._by_normalized.get_hit(normalized)
        if infos is None:
            self.misses += 1
            try:
                infos = self._analyze_normalized(normalized)
            except parser.ParseError:
                # normalize() can make valid SQL unparsable: a DO or CREATE FUNCTION body,
                # a NOTIFY payload become `$n` where the grammar wants a string constant
                infos = _analyze_original(sql, normalized)
            self._by_normalized.put(normalized, infos)
        else:
            self.hits += 1
        if normalized == sql:
            result = tuple(Parsed(info, ()) for info in infos)
            self._by_text.put(sql, result)
            return result
        if len(infos) == 1:
            return (Parsed(infos[0], texts=(sql, normalized)),)
        return tuple(Parsed(info, None) for info in infos)

    def _analyze_normalized(self, normalized: str) -> tuple[StatementInfo, ...]:
        parts = split_statements(normalized)
        if not parts:
            return (StatementInfo("", normalized.strip(), _EMPTY),)
        if len(parts) == 1:
            return (_describe(parts[0][0], normalized.strip()),)
        return tuple(_describe(stmt, normalized[a:b].strip()) for stmt, a, b in parts)


def split_statements(sql: str) -> list[tuple[dict[str, Any], int, int]]:
    """Each statement of `sql`: its parse tree and its (start, end) character offsets.

    pglast reports byte offsets into the UTF-8 text; callers slice the str. Raises
    pglast's ParseError for text that does not parse.
    """
    stmts = json.loads(parser.parse_sql_json(sql)).get("stmts") or []
    if len(stmts) == 1:
        return [(stmts[0]["stmt"], 0, len(sql))]
    encoded = sql.encode("utf-8")
    parts = []
    for raw in stmts:
        start = raw.get("stmt_location", 0)
        end = start + (raw.get("stmt_len") or len(encoded) - start)
        chars = len(encoded[:start].decode("utf-8"))
        parts.append((raw["stmt"], chars, chars + len(encoded[start:end].decode("utf-8"))))
    return parts


def _analyze_original(sql: str, normalized: str) -> tuple[StatementInfo, ...]:
    """Facts from the original's parse tree, text from normalizing each statement alone."""
    try:
        parts = split_statements(sql)
    except parser.ParseError as exc:
        return (_unparsable(sql, str(exc)),)
    if not parts:
        return (StatementInfo("", normalized.strip(), _EMPTY),)
    infos = []
    for original_stmt, start, end in parts:
        text = sql[start:end].strip()
        normalized_text = parser.normalize(text).strip()
        try:
            (own,) = json.loads(parser.parse_sql_json(normalized_text))["stmts"]
            stmt = own["stmt"]  # literals as ParamRefs, so lookups are seen
        except (parser.ParseError, ValueError, KeyError):
            stmt = original_stmt
        info = _describe(stmt, normalized_text)
        infos.append(info if info.fingerprint else replace(info, fingerprint=_fingerprint(text)))
    return tuple(infos)


def _fingerprint(text: str) -> str:
    try:
        return parser.fingerprint(text)
    except parser.ParseError:
        return ""


def _unparsable(sql: str, error: str) -> StatementInfo:
    word = sql.lstrip().split(None, 1)
    return StatementInfo("", "", word[0].upper() if word else _EMPTY, error=error)


def _describe(stmt: dict[str, Any], text: str) -> StatementInfo:
    ((kind, node),) = stmt.items()
    command = _command(kind, node.get("kind", ""))
    try:
        fingerprint = parser.fingerprint(text)
    except parser.ParseError:
        fingerprint = ""
    facts: dict[str, Any] = {}
    tables = _tables(stmt)
    if kind == "SelectStmt":
        facts = _select_facts(node, tables)
    elif kind == "InsertStmt":
        facts = _insert_facts(node)
    elif kind in ("UpdateStmt", "DeleteStmt"):
        facts = {"has_where": "whereClause" in node}
        facts["lookups"] = _lookups(node.get("whereClause"), tables)
        if len(_conjuncts(node.get("whereClause"))) > len(facts["lookups"]):
            facts["guarded"] = True
        if kind == "UpdateStmt":
            facts.update(_update_facts(node))
    elif kind in ("TransactionStmt", "VariableSetStmt"):
        facts = _isolation_facts(kind, node)
        if node.get("kind") in _TRANSACTION_ENDS and not node.get("chain"):
            facts["ends_transaction"] = True
    if kind in ("InsertStmt", "UpdateStmt", "DeleteStmt"):
        facts["target"] = _relation_name(node.get("relation", {}))
    upper = text.upper()
    if "NOT" in upper or "LIKE" in upper or "~~" in upper:
        # only then can it hold a NOT IN or a LIKE: the parse tree decides which, if any
        facts.update(_predicate_facts(stmt, tables))
    if "ADVISORY" in upper and any(
        str(name.get("String", {}).get("sval", "")).startswith(("pg_advisory", "pg_try_advisory"))
        for n in _walk(stmt)
        if "FuncCall" in n
        for name in n["FuncCall"].get("funcname", [])[-1:]
    ):
        facts["advisory_lock"] = True
    lookups = facts.get("lookups", ())
    if any(x.table is not None and x.table not in tables for x in lookups):
        aliases = _aliases(stmt)  # `o.id = $1` with `orders o` in a join: the table is orders
        facts["lookups"] = tuple(
            replace(lookup, table=aliases.get(lookup.table, lookup.table))
            for lookup in facts["lookups"]
        )
    if tables and kind == "SelectStmt" and all(_is_catalog(t) for t in tables):
        facts["catalog_only"] = True
    params = [int(n) for n in _PLACEHOLDER.findall(text)]
    return StatementInfo(
        fingerprint=fingerprint,
        normalized=text,
        command=command,
        tables=tables,
        param_count=max(params, default=0),
        **facts,
    )


_CATALOG_SCHEMAS = ("information_schema.", "pg_catalog.")


def _is_catalog(table: str) -> bool:
    """A relation of the system catalogs: schema-qualified, or an unqualified pg_* name
    (pg_class, pg_tables...), which the search path finds in pg_catalog first."""
    return table.startswith(_CATALOG_SCHEMAS) or ("." not in table and table.startswith("pg_"))


def _relation_name(rv: dict[str, Any]) -> str | None:
    name = rv.get("relname")
    if name is None:
        return None
    return f"{rv['schemaname']}.{name}" if "schemaname" in rv else str(name)


def _isolation_facts(kind: str, node: dict[str, Any]) -> dict[str, Any]:
    """The isolation level a statement sets, if it sets one."""
    if kind == "TransactionStmt":
        if node.get("kind") not in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
            return {}
        scope, options = "transaction", node.get("options") or []
    else:
        name = node.get("name")
        if name == "default_transaction_isolation":
            # normalized, the level is a `$n`: the level is then not known ("?")
            level = _constant_text((node.get("args") or [{}])[0]) or "?"
            scope = "transaction" if node.get("is_local") else "session"
            return {"isolation": level.lower(), "isolation_scope": scope}
        if name not in ("TRANSACTION", "SESSION CHARACTERISTICS"):
            return {}
        scope = "transaction" if name == "TRANSACTION" else "session"
        options = node.get("args") or []
    for option in options:
        element = option.get("DefElem", {})
        if element.get("defname") == "transaction_isolation":
            level = _constant_text(element.get("arg", {}))
            if level:
                return {"isolation": level.lower(), "isolation_scope": scope}
    return {}


def _constant_text(expr: dict[str, Any]) -> str:
    value = expr.get("A_Const", {}).get("sval", {}).get("sval")
    return value if isinstance(value, str) else ""


def _update_facts(node: dict[str, Any]) -> dict[str, Any]:
    columns, params, reads = [], [], False
    for target in node.get("targetList", []):
        res = target.get("ResTarget", {})
        value = res.get("val", {})
        columns.append(res.get("name", ""))
        params.append(_param_number(value) or 0)
        if any("ColumnRef" in n for n in _walk(value)):
            reads = True
    return {
        "set_columns": tuple(columns),
        "set_params": tuple(params),
        "set_reads_columns": reads,
    }


def _walk(node: Any):  # type: ignore[no-untyped-def]
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _tables(stmt: dict[str, Any]) -> tuple[str, ...]:
    ctes = {n["CommonTableExpr"]["ctename"] for n in _walk(stmt) if "CommonTableExpr" in n}
    seen: dict[str, None] = {}
    for n in _walk(stmt):
        rv = n.get("RangeVar") if "RangeVar" in n else (n if "relname" in n else None)
        if not isinstance(rv, dict) or "relname" not in rv:
            continue
        name = rv["relname"]
        if name in ctes and "schemaname" not in rv:
            continue
        full = f"{rv['schemaname']}.{name}" if "schemaname" in rv else name
        seen[full] = None
    return tuple(sorted(seen))


def _aliases(stmt: dict[str, Any]) -> dict[str, str]:
    """Alias -> table of every aliased relation in the statement."""
    found = {}
    for n in _walk(stmt):
        rv = n.get("RangeVar") if "RangeVar" in n else (n if "relname" in n else None)
        if isinstance(rv, dict) and "relname" in rv and "alias" in rv:
            name = rv["relname"]
            found[rv["alias"]["aliasname"]] = (
                f"{rv['schemaname']}.{name}" if "schemaname" in rv else name
            )
    return found


def _column_name(expr: dict[str, Any]) -> tuple[str | None, str] | None:
    ref = expr.get("ColumnRef")
    if ref is None:
        return None
    names = [f["String"]["sval"] for f in ref["fields"] if "String" in f]
    if not names:
        return None
    return (names[-2] if len(names) > 1 else None), names[-1]


def _param_number(expr: dict[str, Any]) -> int | None:
    if "TypeCast" in expr:
        expr = expr["TypeCast"]["arg"]
    ref = expr.get("ParamRef")
    return ref.get("number") if ref else None


def _conjuncts(where: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not where:
        return []
    boolean = where.get("BoolExpr")
    if boolean and boolean.get("boolop") == "AND_EXPR":
        return [c for arg in boolean["args"] for c in _conjuncts(arg)]
    return [where]


def _lookups(where: dict[str, Any] | None, tables: tuple[str, ...]) -> tuple[Lookup, ...]:
    found = []
    for conjunct in _conjuncts(where):
        expr = conjunct.get("A_Expr")
        if not expr or expr.get("kind") not in ("AEXPR_OP", "AEXPR_IN"):
            continue
        if [n["String"]["sval"] for n in expr.get("name", [])] != ["="]:
            continue
        left, right = expr.get("lexpr", {}), expr.get("rexpr", {})
        if expr["kind"] == "AEXPR_IN":
            # `col IN ($n)`, a one-element list: an equality as ORMs write it (TypeORM)
            items = right.get("List", {}).get("items", [])
            if len(items) != 1:
                continue
            right = items[0]
        column, number = _column_name(left), _param_number(right)
        if column is None or number is None:
            column, number = _column_name(right), _param_number(left)
        if column is None or number is None:
            continue
        qualifier, name = column
        table = tables[0] if len(tables) == 1 else None
        found.append(Lookup(name, number, table if qualifier is None or table else qualifier))
    return tuple(found)


_LIKE_KINDS = ("AEXPR_LIKE", "AEXPR_ILIKE")
_LIKE_OPERATORS = ("~~", "~~*", "!~~", "!~~*")


def _predicate_facts(stmt: dict[str, Any], tables: tuple[str, ...]) -> dict[str, Any]:
    """NOT IN subqueries and LIKE predicates anywhere in the statement: {} when it has none,
    so the StatementInfo keeps its defaults."""
    not_in = False
    likes: list[LikePredicate] = []
    for n in _walk(stmt):
        boolean = n.get("BoolExpr")
        if boolean is not None:
            args = boolean.get("args") or []
            if (
                boolean.get("boolop") == "NOT_EXPR"
                and len(args) == 1
                and args[0].get("SubLink", {}).get("subLinkType") == "ANY_SUBLINK"
            ):
                not_in = True
            continue
        expr = n.get("A_Expr")
        if expr is None:
            continue
        kind = expr.get("kind")
        if kind == "AEXPR_OP":
            names = expr.get("name") or [{}]
            if names[-1].get("String", {}).get("sval") not in _LIKE_OPERATORS:
                continue
        elif kind not in _LIKE_KINDS:
            continue
        likes.append(_like(expr, tables, stmt))
    facts: dict[str, Any] = {}
    if not_in:
        facts["not_in_subquery"] = True
    if likes:
        facts["likes"] = tuple(likes)
    return facts


def _like(expr: dict[str, Any], tables: tuple[str, ...], stmt: dict[str, Any]) -> LikePredicate:
    pattern = expr.get("rexpr", {})
    if "TypeCast" in pattern:
        pattern = pattern["TypeCast"]["arg"]
    number = _param_number(pattern) or 0
    constant = pattern.get("A_Const", {}).get("sval", {}).get("sval")
    leading = isinstance(constant, str) and constant[:1] in ("%", "_")
    column = _column_name(expr.get("lexpr", {}))
    if column is None:
        return LikePredicate(None, None, number, leading)
    qualifier, name = column
    if qualifier is None:
        table = tables[0] if len(tables) == 1 else None
    else:
        table = _aliases(stmt).get(qualifier) or (qualifier if qualifier in tables else None)
    return LikePredicate(name, table, number, leading)


def _is_batched(where: dict[str, Any] | None) -> bool:
    for conjunct in _conjuncts(where):
        expr = conjunct.get("A_Expr")
        if not expr:
            continue
        kind = expr.get("kind")
        if kind == "AEXPR_OP_ANY":
            return True
        if kind == "AEXPR_IN" and len(expr.get("rexpr", {}).get("List", {}).get("items", [])) > 1:
            return True
    return False


def _order_by(node: dict[str, Any]) -> tuple[str, ...]:
    columns = []
    for sort in node.get("sortClause", []):
        column = _column_name(sort.get("SortBy", {}).get("node", {}))
        if column is None:
            return ()  # an expression: no keyset to build on
        columns.append(column[1])
    return tuple(columns)


def _select_facts(node: dict[str, Any], tables: tuple[str, ...]) -> dict[str, Any]:
    where = node.get("whereClause")
    targets = node.get("targetList", [])
    star = any(
        "A_Star" in f
        for t in targets
        for f in t.get("ResTarget", {}).get("val", {}).get("ColumnRef", {}).get("fields", [])
    )
    from_clause = node.get("fromClause", [])
    aggregate_only = (
        bool(targets)
        and all("FuncCall" in t.get("ResTarget", {}).get("val", {}) for t in targets)
        and "groupClause" not in node
    )
    return {
        "lookups": _lookups(where, tables),
        "batched_lookup": _is_batched(where),
        "select_star": star,
        "has_limit": "limitCount" in node,
        "limit_param": _param_number(node.get("limitCount", {})) or 0,
        "order_by": _order_by(node),
        "has_where": where is not None,
        "for_update": "lockingClause" in node,
        "has_join": len(from_clause) > 1 or any("JoinExpr" in f for f in from_clause),
        "aggregate_only": aggregate_only,
        "modifies": _with_writes(node),
    }


def _with_writes(node: dict[str, Any]) -> bool:
    """A data-modifying WITH (only allowed at the top level): the SELECT writes too."""
    return any(
        kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
        for cte in node.get("withClause", {}).get("ctes", ())
        for kind in cte.get("CommonTableExpr", {}).get("ctequery", {})
    )


def _insert_facts(node: dict[str, Any]) -> dict[str, Any]:
    select = node.get("selectStmt", {}).get("SelectStmt", {})
    values = select.get("valuesLists")
    columns = tuple(c["ResTarget"]["name"] for c in node.get("cols", []) if "ResTarget" in c)
    params: tuple[int, ...] = ()
    if values and len(values) == 1:
        row = values[0].get("List", {}).get("items", [])
        params = tuple(_param_number(item) or 0 for item in row)
    return {
        "values_rows": len(values) if values else 0,
        "insert_columns": columns,
        "insert_params": params,
        "on_conflict": "onConflictClause" in node,
    }
