"""Rewrite and block rules: which statement to replace or refuse, and the text to send.

Decisions are pure and cached per statement shape and identity. A rewrite keeps the
original's parameter numbers; literals of a simple-protocol statement are carried into
the replacement by putting their parsed nodes in place of its `$n` and deparsing, so
quoting is pglast's, never string pasting. A block replaces the statement with a marker
PostgreSQL cannot parse: the server then fails it exactly as it fails any statement
(the rest of the Query, or everything until Sync, discarded; the transaction marked
failed), and pgwarden rewrites that syntax error into its own 42501 error.
"""

from __future__ import annotations

import difflib
import re
import secrets
from dataclasses import dataclass, field

from pglast import ast, parse_sql, parser
from pglast.stream import RawStream
from pglast.visitors import Visitor

from proxy.analysis.analyzer import COMMANDS, StatementInfo, extract_literals, split_statements
from proxy.analysis.matching import SessionIdentity, statement_matches

__all__ = [
    "BLOCK_MARKER",
    "BlockRule",
    "Decision",
    "RewriteRule",
    "RuleEngine",
    "RuleMatch",
    "check_command",
    "check_rules",
    "fill_literals",
    "rewrite_statements",
]

_PARAM = re.compile(r"\$(\d+)")
_CACHE_SIZE = 4096
# SQL PostgreSQL refuses with a syntax error whose message names this token; one for the
# process, so a block sent before a reload is still recognised when its error comes back
BLOCK_MARKER = f"pgwarden_blocked_{secrets.token_hex(6)}"


# The `rewrites:` and `blocks:` entries of the config: proxy.config loads them against these
# fields (metadata as in its own sections) and checks them with check_rules at load.
_MODE = {"choices": ("enforce", "log")}


@dataclass(frozen=True)
class RuleMatch:
    """What a rewrite or block rule applies to; every given field must match."""

    fingerprint: str | None = None
    statement: str | None = None  # normalized SQL, compared after normalizing both sides
    command: str | None = None
    without_where: bool | None = None  # UPDATE or DELETE with no WHERE clause
    tables: tuple[str, ...] | None = None
    user: str | None = None
    database: str | None = None
    application_name: str | None = None


@dataclass(frozen=True)
class RewriteRule:
    name: str
    match: RuleMatch = RuleMatch()
    replace: str = ""
    mode: str = field(default="enforce", metadata=_MODE)


@dataclass(frozen=True)
class BlockRule:
    name: str
    match: RuleMatch = RuleMatch()
    mode: str = field(default="enforce", metadata=_MODE)


@dataclass(frozen=True, slots=True)
class Decision:
    kind: str  # "rewrite" or "block"
    rule: str
    enforce: bool
    replace: str = ""


_PARAM_REF = re.compile(r'"ParamRef":\{"number":(\d+)')


def _params(sql: str) -> set[int]:
    """The `$n` parameters a statement refers to, from its parse tree."""
    return {int(n) for n in _PARAM_REF.findall(parser.parse_sql_json(sql))}


def check_command(key: str, command: str) -> None:
    """Raises ValueError naming `key` when `command` is no name pgwarden gives a statement
    (proxy.analysis.analyzer.COMMANDS): such a rule would never match. Case does not
    matter, as in matching."""
    if command.upper() in COMMANDS:
        return
    # 0.75: one letter off a word of five or more; the default 0.6 offers SELECT for DELET
    close = difflib.get_close_matches(command.upper(), sorted(COMMANDS), n=3, cutoff=0.75)
    if close:
        known = f"did you mean {' or '.join(close)}?"
    else:
        known = f"expected one of {', '.join(sorted(COMMANDS))}"
    raise ValueError(f"{key}: unknown command {command!r} ({known})")


def check_rules(rewrites: tuple[RewriteRule, ...], blocks: tuple[BlockRule, ...]) -> None:
    """Raises ValueError naming the rule when one cannot work as written (names are
    checked with every other kind of rule, in proxy.config)."""
    sections: tuple[tuple[str, tuple[RewriteRule | BlockRule, ...]], ...] = (
        ("rewrites", rewrites),
        ("blocks", blocks),
    )
    for section, rules in sections:
        for index, rule in enumerate(rules):
            key = f"{section}[{index}]"
            match = rule.match
            if match.command is not None:
                check_command(f"{key}.match.command", match.command)
            if match.statement is not None:
                try:
                    parser.normalize(match.statement)
                    parse_sql(match.statement)
                except parser.ParseError as exc:
                    raise ValueError(f"{key}.match.statement: not valid SQL: {exc}") from None
            if section == "rewrites":
                _check_rewrite(key, rule)  # type: ignore[arg-type]
            elif not any(
                getattr(match, f) is not None
                for f in ("fingerprint", "statement", "command", "without_where", "tables")
            ):
                raise ValueError(f"{key}.match: a block needs something to match on")


