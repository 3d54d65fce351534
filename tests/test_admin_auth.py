"""The admin token guards the admin server: with one, every path but the probes (/healthz,
/readyz) needs it, as a bearer token or as the password of basic auth, and /metrics too
unless admin.metrics_public says otherwise. Every answer carries the security headers of
a page that shows client-controlled text. A real pgwarden; the CLI as operators run it.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from proxy.admin import token_matches
from proxy.config import ADMIN_TOKEN_ENV
from tests.support.proxy import ProxyProcess, launch_with_defaults, pgwarden
from tests.support.util import PgServer

TOKEN = secrets.token_hex(24)
NO_ENV_TOKEN = {ADMIN_TOKEN_ENV: ""}
GUARDED = ("/", "/advice", "/fingerprints", "/clients", "/?application=x")
PROBES = ("/healthz", "/readyz")


def basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def launch(pg: PgServer, factory: pytest.TempPathFactory, metrics_public: bool) -> ProxyProcess:
    workdir = factory.mktemp("auth")
    (workdir / "token").write_text(TOKEN)
    admin = {"token_file": str(workdir / "token"), "metrics_public": metrics_public}
    return launch_with_defaults(pg, workdir, "proxy", {"admin": admin}, env=NO_ENV_TOKEN)


@pytest.fixture(scope="module")
def guarded(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    process = launch(pg, tmp_path_factory, metrics_public=False)
    yield process
    process.stop()


def test_without_the_token_only_the_probes_answer(guarded: ProxyProcess) -> None:
    for path in (*GUARDED, "/metrics"):
        for headers in (
            {},
            {"Authorization": "Bearer " + "x" * 48},
            basic("admin", "wrong-" + TOKEN),
            {"Authorization": f"Basic {TOKEN}"},  # the token, not base64 of user:password
            {"Authorization": f"Token {TOKEN}"},
        ):
            status, body = guarded.http_get(path, headers)
            assert status == 401, (path, headers, body)
            assert TOKEN not in body
    for path in PROBES:
        assert guarded.http_get(path)[0] == 200, path


def test_the_challenge_names_bearer_and_basic(guarded: ProxyProcess) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(guarded.admin_url + "/", timeout=5)
    challenges = refused.value.headers.get_all("WWW-Authenticate")
    assert challenges[0].startswith("Bearer realm=")
    assert any(c.startswith('Basic realm="pgwarden"') for c in challenges)
    assert refused.value.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "headers",
    [BEARER, basic("anyone", TOKEN), basic("", TOKEN)],
    ids=["bearer", "basic", "basic_no_user"],
)
def test_bearer_and_basic_both_open_every_path(
    guarded: ProxyProcess, headers: dict[str, str]
) -> None:
    for path in (*GUARDED, "/metrics", *PROBES):
        status, body = guarded.http_get(path, headers)
        assert status == 200, (path, body)
    assert "<title>pgwarden advice</title>" in guarded.http_get("/", headers)[1]


def test_metrics_public_opens_metrics_only(
    pg: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    process = launch(pg, tmp_path_factory, metrics_public=True)
    try:
        status, body = process.http_get("/metrics")
        assert status == 200 and "pgwarden_client_connections" in body
        for path in GUARDED:
            assert process.http_get(path)[0] == 401, path
    finally:
        process.stop()


def test_without_a_token_the_page_is_open(module_proxy: ProxyProcess) -> None:
    status, body = module_proxy.http_get("/")
    assert status == 200 and body.startswith("<!doctype html>")


def test_the_page_carries_a_strict_policy_with_a_fresh_nonce(guarded: ProxyProcess) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    nonces = []
    for _ in range(2):
        request = urllib.request.Request(guarded.admin_url + "/", headers=BEARER)
        with opener.open(request, timeout=5) as response:
            body = response.read().decode()
            headers = response.headers
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        (nonce,) = re.findall(r"script-src 'nonce-([^']+)'", policy)
        assert f"style-src 'nonce-{nonce}'" in policy
        assert re.findall(r"<script([^>]*)>", body) == [f' nonce="{nonce}"']
        assert re.findall(r"<style([^>]*)>", body) == [f' nonce="{nonce}"']
        assert " style=" not in body and "http://" not in body and "https://" not in body
        nonces.append(nonce)
    assert nonces[0] != nonces[1]


def test_the_index_is_there_for_scripts(guarded: ProxyProcess) -> None:
    status, body = guarded.http_get("/", {**BEARER, "Accept": "application/json"})
    assert status == 200
    paths = {e["path"] for e in json.loads(body)["endpoints"]}
    assert {"/", "/advice", "/fingerprints", "/metrics"} <= paths


def test_the_commands_bear_the_token_from_the_environment(guarded: ProxyProcess) -> None:
    url = guarded.admin_url
    with_token = {ADMIN_TOKEN_ENV: TOKEN, "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    for args in (("advice", "--json"), ("clients",), ("report",), ("report", "--format", "json")):
        done = pgwarden(*args, "--admin", url, env=with_token)
        assert done.returncode == 0, (args, done.stderr)
    refused = pgwarden("report", "--admin", url, env=NO_ENV_TOKEN)
    assert refused.returncode == 1
    assert f"the admin token is needed: set {ADMIN_TOKEN_ENV}" in refused.stderr
    given = pgwarden("report", "--admin", url, "--token", TOKEN, env=NO_ENV_TOKEN)
    assert given.returncode == 0, given.stderr
    assert TOKEN not in given.stdout + given.stderr + guarded.log_text()


def test_token_matches_in_every_form() -> None:
    token = TOKEN.encode()
    assert token_matches(f"Bearer {TOKEN}", token)
    assert token_matches(f"bearer   {TOKEN} ", token)
    assert token_matches(basic("u", TOKEN)["Authorization"], token)
    assert token_matches(basic("u:v", TOKEN)["Authorization"], token) is False  # user has no :
    for wrong in ("", "Bearer", f"Bearer {TOKEN}x", "Basic !!!", "Basic " + "A" * 5, TOKEN):
        assert not token_matches(wrong, token), wrong
