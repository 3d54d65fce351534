"""Rewrite and block rules without a network: validation at load (check_rules and the config
loader), which rule applies (RuleEngine.decide), how literals are carried into a
replacement (fill_literals, rewrite_statements), and the stream editor that hands whole
Query and Parse messages to the rules (MessageEditor).

Messages are built by hand here, not with pgwarden's codec, so a codec bug cannot hide
itself.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from pglast import parse_sql
from pglast.stream import RawStream

from proxy.analysis.analyzer import Analyzer, StatementInfo
from proxy.analysis.matching import SessionIdentity
from proxy.config import BlockRule, ConfigError, RewriteRule, RuleMatch, settings_from_dict
from proxy.protocol.editor import MessageEditor
from proxy.rewriters.rules import (
    Decision,
    RuleEngine,
    check_rules,
    fill_literals,
    rewrite_statements,
)

ALICE = SessionIdentity("alice", "shop", "web")
BOB = SessionIdentity("bob", "analytics", "reporter")

_ANALYZER = Analyzer()


# ----------------------------------------------------------------------------- helpers


def info(sql: str) -> StatementInfo:
    """The analysis of a one-statement text, as the session hands it to the engine."""
    (parsed,) = _ANALYZER.analyze(sql)
    return parsed.info


def rules(**config: Any) -> tuple[tuple[RewriteRule, ...], tuple[BlockRule, ...]]:
    """`rewrites:` and `blocks:` through the real loader, as a config file would give them."""
    settings = settings_from_dict(config)
    return settings.rewrites, settings.blocks


def engine(**config: Any) -> RuleEngine:
    return RuleEngine(*rules(**config))


def config_error(**config: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(config)
    return str(caught.value)


def same_sql(a: str, b: str) -> bool:
    """Whether two statements parse to the same tree (so spelling differences don't count)."""
    return RawStream()(parse_sql(a)) == RawStream()(parse_sql(b))


# ------------------------------------------------------------------ check_rules / loader

GOOD = {
    "rewrites": [
        {
            "name": "limit-orders",
            "match": {"statement": "SELECT * FROM orders WHERE customer_id = $1"},
            "replace": "SELECT * FROM orders WHERE customer_id = $1 LIMIT 100",
        },
        {
            "name": "by-fingerprint",
            "match": {"fingerprint": "0123456789abcdef", "user": "app"},
            "replace": "SELECT 1",
            "mode": "log",
        },
    ],
    "blocks": [
        {"name": "no-delete-all", "match": {"command": "DELETE", "without_where": True}},
        {"name": "no-drop", "match": {"command": "DROP"}, "mode": "log"},
    ],
}


def test_valid_rules_load() -> None:
    rewrites, blocks = rules(**GOOD)
    assert [r.name for r in rewrites] == ["limit-orders", "by-fingerprint"]
    assert rewrites[1].mode == "log" and rewrites[0].mode == "enforce"
    assert blocks[0].match == RuleMatch(command="DELETE", without_where=True)
    check_rules(rewrites, blocks)  # no exception


def rewrite(match: dict[str, Any], replace: str, name: str = "r") -> dict[str, Any]:
    return {"rewrites": [{"name": name, "match": match, "replace": replace}]}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(
            rewrite({"statement": "SELECT * FROM t WHERE id = $1"}, "SELEC * FROM t"),
            "rewrites[0].replace: not valid SQL",
            id="replace-not-sql",
        ),
        pytest.param(
            rewrite(
                {"statement": "SELECT * FROM t WHERE id = $1"}, "SELECT * FROM t WHERE id = $2"
            ),
            "rewrites[0].replace: must use the same parameters",
            id="replace-other-parameter",
        ),
        pytest.param(
            # the literal 10 is $2 once the statement is normalized: it must be kept
            rewrite({"statement": "SELECT * FROM t WHERE id = $1 LIMIT 10"}, "SELECT 1 WHERE $1"),
            "rewrites[0].replace: must use the same parameters",
            id="replace-drops-a-literal",
        ),
        pytest.param(
            rewrite({"statement": "SELECT * FROM t WHERE id = $1"}, "SELECT $1; SELECT 2"),
            "rewrites[0].replace: must be exactly one statement",
            id="two-statements",
        ),
        pytest.param(
            rewrite({"statement": "SELECT * FROM t WHERE id = $1"}, ""),
            "rewrites[0].replace: required",
            id="replace-missing",
        ),
        pytest.param(
            rewrite({"command": "SELECT"}, "SELECT 1"),
            "rewrites[0].match: a rewrite matches by fingerprint or statement",
            id="rewrite-without-statement",
        ),
        pytest.param(
            rewrite({"statement": "SELEC 1"}, "SELECT 1"),
            "rewrites[0].match.statement: not valid SQL",
            id="statement-not-sql",
        ),
        pytest.param(
            {"blocks": [{"name": "b", "match": {"user": "app", "database": "shop"}}]},
            "blocks[0].match: a block needs something to match on",
            id="block-matching-nothing",
        ),
        pytest.param(
            {"blocks": [{"name": "b"}]},
            "blocks[0].match: a block needs something to match on",
            id="block-without-match",
        ),
        pytest.param(
            {"blocks": [{"name": "", "match": {"command": "DROP"}}]},
            "blocks[0].name: must not be empty",
            id="empty-name",
        ),
        pytest.param(
            {
                "rewrites": [{"name": "x", "match": {"fingerprint": "ab"}, "replace": "SELECT 1"}],
                "blocks": [
                    {"name": "y", "match": {"command": "DROP"}},
                    {"name": "x", "match": {"command": "TRUNCATE"}},
                ],
            },
            "blocks[1].name: duplicate rule name 'x'",
            id="duplicate-name-across-sections",
        ),
        pytest.param(
            {"blocks": [{"name": "b", "match": {"command": "DROP", "verb": "x"}}]},
            "blocks[0].match.verb: unknown key",
            id="unknown-match-key",
        ),
        pytest.param(
            {"rewrites": [{"name": "r", "match": {"fingerprint": "ab"}, "replce": "SELECT 1"}]},
            "rewrites[0].replce: unknown key",
            id="unknown-rule-key",
        ),
        pytest.param(
            {"blocks": [{"name": "b", "match": {"command": "DROP"}, "mode": "dry-run"}]},
            "blocks[0].mode: expected one of enforce, log, got 'dry-run'",
            id="bad-mode",
        ),
        pytest.param(
            {"blocks": [{"match": {"command": "DROP"}}]},
            "blocks[0].name: required",
            id="name-missing",
        ),
        pytest.param(
            {"blocks": [{"name": "b", "match": {"without_where": "yes"}}]},
            "blocks[0].match.without_where: expected true or false",
            id="bad-bool",
        ),
    ],
)
def test_bad_rules_are_refused_naming_the_key(config: dict[str, Any], expected: str) -> None:
    assert config_error(**config).startswith(expected)


