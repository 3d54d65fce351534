"""The advice page: one HTML document rendered on the server with Jinja2, autoescaped.

The admin server serves it at GET / (refreshing itself); `pgwarden report --format html`
writes the same document standalone, in one file. Its only script and style are inline
and bear the response's nonce, so the Content-Security-Policy can forbid every other
one: a statement that carries markup shows as text and, escaped or not, could not run.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import jinja2

from proxy.admin import Handler, Request, Response
from proxy.web.view import (
    NO_APPLICATION,
    PRIORITIES,
    Group,
    Item,
    Statement,
    View,
    build_view,
    duration,
    number,
)

__all__ = [
    "FILTERS",
    "REFRESH_SECONDS",
    "advice_page",
    "new_nonce",
    "render_page",
    "standalone_csp",
]

FILTERS = ("application", "rule", "severity")  # the page's query parameters
REFRESH_SECONDS = 15
_SPACE = re.compile(r"\s+")

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("proxy.web", "templates"),
    autoescape=True,  # every template is HTML, its includes (CSS, JS) hold no variables
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["oneline"] = lambda text: _SPACE.sub(" ", str(text)).strip()


def standalone_csp(nonce: str) -> str:
    """The policy a report file carries in a <meta>: nothing to fetch, nowhere to post
    (frame-ancestors has no effect there, so it is left out)."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "img-src data:; form-action 'none'; base-uri 'none'"
    )


def render_page(
    view: View,
    *,
    nonce: str,
    selected: Mapping[str, str] | None = None,
    standalone: bool = False,
    refresh: int | None = REFRESH_SECONDS,
    fragment: bool = False,
) -> str:
    """The page of `view`: everything in it, what `selected` filters out hidden (the
    page's script filters again as the selects change, the server's view too without
    it). `standalone`: a report file, without refresh or links to the admin server.
    `fragment`: only the parts a refresh replaces (filters and content), without the
    style and script, whose nonce would not be the running page's."""
    chosen = {name: (selected or {}).get(name, "") for name in FILTERS}

    def hidden_item(item: Item) -> bool:
        return bool(
            (
                chosen["application"]
                and (item.application or NO_APPLICATION) != chosen["application"]
            )
            or (chosen["rule"] and item.rule != chosen["rule"])
            or (chosen["severity"] and item.severity != chosen["severity"])
        )

    def hidden_group(group: Group) -> bool:
        return all(hidden_item(item) for item in group.items)

    def hidden_statement(row: Statement) -> bool:
        app = chosen["application"]
        return bool(app and (row.application or NO_APPLICATION) != app)

    template = "fragment.html.j2" if fragment else "page.html.j2"
    return _env.get_template(template).render(
        view=view,
        nonce=nonce,
        csp=standalone_csp(nonce),
        selected=chosen,
        standalone=standalone,
        refresh=None if standalone else refresh,
        title="pgwarden optimization report" if standalone else "pgwarden advice",
        no_app=NO_APPLICATION,
        priorities=PRIORITIES,
        duration=duration,
        number=number,
        hidden_item=hidden_item,
        hidden_group=hidden_group,
        hidden_statement=hidden_statement,
    )


def advice_page(
    advice: Callable[[], list[dict[str, Any]]],
    fingerprints: Callable[[], list[dict[str, Any]]],
    before_read: Callable[[], None],
) -> Handler:
    """GET /[?application=&rule=&severity=][&fragment=1]: the page of what `advice` and
    `fingerprints` give (their /advice and /fingerprints entries), after `before_read`
    brings them up to date; `fragment=1`: the part the page's refresh replaces."""

    async def handler(request: Request) -> Response:
        before_read()
        view = build_view(advice(), fingerprints())
        fragment = request.query.get("fragment") == "1"
        html = render_page(view, nonce=request.nonce, selected=request.query, fragment=fragment)
        return 200, "text/html; charset=utf-8", html.encode("utf-8", "replace")

    return handler


def new_nonce() -> str:
    """A fresh nonce for a document rendered outside a request (a report file)."""
    return secrets.token_urlsafe(18)
