"""The advice page (GET /) and `pgwarden report`, in a real browser: headless Chromium from
the distribution's packages, driven by Playwright, against a live pgwarden that saw an N+1
loop and an insert loop from two applications, and a statement built to break out of
the page (markup and quotes in a quoted identifier, which normalization keeps).

One browser for the module; every request it makes, console message and dialog is
recorded, so a test can tell that nothing came from elsewhere, nothing failed and no
script of the statement's ran. A screenshot of the page is kept under the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from markdown_it import MarkdownIt

from proxy.config import ADMIN_TOKEN_ENV
from tests.support.proxy import ProxyProcess, pgwarden
from tests.support.util import PgServer, wait_until

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("PGWARDEN_CHROMIUM", "/usr/bin/chromium")
ORDERS, BILLING = "web-orders", "web-billing"
AUTHORS = 12
# Survive normalization (identifiers, not literals): markup, quotes, backticks, pipes; as
# written in SQL, a double quote doubled inside the identifier.
HOSTILE_COLUMN = '<script>alert(1)</script><img src=x onerror=alert(2)> it\'s `a` | ""q""'
HOSTILE_TABLE = "web <i>notes</i> | `x`"
HOSTILE = f'SELECT "{HOSTILE_COLUMN}" FROM "{HOSTILE_TABLE}"'
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
]


@pytest.fixture(scope="module")
def proxy(module_proxy: ProxyProcess, pg: PgServer) -> Iterator[ProxyProcess]:
    """pgwarden after ORDERS ran an N+1 loop (plain, and one with the hostile alias) and
    BILLING an insert loop, connections closed."""
    pg.psql(
        f"""
        DROP TABLE IF EXISTS web_books, web_authors, web_items, "{HOSTILE_TABLE}";
        CREATE TABLE "{HOSTILE_TABLE}" (author_id int, "{HOSTILE_COLUMN}" text);
        CREATE TABLE web_authors (id int PRIMARY KEY, name text NOT NULL);
        CREATE TABLE web_books (id int PRIMARY KEY, author_id int NOT NULL, title text);
        CREATE TABLE web_items (n int NOT NULL, label text NOT NULL);
        INSERT INTO web_authors SELECT g, 'author ' || g FROM generate_series(1, {AUTHORS}) g;
        INSERT INTO web_books SELECT g, (g % {AUTHORS}) + 1, 'book ' || g
            FROM generate_series(1, {AUTHORS * 2}) g;
        """
    )
    with psycopg.connect(module_proxy.dsn(application_name=ORDERS), autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM web_authors WHERE id > %s", (0,))]
        for author_id in ids:
            conn.execute("SELECT title FROM web_books WHERE author_id = %s", (author_id,))
        ids = [r[0] for r in conn.execute("SELECT id FROM web_authors ORDER BY name")]
        for author_id in ids:
            conn.execute(HOSTILE + " WHERE author_id = %s", (author_id,))
    with (
        psycopg.connect(module_proxy.dsn(application_name=BILLING), autocommit=True) as conn,
        conn.transaction(),
    ):
        conn.cursor().executemany(
            "INSERT INTO web_items (n, label) VALUES (%s, %s)", [(i, "x") for i in range(15)]
        )
    wait_until(lambda: len(advice(module_proxy)) == 3, message="three advices")
    yield module_proxy
    pg.psql(f'DROP TABLE IF EXISTS web_books, web_authors, web_items, "{HOSTILE_TABLE}"')


def advice(proxy: ProxyProcess) -> list[dict[str, Any]]:
    status, body = proxy.http_get("/advice")
    assert status == 200, body
    found: list[dict[str, Any]] = json.loads(body)["advice"]
    return found


def hostile_advice(proxy: ProxyProcess) -> dict[str, Any]:
    (found,) = [a for a in advice(proxy) if "<script>" in a["statement"]]
    return found


@dataclass
class Browser:
    """A browser context and what it saw: requests, console errors, page errors, dialogs."""

    context: Any
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def page(self) -> Any:
        page = self.context.new_page()
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

        def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)
        return page


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=LAUNCH_ARGS,
            permissions=["clipboard-read", "clipboard-write"],
            viewport={"width": 1366, "height": 900},
        )
        seen = Browser(context)
        context.on("request", lambda r: seen.requests.append(r.url))
        try:
            yield seen
        finally:
            context.close()


@pytest.fixture
def page(browser: Browser, proxy: ProxyProcess) -> Iterator[Any]:
    """A page of the browser; after the test, no console error, no dialog, no request
    anywhere but the admin server or the report file."""
    start = len(browser.requests)
    page = browser.page()
    yield page
    page.close()
    made = browser.requests[start:]
    assert made, "the page loaded nothing?"
    outside = [u for u in made if not u.startswith((proxy.admin_url + "/", "file://", "data:"))]
    assert outside == [], outside
    assert browser.errors == [], browser.errors
    assert browser.dialogs == [], browser.dialogs


def visible_advice(page: Any) -> list[tuple[str, str]]:
    """(application, rule) of each advice the page shows."""
    found: list[tuple[str, str]] = page.eval_on_selector_all(
        "details.advice",
        "els => els.filter(e => e.offsetParent !== null).map(e => [e.dataset.app, e.dataset.rule])",
    )
    return sorted(tuple(pair) for pair in found)


def assert_inert(page: Any) -> None:
    """The hostile alias is on the page as text, and made no element of its own."""
    assert page.locator("script").count() == 1  # the page's own
    assert page.locator("img").count() == 0
    codes = page.locator("pre code").all_text_contents()
    assert any(HOSTILE_COLUMN in text for text in codes), codes


# ------------------------------------------------------------------------------ the page


def test_the_page_shows_both_applications_and_the_filter_narrows(
    page: Any, proxy: ProxyProcess, tmp_path: Path
) -> None:
    page.goto(proxy.admin_url + "/")
    assert page.title() == "pgwarden advice"
    groups = page.locator("section.group h2").all_text_contents()
    assert any(ORDERS in g for g in groups) and any(BILLING in g for g in groups), groups
    assert visible_advice(page) == [
        (BILLING, "insert_loop"),
        (ORDERS, "n_plus_one"),
        (ORDERS, "n_plus_one"),
    ]
    assert page.locator("tr.statement").count() >= 4  # the top statements view
    page.screenshot(path=str(tmp_path / "advice-page.png"), full_page=True)

    page.select_option("select[name=application]", ORDERS)
    assert visible_advice(page) == [(ORDERS, "n_plus_one"), (ORDERS, "n_plus_one")]
    assert "application=web-orders" in page.url  # a link to this view
    apps = page.eval_on_selector_all(
        "tr.statement", "rows => rows.filter(r => !r.hidden).map(r => r.dataset.app)"
    )
    assert apps and set(apps) == {ORDERS}
    page.select_option("select[name=application]", "")
    page.select_option("select[name=rule]", "insert_loop")
    assert visible_advice(page) == [(BILLING, "insert_loop")]
    page.select_option("select[name=severity]", "warning")
    assert visible_advice(page) == []
    assert page.locator("#no-match").is_visible()

    # without the script, the server applies the same filters
    page.goto(proxy.admin_url + "/?application=web-billing")
    assert visible_advice(page) == [(BILLING, "insert_loop")]
    page.screenshot(path=str(tmp_path / "advice-page-billing.png"), full_page=True)
    assert (tmp_path / "advice-page.png").stat().st_size > 10_000


def test_an_item_opens_to_its_details_and_copy_gives_the_suggested_sql(
    page: Any, proxy: ProxyProcess
) -> None:
    hostile = hostile_advice(proxy)
    page.goto(proxy.admin_url + "/")
    item = page.locator("details.advice", has_text="<script>alert(1)")
    item.locator("summary").click()
    body = item.locator(".body")
    assert body.is_visible()
    text = body.inner_text()
    for expected in (
        hostile["suggestion"],
        "First seen",
        "Last seen",
        "Occurrences",
        "The looked-up values came from column id",
        hostile["source"]["statement"],  # the query the looked-up values came from
        hostile["first_seen"],
    ):
        assert expected in text, expected
    evidence = item.locator("table.evidence th").all_text_contents()
    assert len(evidence) == len(hostile["evidence"])
    item.locator("button.copy").click()
    wait_until(lambda: item.locator("button.copy").inner_text() == "Copied")
    assert page.evaluate("navigator.clipboard.readText()") == hostile["suggested_sql"]
    # (rebuilt from the parse tree, where the identifier is cut to 63 bytes, as PostgreSQL does)
    assert '"<script>alert(1)</script><img' in hostile["suggested_sql"]
    assert_inert(page)


def test_the_page_refreshes_by_itself_keeping_what_is_open(
    page: Any, proxy: ProxyProcess, tmp_path: Path
) -> None:
    page.clock.install()
    page.goto(proxy.admin_url + "/")
    item = page.locator("details.advice", has_text="insert_loop")
    item.locator("summary").click()
    anchor = item.get_attribute("id")
    with psycopg.connect(proxy.dsn(application_name="web-late"), autocommit=True) as conn:
        for (author_id,) in conn.execute("SELECT id FROM web_authors WHERE id > %s", (0,)):
            conn.execute("SELECT title FROM web_books WHERE author_id = %s", (author_id,))
    wait_until(lambda: len(advice(proxy)) == 4, message="the late application's advice")
    page.clock.run_for(16_000)
    page.wait_for_selector("section.group[data-app=web-late]")
    assert "updated" in page.locator("#refresh-status").inner_text()
    assert page.locator(f"details#{anchor}").evaluate("d => d.open")
    assert page.locator("select[name=application] option[value=web-late]").count() == 1
    assert_inert(page)


# --------------------------------------------------------------------------- the reports


def report(proxy: ProxyProcess, *args: str) -> str:
    done = pgwarden("report", "--admin", proxy.admin_url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_html_report_is_the_page_standalone_and_inert(
    page: Any, proxy: ProxyProcess, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    said = report(proxy, "--format", "html", "--output", str(out))
    assert str(out) in said
    html = out.read_text()
    assert "Content-Security-Policy" in html and "<script>alert" not in html
    page.goto(out.as_uri())
    assert page.title() == "pgwarden optimization report"
    apps = {app for app, _ in visible_advice(page)}
    assert {ORDERS, BILLING} <= apps
    page.select_option("select[name=application]", BILLING)
    assert visible_advice(page) == [(BILLING, "insert_loop")]
    page.select_option("select[name=application]", "")
    page.locator("details.advice", has_text="<script>alert(1)").locator("summary").click()
    assert_inert(page)
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)


def test_the_markdown_report_renders_as_text(proxy: ProxyProcess, tmp_path: Path) -> None:
    text = report(proxy)
    assert text.startswith("# pgwarden optimization report")
    assert "## Summary" in text and "## MEDIUM priority" in text and "## LOW priority" in text
    for part in ("**Problem:**", "**Where:**", "**Evidence:**", "**Fix:**", "**Impact:**"):
        assert text.count(part) == len(advice(proxy)), part
    rendered = MarkdownIt("commonmark").enable("table").render(text)
    assert "<script" not in rendered and "<img" not in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered
    # the statement is a code block, exactly as pgwarden normalized it
    hostile = hostile_advice(proxy)
    blocks = MarkdownIt("commonmark").parse(text)
    code = [t.content.rstrip("\n") for t in blocks if t.type == "fence"]
    assert hostile["statement"] in code and hostile["suggested_sql"] in code
    # the top statements table keeps its columns whatever the statement holds
    rows = [line for line in text.splitlines() if line.startswith("| ") and "<script>" in line]
    assert rows == []
    (tmp_path / "report.md").write_text(text)

    mine = MarkdownIt("commonmark").enable("table").render(report(proxy, "--application", BILLING))
    assert "insert_loop" in mine and "n_plus_one" not in mine
    assert "<strong>Scope:</strong> application web-billing only" in mine


def test_the_json_report(proxy: ProxyProcess) -> None:
    data = json.loads(report(proxy, "--format", "json", "--application", ORDERS))
    assert data["application"] == ORDERS
    assert set(data["priorities"]) == {"MEDIUM"}
    items = data["priorities"]["MEDIUM"]
    assert {i["rule"] for i in items} == {"n_plus_one"}
    assert all(i["round_trips_saved"] == AUTHORS - 1 for i in items)
    assert {s["application"] for s in data["statements"]} == {ORDERS}


def test_with_a_token_the_browser_asks_and_the_refresh_follows(
    browser: Browser, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    """Basic auth as a browser does it (the token as password), refresh included."""
    token = secrets.token_hex(20)
    guarded = proxy_factory(env={ADMIN_TOKEN_ENV: token})
    page = browser.page()
    try:
        page.clock.install()
        host = guarded.admin_url.removeprefix("http://")
        response = page.goto(f"http://anyone:{token}@{host}/")
        assert response is not None and response.status == 200
        assert page.locator("#advice .empty h2").inner_text() == "No advice yet"
        page.clock.run_for(16_000)
        sync_api.expect(page.locator("#refresh-status")).to_contain_text("updated")
    finally:
        page.close()
    assert browser.errors == [] and browser.dialogs == []