def test_replacement_may_reorder_and_repeat_parameters() -> None:
    check_rules(
        *rules(
            **rewrite(
                {"statement": "SELECT a FROM t WHERE b = $1 AND c = 'x'"},
                "SELECT a FROM t WHERE c = $2 AND b = $1 AND $1 IS NOT NULL",
            )
        )
    )


# -------------------------------------------------------------------------- decide


def test_block_wins_over_a_rewrite_of_the_same_statement() -> None:
    rules_ = engine(
        rewrites=[{"name": "rw", "match": {"statement": "DELETE FROM t"}, "replace": "SELECT 1"}],
        blocks=[{"name": "blk", "match": {"command": "DELETE", "without_where": True}}],
    )
    assert rules_.decide(info("DELETE FROM t"), ALICE) == Decision("block", "blk", True)


def test_first_matching_rewrite_wins() -> None:
    rules_ = engine(
        rewrites=[
            {"name": "other", "match": {"statement": "SELECT 1 FROM u"}, "replace": "SELECT $1"},
            {"name": "first", "match": {"statement": "SELECT 1 FROM t"}, "replace": "SELECT $1"},
            {"name": "second", "match": {"statement": "SELECT 7 FROM t"}, "replace": "SELECT -$1"},
        ]
    )
    decision = rules_.decide(info("SELECT 5 FROM t"), ALICE)
    assert decision == Decision("rewrite", "first", True, "SELECT $1")


