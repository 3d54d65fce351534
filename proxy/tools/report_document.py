"""`pgwarden report`: the optimization report of a running pgwarden, as Markdown, HTML
or JSON, laid out like the reports teams write by hand: a summary, then HIGH, MEDIUM and
LOW priorities, each item with Problem, Where, Evidence, Fix and Impact.

Statements, table and application names are client-controlled text. In Markdown they
go either into fenced code blocks whose fence is longer than any run of backticks they
hold, or through `md_text`, which escapes every Markdown and HTML character, so the
report renders as text on a code host whatever a statement holds. The HTML report is the
advice page itself (proxy.web), standalone.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Any

from proxy.web.page import new_nonce, render_page
from proxy.web.view import NO_APPLICATION, PRIORITIES, Item, View, duration, number

__all__ = ["FORMATS", "fence", "json_report", "markdown_report", "md_text", "render_report"]

FORMATS = ("markdown", "html", "json")
TOP_STATEMENTS = 10  # rows of the Markdown report's statements table
# What each rule's advice is about, for "Problem"; {count}: statements in the pattern.
PROBLEMS = {
    "n_plus_one": "{count} lookups, one round trip each, of values an earlier query returned (N+1)",
    "insert_loop": "{count} single-row INSERTs, one round trip each",
    "write_loop": "{count} single-row writes, one round trip each",
    "repeated_read": "the same read run {count} times",
    "unwrapped_writes": "{count} writes outside a transaction: a failure leaves some of them done",
    "select_star": "SELECT * reads every column, wide ones included",
    "unbounded_result": "a query without a bound on its result",
    "not_in_subquery": "NOT IN over a subquery (slow, and wrong with NULLs)",
    "leading_wildcard": "a LIKE pattern with a leading wildcard, which a B-tree cannot serve",
    "missing_index": "a scan that an index would avoid",
    "slow_query": "a slow statement",
    "long_transaction": "a long transaction",
    "idle_in_transaction": "a session idle in an open transaction",
    "catalog_polling": "the catalog polled again and again",
    "connection_churn": "a new connection for a few statements each time",
    "check_then_write": "a check then a write, racing with other sessions",
}
# What Markdown (GitHub's too) reads inline: escapes, code, emphasis, links (no [, so no
# link or image), tables, strikethrough, math, mentions and issue references. -, +, =
# and . mean something only at the start of a line, where md_text never puts its text;
# _ between two letters or digits never makes emphasis.
_SPECIAL = frozenset("\\`*[]#|~@$")
_LOOSE_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_AUTOLINK = re.compile(r"(?i)(?<=www)\.|:(?=/)")  # www. and scheme:/ would become links
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BACKTICKS = re.compile(r"`+")


def md_text(text: str) -> str:
    """`text` as inline Markdown that renders as exactly that text, never as markup:
    Markdown's punctuation backslash-escaped (emphasis, code, links, tables), &, < and >
    as entities (HTML), no autolink, whitespace runs as one space. Never at the start
    of a line (a list or heading marker there stays unescaped)."""
    flat = " ".join(_CONTROL.sub(" ", text).split())
    escaped = "".join(_ENTITIES.get(ch) or ("\\" + ch if ch in _SPECIAL else ch) for ch in flat)
    escaped = _LOOSE_UNDERSCORE.sub(r"\\_", escaped)
    return _AUTOLINK.sub(lambda m: "\\" + m.group(0), escaped)


def fence(text: str, info: str = "sql") -> str:
    """`text` as a fenced code block, whose content a Markdown renderer never reads as
    markup: the fence is longer than any run of backticks inside."""
    body = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    longest = max((len(run) for run in _BACKTICKS.findall(body)), default=0)
    marks = "`" * max(3, longest + 1)
    return f"{marks}{info}\n{body}\n{marks}"


def _problem(item: Item) -> str:
    template = PROBLEMS.get(item.rule, item.rule.replace("_", " "))
    return template.format(count=number(item.count))


def _where(item: Item) -> str:
    tables = ", ".join(item.tables) or "-"
    return (
        f"application {md_text(item.application or NO_APPLICATION)}, "
        f"database {md_text(item.database or '-')}, user {md_text(item.user or '-')}; "
        f"tables {md_text(tables)}"
    )


def _markdown_item(number_in_report: int, item: Item) -> list[str]:
    title = (
        f"{item.rule} on {', '.join(item.tables) or '-'}, in {item.application or NO_APPLICATION}"
    )
    lines = [
        f"### {number_in_report}\\. {md_text(title)}",
        "",
        f"**Problem:** {md_text(_problem(item))}.",
        "",
        f"**Where:** {_where(item)}. The statement, normalized:",
        "",
        fence(item.statement),
        "",
        "**Evidence:**",
        "",
        f"- seen {number(item.occurrences)} time{'s' if item.occurrences != 1 else ''}, "
        f"from {md_text(item.first_seen or '-')} to {md_text(item.last_seen or '-')}; "
        f"the last time {number(item.count)} statements",
        f"- time at stake: {md_text(duration(item.time_at_stake_ms))}",
    ]
    lines += [f"- {md_text(name)}: {md_text(value)}" for name, value in item.evidence]
    if item.source:
        lines += [
            f"- the values came from column {md_text(item.source.get('column', '-'))} of:",
            "",
            fence(item.source.get("statement", "")),
        ]
    lines += ["", f"**Fix:** {md_text(item.suggestion)}", ""]
    if item.suggested_sql:
        lines += [fence(item.suggested_sql), ""]
    lines += [f"**Impact:** {md_text(item.impact)}.", ""]
    return lines


def markdown_report(view: View, application: str | None = None) -> str:
    """The report as Markdown (CommonMark with GitHub's tables)."""
    apps = ", ".join(app or NO_APPLICATION for app in view.applications) or "none yet"
    period = f"{view.period[0]} to {view.period[1]}" if view.period else "no advice yet"
    lines = [
        "# pgwarden optimization report",
        "",
        f"**Generated:** {md_text(view.generated_at)}  ",
        f"**Period covered:** {md_text(period)}  ",
        f"**Statements seen:** {number(view.statements_seen)} "
        f"({number(view.shapes_seen)} distinct shapes)  ",
        f"**Applications:** {md_text(apps)}",
    ]
    if application is not None:
        lines[-1] += "  "
        lines.append(f"**Scope:** application {md_text(application or NO_APPLICATION)} only")
    lines += ["", "## Summary", ""]
    by_priority = dict(view.by_priority())
    if not view.items:
        lines += [
            "No advice yet: pgwarden has not seen a pattern worth fixing. Run the "
            "applications through it for a while and ask again.",
            "",
        ]
    else:
        lines += ["| priority | advice | time at stake |", "| --- | ---: | ---: |"]
        for priority in PRIORITIES.values():
            items = by_priority.get(priority, ())
            spent = duration(sum(item.time_at_stake_ms for item in items))
            lines.append(f"| {priority} | {len(items)} | {spent if items else '-'} |")
        lines += ["", "Most time at stake:", ""]
        for item in view.items[:3]:
            lines.append(
                f"- {md_text(duration(item.time_at_stake_ms))} in "
                f"{md_text(item.application or NO_APPLICATION)}: {md_text(_problem(item))}"
            )
        lines.append("")
        if view.omitted_advice:
            lines += [f"{number(view.omitted_advice)} less costly advice left out.", ""]
    number_in_report = 0
    for priority in PRIORITIES.values():
        items = by_priority.get(priority, ())
        if not items:
            continue
        lines += ["---", "", f"## {priority} priority", ""]
        for item in items:
            number_in_report += 1
            lines += _markdown_item(number_in_report, item)
    if view.statements:
        lines += [
            "---",
            "",
            "## Top statements",
            "",
            "| # | application | calls | total | mean | rows | errors | statement |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for i, s in enumerate(view.statements[:TOP_STATEMENTS], 1):
            text = s.statement if len(s.statement) <= 120 else s.statement[:119] + "…"
            lines.append(
                f"| {i} | {md_text(s.application or NO_APPLICATION)} | {number(s.calls)} | "
                f"{md_text(duration(s.total_ms))} | {md_text(duration(s.mean_ms))} | "
                f"{number(s.rows)} | {number(s.errors)} | {md_text(text)} |"
            )
        lines.append("")
    lines += [
        "Statements are normalized: every literal and parameter shows as $n, never a value.",
        "",
    ]
    return "\n".join(lines)


def json_report(view: View, application: str | None = None) -> str:
    """The report as JSON: the summary, the items by priority with their impact."""

    def item(found: Item) -> dict[str, Any]:
        data = asdict(found)
        data["evidence"] = dict(found.evidence)
        data["problem"] = _problem(found)
        data["impact"] = found.impact
        data["round_trips_saved"] = found.round_trips_saved
        return data

    report = {
        "generated_at": view.generated_at,
        "period": list(view.period) if view.period else None,
        "application": application,
        "applications": list(view.applications),
        "statements_seen": view.statements_seen,
        "shapes_seen": view.shapes_seen,
        "omitted_advice": view.omitted_advice,
        "priorities": {p: [item(i) for i in items] for p, items in view.by_priority()},
        "statements": [{**asdict(s), "mean_ms": round(s.mean_ms, 3)} for s in view.statements],
    }
    return json.dumps(report, indent=2) + "\n"


def render_report(view: View, fmt: str, application: str | None = None) -> str:
    """The report of `view` in `fmt` (one of FORMATS)."""
    if fmt == "markdown":
        return markdown_report(view, application)
    if fmt == "json":
        return json_report(view, application)
    if fmt == "html":
        return render_page(view, nonce=new_nonce(), standalone=True)
    raise ValueError(f"unknown report format {fmt!r}")
