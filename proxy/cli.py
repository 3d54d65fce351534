"""The `pgwarden` command line."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

import yaml

from proxy import __version__
from proxy.config import ADMIN_TOKEN_ENV, ConfigError, Settings, load_settings
from proxy.logs import configure_logging, flush_logs, get_logger
from proxy.tools.clients import format_clients
from proxy.tools.report import format_advice
from proxy.tools.report_document import FORMATS, render_report
from proxy.web.view import build_view

__all__ = ["main"]

_ADMIN_URL = "http://127.0.0.1:9930"
# Straight to the admin address: an HTTP proxy named in the environment would see the token.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_LOG_FLUSH_TIMEOUT = 2.0  # seconds `run` waits at exit for queued log lines
_EXIT_CANNOT_LISTEN = 3  # `run` exit codes: 0 drained, 1 other start failure, 2 bad config


# `pgwarden advice` flags: (flag, /advice query parameter, help)
_ADVICE_FILTERS = (
    ("--application", "application_name", "of this application_name"),
    ("--database", "database", "about this database"),
    ("--user", "user", "about this user's statements"),
    ("--rule", "rule", "of this rule (n_plus_one, insert_loop, slow_query)"),
    ("--severity", "severity", "of this severity (info, warning, critical)"),
)


def _advice_query(args: argparse.Namespace) -> str:
    """The /advice query string of the filter flags given ("" for none)."""
    given = {field: getattr(args, field) for _, field, _ in _ADVICE_FILTERS}
    query = urllib.parse.urlencode({k: v for k, v in given.items() if v is not None})
    return f"?{query}" if query else ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgwarden",
        description="A PostgreSQL wire-protocol sidecar proxy that finds the queries "
        "that hurt your database and tells you how to fix them.",
    )
    parser.add_argument("--version", action="version", version=f"pgwarden {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", help="YAML config file (also $PGWARDEN_CONFIG)")
    run.add_argument("--listen", metavar="HOST:PORT", help="client address (127.0.0.1:6432)")
    run.add_argument("--upstream", metavar="HOST:PORT", help="PostgreSQL (127.0.0.1:5432)")
    run.add_argument("--admin", metavar="HOST:PORT", help="admin HTTP (127.0.0.1:9930)")
    run.add_argument("--log-format", choices=("json", "console"), help="log format (json)")

    check = sub.add_parser("check-config", help="validate a config and print the settings")
    check.add_argument("config", help="YAML config file")

    advice = sub.add_parser("advice", help="print the advice of a running pgwarden")
    advice.add_argument(
        "--admin", default="http://127.0.0.1:9930", help="admin URL (http://127.0.0.1:9930)"
    )
    advice.add_argument("--json", action="store_true", help="print the raw JSON")
    for flag, field, what in _ADVICE_FILTERS:
        advice.add_argument(flag, dest=field, metavar=field.upper(), help=f"only advice {what}")

    report = sub.add_parser(
        "report", help="the optimization report of a running pgwarden (Markdown, HTML, JSON)"
    )
    report.add_argument("--admin", default=_ADMIN_URL, help=f"admin URL ({_ADMIN_URL})")
    report.add_argument(
        "--format", choices=FORMATS, default="markdown", help="markdown (default), html, json"
    )
    report.add_argument("--output", metavar="FILE", help="write it to FILE (default: stdout)")
    report.add_argument(
        "--application", metavar="NAME", help="only the advice and statements of this application"
    )
    report.add_argument(
        "--token",
        help=f"the admin token, when the server has one (default: ${ADMIN_TOKEN_ENV})",
    )

    clients = sub.add_parser("clients", help="list the client sessions of a running pgwarden")
    clients.add_argument("--admin", default=_ADMIN_URL, help=f"admin URL ({_ADMIN_URL})")
    clients.add_argument("--json", action="store_true", help="print the raw JSON")

    terminate = sub.add_parser(
        "terminate", help="end one client session of a running pgwarden (57P01)"
    )
    terminate.add_argument(
        "client",
        metavar="ID-or-PID",
        help="the session's id as `pgwarden clients` shows it, or its backend pid "
        "(id:ID or pid:PID when a number could be either)",
    )
    terminate.add_argument("--admin", default=_ADMIN_URL, help=f"admin URL ({_ADMIN_URL})")
    terminate.add_argument(
        "--token",
        help=f"the admin token (default: ${ADMIN_TOKEN_ENV}, which keeps it out of the "
        "process list)",
    )

    demo = sub.add_parser(
        "demo", help="a throwaway PostgreSQL, pgwarden and a leaky app, end to end"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep PostgreSQL, pgwarden and its admin server running until Ctrl-C",
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    mapping = {
        "listen": "listen",
        "upstream": "upstream.address",
        "admin": "admin.listen",
        "log_format": "logging.format",
    }
    return {
        key: getattr(args, attr)
        for attr, key in mapping.items()
        if getattr(args, attr, None) is not None
    }


def _run_loop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def cmd_run(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("PGWARDEN_CONFIG")
    overrides = _overrides(args)
    try:
        settings = load_settings(path, overrides)
    except ConfigError as exc:
        print(f"pgwarden: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging.format, settings.logging.level)

    def reload() -> Settings:
        return load_settings(path, overrides)

    async def main() -> int:
        from proxy.server import ListenError, ProxyServer

        try:
            server = ProxyServer(settings, reload=reload)
            await server.start()
        except ListenError as exc:  # a port in use: say which, for people and for logs
            get_logger("pgwarden").error("start_failed", error=str(exc))
            print(f"pgwarden: {exc}", file=sys.stderr)
            return _EXIT_CANNOT_LISTEN
        except OSError as exc:
            get_logger("pgwarden").error("start_failed", error=str(exc))
            return 1
        server.install_signal_handlers()
        # Every statement makes a few short-lived objects, and with the default
        # thresholds the cyclic collector then ran often enough to cost a quarter of the
        # analysis time. pgwarden's objects seldom form cycles and all its structures are
        # bounded, so: collect far less often, and never re-scan what startup made.
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        await server.serve_until_stopped()
        return 0

    try:
        return _run_loop(main)
    finally:
        # The last lines (draining, stopped) are still queued; a reader that stopped
        # reading must not keep the process from exiting.
        flush_logs(_LOG_FLUSH_TIMEOUT)


_Command = Callable[[argparse.Namespace], int]


def _prints(command: _Command) -> _Command:
    """For a command whose output may go to a pipe: a reader that stops early (`pgwarden
    advice --json | head`) took what it wanted, so the command ends quietly, exit 0,
    instead of with a BrokenPipeError traceback."""

    @functools.wraps(command)
    def printing(args: argparse.Namespace) -> int:
        code = 0
        try:
            code = command(args)
            sys.stdout.flush()  # so a reader gone shows here, not at the interpreter's exit
        except BrokenPipeError:
            # Python flushes stdout once more at exit and would report the pipe there
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return code

    return printing


@_prints
def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, {})
    except ConfigError as exc:
        print(f"pgwarden: config error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK")
    print(yaml.safe_dump(settings.to_dict(), sort_keys=False), end="")
    return 0


@_prints
def cmd_advice(args: argparse.Namespace) -> int:
    url = args.admin.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    try:
        request = _bearing_token(urllib.request.Request(f"{url}/advice{_advice_query(args)}"))
        with _DIRECT.open(request, timeout=10) as response:
            payload = json.load(response)
    except (OSError, ValueError) as exc:
        print(f"pgwarden: cannot read advice from {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(format_advice(payload["advice"]), end="")
    return 0


@_prints
def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.tools.demo import run_demo

    return run_demo(keep=args.keep)


def _bearing_token(
    request: urllib.request.Request, token: str | None = None
) -> urllib.request.Request:
    """`request` with the admin token, `token` or else $PGWARDEN_ADMIN_TOKEN's, if any: a
    server with a token answers only those who bear it."""
    token = token or os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return request


def _admin_call(
    admin: str, path: str, token: str | None = None, *, post: bool = False
) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer or {}) of GET (or POST) `path` on the admin server at
    `admin`, bearing `token` or $PGWARDEN_ADMIN_TOKEN's; OSError when it cannot be
    reached."""
    url = admin.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    request = _bearing_token(urllib.request.Request(url + path, data=b"" if post else None), token)
    try:
        with _DIRECT.open(request, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    return status, payload if isinstance(payload, dict) else {}


@_prints
def cmd_report(args: argparse.Namespace) -> int:
    """Reads /advice and /fingerprints (of one application with --application) and
    writes the report; exit 1 when the admin server cannot be read."""
    query = f"?{urllib.parse.urlencode({'application_name': args.application})}"
    query = query if args.application is not None else ""
    answers: dict[str, list[dict[str, Any]]] = {}
    for name in ("advice", "fingerprints"):
        try:
            status, payload = _admin_call(args.admin, f"/{name}{query}", args.token)
        except OSError as exc:
            print(f"pgwarden: cannot read /{name} from {args.admin}: {exc}", file=sys.stderr)
            return 1
        entries = payload.get(name)
        if status != 200 or not isinstance(entries, list):
            why = payload.get("error") or f"HTTP {status}"
            if status == 401:
                why = f"the admin token is needed: set {ADMIN_TOKEN_ENV} (or pass --token)"
            print(f"pgwarden: cannot read /{name} from {args.admin}: {why}", file=sys.stderr)
            return 1
        answers[name] = entries
    view = build_view(answers["advice"], answers["fingerprints"])
    text = render_report(view, args.format, args.application)
    if args.output is None:  # text the client sent that was not UTF-8 comes out replaced
        sys.stdout.write(text.encode("utf-8", "replace").decode("utf-8"))
        return 0
    with open(args.output, "w", encoding="utf-8", errors="replace") as out:
        out.write(text)
    print(f"wrote the {args.format} report ({len(view.items)} advice) to {args.output}")
    return 0


@_prints
def cmd_clients(args: argparse.Namespace) -> int:
    try:
        status, payload = _admin_call(args.admin, "/clients")
    except OSError as exc:
        print(f"pgwarden: cannot read clients from {args.admin}: {exc}", file=sys.stderr)
        return 1
    clients = payload.get("clients")
    if status != 200 or not isinstance(clients, list):
        print(f"pgwarden: {args.admin} gave no client list (HTTP {status})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(format_clients(clients), end="")
    return 0


@_prints
def cmd_terminate(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not token:
        print(
            f"pgwarden: terminate needs the admin token of the running pgwarden: "
            f"set {ADMIN_TOKEN_ENV} (or pass --token)",
            file=sys.stderr,
        )
        return 2
    path = f"/clients/{urllib.parse.quote(args.client, safe=':')}/terminate"
    try:
        status, payload = _admin_call(args.admin, path, token, post=True)
    except OSError as exc:
        print(f"pgwarden: cannot reach {args.admin}: {exc}", file=sys.stderr)
        return 1
    ended = payload.get("terminated")
    if status == 200 and isinstance(ended, dict):
        print(
            f"terminated client {ended['id']} (backend pid {ended['pid'] or '-'}, "
            f"{ended['user'] or '-'}@{ended['database'] or '-'} from {ended['client']})"
        )
        return 0
    reason = payload.get("error") or (
        "no such endpoint (a pgwarden older than this command?)"
        if status == 404
        else f"HTTP {status}"
    )
    print(f"pgwarden: cannot terminate {args.client}: {reason}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cmd_run,
        "check-config": cmd_check_config,
        "advice": cmd_advice,
        "report": cmd_report,
        "clients": cmd_clients,
        "terminate": cmd_terminate,
        "demo": cmd_demo,
    }
    return commands[args.command](args)