def test_statement_matches_whatever_the_values_and_spelling() -> None:
    rules_ = engine(
        rewrites=[
            {
                "name": "r",
                "match": {"statement": "SELECT name FROM users WHERE lower(email) = $1"},
                "replace": "SELECT name FROM users WHERE email = $1",
            }
        ]
    )
    for sql in (
        "SELECT name FROM users WHERE lower(email) = 'a@b.c'",
        "select  name\n from USERS where LOWER(email)=$1",
        "/* app */ SELECT name FROM users WHERE lower(email) = E'x\\'y'",
    ):
        assert rules_.decide(info(sql), ALICE) is not None, sql
    for sql in (
        "SELECT name FROM users WHERE email = 'a@b.c'",
        "SELECT name, id FROM users WHERE lower(email) = $1",
        "SELECT name FROM users WHERE lower(email) = $1 LIMIT 1",
        "SELECT name FROM public.users WHERE lower(email) = $1",  # as written, schema too
    ):
        assert rules_.decide(info(sql), ALICE) is None, sql


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name, id FROM users WHERE email = $1 AND active = $2",  # columns swapped
        "SELECT id AS user_id, name FROM users WHERE email = $1 AND active = $2",  # alias
        "SELECT id, name FROM users WHERE active = $1 AND email = $2",  # parameters swapped
        "SELECT id, name FROM users WHERE email = $1::int AND active = $2",  # another type
    ],
)
def test_statement_match_is_not_looser_than_the_statement(sql: str) -> None:
    """Fingerprints ignore column order, aliases and casts; a `statement` rule must not:
    its replacement's columns and parameters are those of the statement as written."""
    statement = "SELECT id, name FROM users WHERE email = $1 AND active = $2"
    rules_ = engine(
        rewrites=[
            {
                "name": "r",
                "match": {"statement": statement},
                "replace": "SELECT id, name FROM users WHERE email = $1 AND active = $2 LIMIT 1",
            }
        ]
    )
    assert rules_.decide(info(statement), ALICE) is not None
    assert rules_.decide(info(sql), ALICE) is None


def test_statement_match_in_a_query_of_several_statements() -> None:
    """There the literals of a later statement are numbered after the earlier ones'."""
    rules_ = engine(
        rewrites=[
            {
                "name": "r",
                "match": {"statement": "SELECT $1 AS a, $2 AS b"},
                "replace": "SELECT $2, $1",
            }
        ]
    )
    first, second = (p.info for p in _ANALYZER.analyze("SELECT 1 AS z; SELECT 'x' AS a, 2 AS b"))
    assert second.normalized == "SELECT $2 AS a, $3 AS b"
    assert rules_.decide(first, ALICE) is None
    assert rules_.decide(second, ALICE) is not None


def test_fingerprint_match() -> None:
    target = info("SELECT * FROM t WHERE id = 1")
    rules_ = engine(
        rewrites=[
            {"name": "r", "match": {"fingerprint": target.fingerprint}, "replace": "SELECT 1"}
        ]
    )
    assert rules_.decide(info("SELECT * FROM t WHERE id = 99"), ALICE) is not None
    assert rules_.decide(info("SELECT * FROM t WHERE ID = $1"), ALICE) is not None
    assert rules_.decide(info("SELECT * FROM t WHERE name = 'x'"), ALICE) is None


@pytest.mark.parametrize(
    ("sql", "blocked"),
    [
        ("DELETE FROM t", True),
        ("delete from public.t", True),
        ("WITH x AS (SELECT 1) DELETE FROM t", True),
        ("DELETE FROM t WHERE id = 1", False),
        ("DELETE FROM t WHERE true", False),
        ("UPDATE t SET a = 1", False),  # the rule names DELETE
        ("SELECT * FROM t", False),
        ("TRUNCATE t", False),
    ],
)
def test_delete_without_where(sql: str, blocked: bool) -> None:
    rules_ = engine(blocks=[{"name": "b", "match": {"command": "DELETE", "without_where": True}}])
    assert (rules_.decide(info(sql), ALICE) is not None) is blocked


