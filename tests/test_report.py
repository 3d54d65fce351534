"""The report and the page without a proxy: how advice is ranked, grouped and bounded,
and how client-controlled text is escaped in Markdown and HTML (the live versions, in a
browser, are in tests/test_advice_page.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from markdown_it import MarkdownIt

from proxy.tools.pgcluster import free_port
from proxy.tools.report_document import fence, json_report, markdown_report, md_text
from proxy.web.page import render_page
from proxy.web.view import build_view, duration
from tests.support.proxy import pgwarden

NASTY = (
    'SELECT "<script>alert(1)</script>" AS "a | b", "```" AS "``" , "*x* _y_ [l](http://e.x)"'
    ' FROM "t" WHERE k = $1 -- <!-- & @mention #1 www.example.com'
)


def markdown(text: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(text)


def advice(n: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rule": "n_plus_one",
        "severity": "warning",
        "fingerprint": f"{n:016x}",
        "statement": f"SELECT * FROM t{n} WHERE id = $1",
        "tables": [f"t{n}"],
        "count": 10,
        "occurrences": 2,
        "suggestion": "Fetch them in one query.",
        "suggested_sql": f"SELECT * FROM t{n} WHERE id = ANY($1)",
        "database": "db",
        "user": "u",
        "application_name": "app",
        "source": None,
        "evidence": {"statements": 10, "window_s": 0.25},
        "time_spent_ms": 1.0,
        "total_time_ms": float(n),
        "first_seen": "2026-01-01T00:00:00Z",
        "last_seen": "2026-01-01T00:10:00Z",
    }
    return {**base, **fields}


def test_md_text_renders_as_the_same_text() -> None:
    rendered = markdown(f"x {md_text(NASTY)}")
    assert "<script" not in rendered and "<a " not in rendered and "<em>" not in rendered
    assert "<code>" not in rendered and "<!--" not in rendered
    text = re.sub(r"</?p>|\n", "", rendered)
    unescaped = text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
    assert unescaped.replace("&amp;", "&") == "x " + " ".join(NASTY.split())


def test_a_fence_holds_any_statement() -> None:
    tokens = MarkdownIt("commonmark").parse(fence(NASTY + "\n````\nmore"))
    (block,) = [t for t in tokens if t.type == "fence"]
    assert block.content == NASTY + "\n````\nmore\n"
    assert len(tokens) == 1


def test_a_table_cell_keeps_the_table_whole() -> None:
    table = f"| a | b |\n| --- | --- |\n| {md_text(NASTY)} | 2 |\n"
    rendered = markdown(table)
    assert rendered.count("<td>") == 2 and "<script" not in rendered


def test_advice_is_ranked_by_time_at_stake_grouped_by_application_and_bounded() -> None:
    found = [
        advice(1, application_name="b"),
        advice(5, application_name="a", severity="info"),
        advice(3, application_name="b", severity="critical"),
        advice(2, application_name=""),
    ]
    view = build_view(found, [], max_advice=3)
    assert [i.time_at_stake_ms for i in view.items] == [5.0, 3.0, 2.0]
    assert [i.rank for i in view.items] == [1, 2, 3]
    assert [g.label for g in view.groups] == ["a", "b", "(no application_name)"]
    assert view.omitted_advice == 1
    assert [p for p, _ in view.by_priority()] == ["HIGH", "MEDIUM", "LOW"]
    assert view.items[1].round_trips_saved == 9
    assert "18 so far" in view.items[1].impact


def test_the_markdown_report_has_every_part_for_every_item() -> None:
    found = [advice(1, statement=NASTY, tables=["<b>t</b>"], application_name="x|`y`")]
    found.append(advice(2, rule="slow_query", severity="critical", suggested_sql=None))
    text = markdown_report(build_view(found, []))
    for part in ("## Summary", "## HIGH priority", "## MEDIUM priority", "| HIGH | 1 |"):
        assert part in text, part
    for part in ("**Problem:**", "**Where:**", "**Evidence:**", "**Fix:**", "**Impact:**"):
        assert text.count(part) == 2, part
    rendered = markdown(text)
    assert "<script" not in rendered and "<b>" not in rendered
    assert "x|`y`" in rendered.replace("<code>", "`")  # shown, not as code
    assert "window s: 0.25" in rendered
    assert "the fix saves 9 round trips each time (18 so far)" in rendered


def test_the_empty_report_and_page_say_so() -> None:
    view = build_view([], [])
    assert "No advice yet" in markdown_report(view)
    page = render_page(view, nonce="n0nce")
    assert "No advice yet" in page and "No statement seen yet" in page
    report = json.loads(json_report(view))
    assert report["priorities"] == {} and report["statements"] == []


def test_the_page_escapes_everything_and_bounds_what_it_lists() -> None:
    found = [advice(n, statement=NASTY, suggested_sql=NASTY) for n in range(1, 251)]
    rows = [
        {"fingerprint": f"{n:x}", "statement": NASTY, "calls": n, "total_time_ms": n}
        for n in range(300)
    ]
    page = render_page(build_view(found, rows), nonce="n0nce")
    assert page.count("<details") == 200 and page.count('<tr class="statement"') == 100
    assert "50 less costly advice not shown" in page
    assert "<script>alert" not in page and "</script>" in page  # only the page's own
    assert page.count("<script") == 1
    assert 'data-copy="SELECT &#34;&lt;script&gt;' in page


def test_the_standalone_report_carries_its_own_policy() -> None:
    page = render_page(build_view([advice(1)], []), nonce="n0nce", standalone=True)
    assert '<meta http-equiv="Content-Security-Policy"' in page
    assert "script-src &#39;nonce-n0nce&#39;" in page and "frame-ancestors" not in page
    assert 'data-refresh=""' in page and 'href="advice"' not in page


@pytest.mark.parametrize(("ms", "shown"), [(0.123, "0.12 ms"), (340, "340 ms"), (1234, "1.2 s")])
def test_durations(ms: float, shown: str) -> None:
    assert duration(ms) == shown


def test_report_without_a_server_exits_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = pgwarden("report", "--admin", url)
    assert done.returncode == 1 and f"cannot read /advice from {url}" in done.stderr
    bad = pgwarden("report", "--format", "pdf")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
