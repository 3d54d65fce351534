"""A `command` in a rule's match must be one pgwarden can see: `blocks: [{match: {command:
DELET}}]` would load and never fire. Rewrite, block and timeout rules are checked against
the command names the analyzer gives statements (proxy.analysis.analyzer.COMMANDS), and a
config naming another one is refused naming the key, with the close names it may have meant.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.analysis.analyzer import COMMANDS, Analyzer
from proxy.analysis.matching import SessionIdentity
from proxy.config import ConfigError, settings_from_dict
from proxy.rewriters.rules import Decision, RuleEngine
from proxy.timeouts import TimeoutPolicy
from tests.support.proxy import REPO_ROOT

WHO = SessionIdentity("app", "shop", "web")

# One statement of each kind a rule is likely to name, and some rarer ones: the analyzer's
# command for each must be a name the config accepts.
STATEMENTS = {
    "SELECT a FROM t WHERE b = 1": "SELECT",
    "SELECT 1 UNION SELECT 2": "SELECT",
    "WITH x AS (SELECT 1) SELECT * FROM x": "SELECT",
    "INSERT INTO t VALUES (1)": "INSERT",
    "UPDATE t SET a = 1": "UPDATE",
    "DELETE FROM t": "DELETE",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE": "MERGE",
    "COPY t FROM STDIN": "COPY",
    "CREATE TABLE t (a int)": "CREATE",
    "CREATE INDEX ON t (a)": "CREATE",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'": "CREATE",
    "CREATE DATABASE d": "CREATE",
    "ALTER TABLE t ADD COLUMN b int": "ALTER",
    "ALTER ROLE r LOGIN": "ALTER",
    "DROP TABLE t": "DROP",
    "DROP DATABASE d": "DROP",
    "TRUNCATE t": "TRUNCATE",
    "GRANT SELECT ON t TO r": "GRANT",
    "VACUUM t": "VACUUM",
    "EXPLAIN SELECT 1": "EXPLAIN",
    "SET search_path = x": "SET",
    "SHOW search_path": "SHOW",
    "BEGIN": "BEGIN",
    "START TRANSACTION": "BEGIN",
    "COMMIT": "COMMIT",
    "ROLLBACK": "ROLLBACK",
    "SAVEPOINT s": "SAVEPOINT",
    "RELEASE s": "RELEASE",
    "PREPARE TRANSACTION 'x'": "PREPARE TRANSACTION",
    "COMMIT PREPARED 'x'": "COMMIT PREPARED",
    "LOCK t": "LOCK",
    "LISTEN c": "LISTEN",
    "NOTIFY c": "NOTIFY",
    "DO $$ BEGIN END $$": "DO",
    "CALL p()": "CALL",
    "CHECKPOINT": "CHECKPOINT",
    "REINDEX TABLE t": "REINDEX",
    "DISCARD ALL": "DISCARD",
    "CLUSTER t": "CLUSTER",
    "": "EMPTY",
}


@pytest.mark.parametrize(("sql", "command"), STATEMENTS.items(), ids=list(STATEMENTS))
def test_every_command_the_analyzer_gives_is_one_the_config_accepts(sql: str, command: str) -> None:
    infos = [parsed.info for parsed in Analyzer().analyze(sql)]
    assert [info.command for info in infos] == [command]
    assert command in COMMANDS
    settings_from_dict({"blocks": [{"name": "b", "match": {"command": command}}]})
    settings_from_dict(
        {"timeouts": {"rules": [{"name": "t", "match": {"command": command}, "statement": "1s"}]}}
    )


def test_the_commands_hold_the_usual_ones_and_no_node_names() -> None:
    usual = {"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "CREATE", "ALTER", "DROP"}
    assert usual <= COMMANDS
    assert not {"RAW", "SETOPERATION", "RETURN", "PLASSIGN", "TRANSACTION"} & COMMANDS
    assert all(name == name.upper() and not name.endswith("STMT") for name in COMMANDS)


def config_error(config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(config)
    return str(caught.value)


def timeout_rule(command: str) -> dict[str, Any]:
    return {
        "timeouts": {"rules": [{"name": "t", "match": {"command": command}, "statement": "1s"}]}
    }


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(
            {"blocks": [{"name": "b", "match": {"command": "DELET"}}]},
            "blocks[0].match.command: unknown command 'DELET' (did you mean DELETE?)",
            id="block",
        ),
        pytest.param(
            {
                "blocks": [{"name": "b", "match": {"command": "DROP"}}],
                "rewrites": [
                    {
                        "name": "r",
                        "match": {"fingerprint": "ab", "command": "UPDTE"},
                        "replace": "SELECT 1",
                    }
                ],
            },
            "rewrites[0].match.command: unknown command 'UPDTE' (did you mean UPDATE?)",
            id="rewrite",
        ),
        pytest.param(
            timeout_rule("SELEC"),
            "timeouts.rules[0].match.command: unknown command 'SELEC' (did you mean SELECT?)",
            id="timeout",
        ),
        pytest.param(
            {"blocks": [{"name": "b", "match": {"command": "delet"}}]},
            "blocks[0].match.command: unknown command 'delet' (did you mean DELETE?)",
            id="lower-case-typo",
        ),
    ],
)
def test_an_unknown_command_is_refused_with_the_close_names(
    config: dict[str, Any], expected: str
) -> None:
    assert config_error(config) == expected


def test_an_unknown_command_with_no_close_name_lists_them_all() -> None:
    error = config_error({"blocks": [{"name": "b", "match": {"command": "FROBNICATE"}}]})
    assert error.startswith("blocks[0].match.command: unknown command 'FROBNICATE' (expected one")
    for command in COMMANDS:
        assert command in error


def test_a_command_in_lower_case_is_accepted_and_matches() -> None:
    """Matching has always ignored case; timeout rules now accept it as blocks do."""
    blocks = settings_from_dict({"blocks": [{"name": "b", "match": {"command": "delete"}}]}).blocks
    (delete,) = Analyzer().analyze("DELETE FROM t")
    assert RuleEngine((), blocks).decide(delete.info, WHO) == Decision("block", "b", True)
    policy = TimeoutPolicy(settings_from_dict(timeout_rule("delete")).timeouts)
    statement, _ = policy.limits(delete.info, WHO)
    assert statement is not None and statement.rule == "t"


def test_check_config_exits_2_naming_the_key_and_the_command_meant(tmp_path: Path) -> None:
    path = tmp_path / "pgwarden.yaml"
    path.write_text(yaml.safe_dump({"blocks": [{"name": "b", "match": {"command": "DELET"}}]}))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr == (
        "pgwarden: config error: blocks[0].match.command: unknown command 'DELET' "
        "(did you mean DELETE?)\n"
    )