def test_without_where_alone_covers_update_and_delete() -> None:
    rules_ = engine(blocks=[{"name": "b", "match": {"without_where": True}}])
    assert rules_.decide(info("UPDATE t SET a = 1"), ALICE) is not None
    assert rules_.decide(info("DELETE FROM t"), ALICE) is not None
    assert rules_.decide(info("UPDATE t SET a = 1 WHERE id = 2"), ALICE) is None
    assert rules_.decide(info("SELECT * FROM t"), ALICE) is None


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("DROP TABLE t", "no-drop"),
        ("DROP INDEX IF EXISTS i", "no-drop"),
        ("TRUNCATE t", "no-truncate"),
        ("truncate table a, b cascade", "no-truncate"),
        ("SELECT * FROM payroll p JOIN x ON true", "payroll"),
        ("UPDATE hr.payroll SET a = 1 WHERE id = 1", "payroll"),
        ("SELECT * FROM payroll_archive", None),
        ("CREATE TABLE t (a int)", None),
        ("SELECT 1", None),
    ],
)
def test_block_by_command_and_table(sql: str, rule: str | None) -> None:
    rules_ = engine(
        blocks=[
            {"name": "no-drop", "match": {"command": "DROP"}},
            {"name": "no-truncate", "match": {"command": "truncate"}},
            {"name": "payroll", "match": {"tables": ["payroll"]}},
        ]
    )
    decision = rules_.decide(info(sql), ALICE)
    assert (decision.rule if decision else None) == rule


def test_identity_narrows_a_rule() -> None:
    rules_ = engine(
        blocks=[
            {"name": "alice-web", "match": {"command": "DROP", "user": "alice"}},
            {"name": "reporter", "match": {"command": "DROP", "application_name": "reporter"}},
            {"name": "analytics", "match": {"command": "TRUNCATE", "database": "analytics"}},
        ]
    )
    drop, truncate = info("DROP TABLE t"), info("TRUNCATE t")
    assert rules_.decide(drop, ALICE) == Decision("block", "alice-web", True)
    assert rules_.decide(drop, BOB) == Decision("block", "reporter", True)
    assert rules_.decide(drop, SessionIdentity("carol", "shop", "web")) is None
    assert rules_.decide(truncate, ALICE) is None
    assert rules_.decide(truncate, BOB) == Decision("block", "analytics", True)


def test_log_mode_decides_without_enforcing() -> None:
    rules_ = engine(
        rewrites=[
            {
                "name": "rw",
                "match": {"statement": "SELECT 1"},
                "replace": "SELECT $1",
                "mode": "log",
            }
        ],
        blocks=[{"name": "blk", "match": {"command": "DROP"}, "mode": "log"}],
    )
    assert rules_.decide(info("SELECT 1"), ALICE) == Decision("rewrite", "rw", False, "SELECT $1")
    assert rules_.decide(info("DROP TABLE t"), ALICE) == Decision("block", "blk", False)


def test_unparsable_statements_are_never_matched() -> None:
    rules_ = engine(blocks=[{"name": "b", "match": {"command": "DELETE"}}])
    broken = info("DELETE FROM t WHERE (")
    assert broken.error is not None and broken.command == "DELETE"
    assert rules_.decide(broken, ALICE) is None


def test_decisions_are_cached_per_shape_and_identity() -> None:
    rules_ = engine(blocks=[{"name": "b", "match": {"command": "DROP", "user": "alice"}}])
    first = rules_.decide(info("DROP TABLE t"), ALICE)
    assert first is not None
    assert rules_.decide(info("DROP TABLE t"), ALICE) is first  # from the cache
    assert rules_.decide(info("DROP TABLE t"), BOB) is None  # another identity: decided anew
    assert rules_.decide(info("DROP TABLE t"), ALICE) is first
    assert len(rules_._cache) == 2
    rules_.decide(info("SELECT * FROM t WHERE id = 1"), ALICE)
    rules_.decide(info("SELECT * FROM t WHERE id = 2"), ALICE)  # other values, same entry
    assert len(rules_._cache) == 3


def test_decision_cache_is_bounded() -> None:
    rules_ = engine(blocks=[{"name": "b", "match": {"command": "DROP"}}])
    for n in range(5000):
        rules_.decide(info(f"SELECT c{n} FROM t"), ALICE)
    assert len(rules_._cache) <= 4096


def test_first_use_once_per_rule_and_shape() -> None:
    rules_ = engine(blocks=[{"name": "b", "match": {"command": "DROP"}}])
    assert rules_.first_use("b", "f1")
    assert not rules_.first_use("b", "f1")
    assert rules_.first_use("b", "f2")
    assert rules_.first_use("c", "f1")


def test_no_rules_is_inactive() -> None:
    assert not RuleEngine((), ()).active
    assert engine(blocks=[{"name": "b", "match": {"command": "DROP"}}]).active


# ------------------------------------------------------------------- fill_literals


