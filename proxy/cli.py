"""The `pgwarden` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any

import yaml

from proxy import __version__
from proxy.config import ConfigError, Settings, load_settings
from proxy.logs import configure_logging, get_logger
from proxy.tools.report import format_advice

__all__ = ["main"]


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

    sub.add_parser("demo", help="a throwaway PostgreSQL, pgwarden and a leaky app, end to end")
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
        from proxy.server import ProxyServer

        try:
            server = ProxyServer(settings, reload=reload)
            await server.start()
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

    return _run_loop(main)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, {})
    except ConfigError as exc:
        print(f"pgwarden: config error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK")
    print(yaml.safe_dump(settings.to_dict(), sort_keys=False), end="")
    return 0


def cmd_advice(args: argparse.Namespace) -> int:
    url = args.admin.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    try:
        with urllib.request.urlopen(f"{url}/advice", timeout=10) as response:
            payload = json.load(response)
    except (OSError, ValueError) as exc:
        print(f"pgwarden: cannot read advice from {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(format_advice(payload["advice"]), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.tools.demo import run_demo

    return run_demo()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cmd_run,
        "check-config": cmd_check_config,
        "advice": cmd_advice,
        "demo": cmd_demo,
    }
    return commands[args.command](args)