def _check_rewrite(key: str, rule: RewriteRule) -> None:
    match = rule.match
    if match.fingerprint is None and match.statement is None:
        raise ValueError(f"{key}.match: a rewrite matches by fingerprint or statement")
    if not rule.replace:
        raise ValueError(f"{key}.replace: required")
    try:
        statements = parse_sql(rule.replace)
    except parser.ParseError as exc:
        raise ValueError(f"{key}.replace: not valid SQL: {exc}") from None
    if len(statements) != 1:
        raise ValueError(f"{key}.replace: must be exactly one statement")
    if match.statement is not None:
        # The statement is matched in normalized form, where its literals are $n too.
        expected = _params(parser.normalize(match.statement))
        if _params(rule.replace) != expected:
            raise ValueError(
                f"{key}.replace: must use the same parameters as the statement it replaces "
                f"({sorted(expected)} vs {sorted(_params(rule.replace))})"
            )


class RuleEngine:
    def __init__(self, rewrites: tuple[RewriteRule, ...], blocks: tuple[BlockRule, ...]) -> None:
        self.rewrites = rewrites
        self.blocks = blocks
        self._cache: dict[tuple[str, SessionIdentity], Decision | None] = {}
        self._used: set[tuple[str, str]] = set()
        self.marker_token = BLOCK_MARKER

    @property
    def active(self) -> bool:
        return bool(self.rewrites or self.blocks)

    def decide(self, info: StatementInfo, identity: SessionIdentity) -> Decision | None:
        """The first block, else the first rewrite, that applies; None for most statements."""
        if info.error is not None:
            return None
        key = (info.normalized, identity)  # finer than the fingerprint: see statement_matches
        if key in self._cache:
            return self._cache[key]
        decision = None
        for block in self.blocks:
            if statement_matches(block.match, info, identity):
                decision = Decision("block", block.name, block.mode == "enforce")
                break
        else:
            for rewrite in self.rewrites:
                if statement_matches(rewrite.match, info, identity):
                    enforce = rewrite.mode == "enforce"
                    decision = Decision("rewrite", rewrite.name, enforce, rewrite.replace)
                    break
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def first_use(self, rule: str, fingerprint: str) -> bool:
        """True the first time `rule` applies to a statement shape (bounded memory)."""
        key = (rule, fingerprint)
        if key in self._used or len(self._used) >= 10_000:
            return False
        self._used.add(key)
        return True


class _Fill(Visitor):  # type: ignore[misc]
    def __init__(self, values: dict[int, ast.Node]) -> None:
        super().__init__()
        self.values = values

    def visit_ParamRef(self, ancestors: object, node: ast.ParamRef) -> ast.Node | None:
        return self.values.get(node.number)


def fill_literals(original: str, replacement: str) -> str | None:
    """`replacement` with the literals of `original` in place of its `$n`.

    `$n` numbers follow `original` normalized (its own parameters first, then its
    literals in order). Returns None when the literals cannot be lifted out.
    """
    try:
        normalized = parser.normalize(original)
        literals = extract_literals(original, normalized)
        wanted = _params(replacement)
    except parser.ParseError:
        return None
    if literals is None:
        return None
    # normalize() numbers literals after the client's own parameters, not left to right
    numbers = (int(n) for n in _PARAM.findall(normalized))
    tokens = dict(zip(numbers, literals, strict=True))
    values: dict[int, ast.Node] = {}
    for number in wanted:
        token = tokens.get(number)
        if token is None:
            return None
        if _PARAM.fullmatch(token):
            continue  # the client's own parameter stays a parameter
        try:
            (select,) = parse_sql(f"SELECT {token}")
        except (parser.ParseError, ValueError):
            return None
        values[number] = select.stmt.targetList[0].val
    if not values:
        return replacement
    (statement,) = parse_sql(replacement)
    _Fill(values)(statement)
    return RawStream()(statement)


def rewrite_statements(sql: str, replacements: list[tuple[int, str]]) -> str | None:
    """`sql` with statement `index` replaced by its rule's text (literals carried over)."""
    spans = [(start, end) for _, start, end in split_statements(sql)]
    if len(spans) == 1:
        return fill_literals(sql, replacements[0][1]) if replacements[0][0] == 0 else None
    out, last = [], 0
    for index, replace in sorted(replacements):
        if index >= len(spans):
            return None
        start, end = spans[index]
        new = fill_literals(sql[start:end], replace)
        if new is None:
            return None
        out += [sql[last:start], new]
        last = end
    out.append(sql[last:])
    return "".join(out)