@pytest.mark.parametrize(
    ("original", "replacement", "expected"),
    [
        pytest.param(
            "SELECT * FROM t WHERE name = 'it''s' LIMIT 5",
            "SELECT id FROM t WHERE name = $1 LIMIT $2",
            "SELECT id FROM t WHERE name = 'it''s' LIMIT 5",
            id="quote",
        ),
        pytest.param(
            r"SELECT * FROM t WHERE name = E'back\\slash \'q\' \n'",
            "SELECT $1",
            "SELECT E'back\\\\slash ''q'' \\n'",
            id="escape-string",
        ),
        pytest.param(
            r"SELECT * FROM t WHERE name = 'C:\dir\new'",
            "SELECT $1",
            r"SELECT 'C:\dir\new'",
            id="backslash-standard-string",
        ),
        pytest.param(
            "SELECT * FROM t WHERE a = $$it's $1 \\ ok$$ AND b = $q$x$$y$q$",
            "SELECT $2, $1",
            "SELECT 'x$$y', 'it''s $1 \\ ok'",
            id="dollar-quoted",
        ),
        pytest.param(
            "SELECT * FROM t WHERE a = -5 AND b = - 2.5e3 AND c = -0.5",
            "SELECT x - $1, $2, $3 FROM t",
            "SELECT x - -5, -2.5e3, -0.5 FROM t",
            id="negative-numbers",
        ),
        pytest.param(
            "SELECT * FROM t WHERE a = NULL AND b = true",
            "SELECT $2 AND $1 IS NULL",
            "SELECT true AND NULL IS NULL",
            id="null-and-bool",
        ),
        pytest.param(
            "SELECT * FROM t WHERE name = 'héllo ☃ 日本' AND tag = U&'d\\0061t'",
            "SELECT $1, $2",
            "SELECT 'héllo ☃ 日本', 'dat'",
            id="unicode",
        ),
        pytest.param(
            "SELECT * FROM t WHERE a = $1 AND b = 'x'",
            "SELECT a FROM t WHERE b = $2 AND a = $1",
            "SELECT a FROM t WHERE b = 'x' AND a = $1",
            id="client-parameter-kept",
        ),
        pytest.param(
            # normalized: `SELECT $2, $1` (literals numbered after the client's parameters)
            "SELECT 5 AS a, $1 AS b",
            "SELECT $2 + 1 AS a, $1 AS b",
            "SELECT 5 + 1 AS a, $1 AS b",
            id="literal-before-client-parameter",
        ),
        pytest.param(
            "SELECT $2 AS a, 'lit' AS b, $1 AS c",
            "SELECT $3 AS b, $1 AS c, $2 AS a",
            "SELECT 'lit' AS b, $1 AS c, $2 AS a",
            id="client-parameters-out-of-order",
        ),
        pytest.param(
            "SELECT * FROM ev WHERE date_trunc('day', at) = '2024-01-02'",
            "SELECT * FROM ev WHERE at >= $2::date AND at < $2::date + 1 AND $1 = 'day'",
            "SELECT * FROM ev WHERE at >= CAST('2024-01-02' AS date) "
            "AND at < CAST('2024-01-02' AS date) + 1 AND 'day' = 'day'",
            id="repeated-parameter",
        ),
        pytest.param("SELECT 1", "SELECT 2", "SELECT 2", id="no-parameters"),
        pytest.param(
            "SELECT 5 AS n",
            "SELECT $1 AS n, '$9 off' AS note",
            "SELECT 5 AS n, '$9 off' AS note",
            id="dollar-digit-inside-a-string",
        ),
    ],
)
def test_fill_literals(original: str, replacement: str, expected: str) -> None:
    filled = fill_literals(original, replacement)
    assert filled is not None
    assert same_sql(filled, expected), filled


def test_filled_literals_keep_their_values() -> None:
    """Whatever the spelling, the constant in the result is the one the client sent."""
    values = ["it's", "back\\slash", "tab\there", "☃ 日本", "$$", "'; DROP TABLE t; --", ""]
    for value in values:
        quoted = "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        filled = fill_literals(f"SELECT {quoted} AS v", "SELECT $1 AS w")
        assert filled is not None
        (statement,) = parse_sql(filled)
        assert len(statement.stmt.targetList) == 1, filled
        assert statement.stmt.targetList[0].val.val.sval == value


def test_fill_literals_refuses_what_it_cannot_carry() -> None:
    assert fill_literals("SELECT 1", "SELECT $1, $2") is None  # no second literal
    assert fill_literals("SELEC 1", "SELECT $1") is None  # not SQL


# -------------------------------------------------------------- rewrite_statements


def test_only_the_matching_statement_of_a_query_is_replaced() -> None:
    sql = "SELECT 1 AS a; SELECT id FROM t WHERE name = 'x;y' ; /* c */ SELECT 'é' AS e"
    assert rewrite_statements(sql, [(1, "SELECT id, $1 AS n FROM t WHERE name = $1")]) == (
        "SELECT 1 AS a; SELECT id, 'x;y' AS n FROM t WHERE name = 'x;y'; /* c */ SELECT 'é' AS e"
    )
    assert rewrite_statements(sql, [(2, "SELECT $1 AS e2"), (0, "SELECT $1 + 1 AS a")]) == (
        "SELECT 1 + 1 AS a; SELECT id FROM t WHERE name = 'x;y' ; /* c */ SELECT 'é' AS e2"
    )
    assert rewrite_statements(sql, [(3, "SELECT 1")]) is None


def test_rewrite_single_statement() -> None:
    assert rewrite_statements("SELECT 7 -- note", [(0, "SELECT $1 + 1")]) == "SELECT 7 + 1"
    assert rewrite_statements("SELECT * FROM t WHERE id = $1", [(0, "SELECT $1")]) == "SELECT $1"


# ------------------------------------------------------------------- MessageEditor


def message(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", 4 + len(body)) + body


def edit(raw: bytes) -> bytes:
    """A Query or Parse made longer, so a bad length or offset shows."""
    body = raw[5:]
    return message(raw[:1], b"/* edited */ " + body)


STREAM = [
    message(b"Q", b"SELECT 1\0"),
    message(b"P", b"\0SELECT $1\0\0\0"),
    message(b"B", b"\0\0\0\0\0\0\0\0\0"),
    message(b"D", b"P\0"),
    message(b"E", b"\0\0\0\0\0"),
    message(b"S", b""),
    message(b"d", b"x" * 300),  # CopyData, larger than any other here
    message(b"Q", "SELECT 'é'\0".encode()),
    message(b"H", b""),
    message(b"X", b""),
]


def chunks(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, min(40, len(data) - 1))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_message_editor_any_chunking() -> None:
    data = b"".join(STREAM)
    expected = b"".join(edit(m) if m[:1] in b"QP" else m for m in STREAM)
    rng = random.Random(20240611)
    for _ in range(500):
        editor = MessageEditor(b"QP", edit)
        out = b"".join(editor.feed(chunk) for chunk in chunks(data, rng))
        assert out == expected
        assert editor.at_boundary
    one_byte = MessageEditor(b"QP", edit)
    assert b"".join(one_byte.feed(data[i : i + 1]) for i in range(len(data))) == expected


def test_message_editor_passes_other_messages_as_they_come() -> None:
    editor = MessageEditor(b"QP", edit)
    copy_data = message(b"d", b"y" * 100)
    assert editor.feed(copy_data[:7]) == copy_data[:7]  # not held back
    assert editor.feed(copy_data[7:]) == copy_data[7:]
    assert editor.feed(STREAM[0][:6]) == b""  # a Query is held until complete
    assert not editor.at_boundary
    assert editor.feed(STREAM[0][6:]) == edit(STREAM[0])


def test_message_editor_leaves_a_message_too_large_to_hold() -> None:
    big = message(b"Q", b"SELECT '" + b"z" * 5000 + b"'\0")
    small = message(b"Q", b"SELECT 2\0")
    editor = MessageEditor(b"QP", edit, max_held=1000)
    data = big + small
    out = b"".join(editor.feed(data[i : i + 333]) for i in range(0, len(data), 333))
    assert out == big + edit(small)


def test_message_editor_started_mid_message() -> None:
    """A message whose start already went out unedited passes on whole, the next is edited."""
    query = STREAM[0]
    for split in range(1, len(query)):
        header_sent = query[:split] if split < 5 else b""
        passing = len(query) - split if split >= 5 else 0
        editor = MessageEditor(b"QP", edit, header_sent=header_sent, passing=passing)
        rest = query[split:] + STREAM[1]
        out = b"".join(editor.feed(rest[i : i + 3]) for i in range(0, len(rest), 3))
        assert out == query[split:] + edit(STREAM[1]), split
