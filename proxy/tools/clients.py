"""The sessions of a running pgwarden rendered for people: the table `pgwarden clients`
prints from GET /clients, one line per session, like PgBouncer's SHOW CLIENTS."""

from __future__ import annotations

from typing import Any

__all__ = ["format_clients"]

_HEADER = ("id", "pid", "state", "age", "xact", "query", "user@database", "app", "client")
_RIGHT = frozenset(("id", "pid", "age", "xact", "query"))  # numbers, aligned right
_STATEMENT_WIDTH = 80


def _duration(seconds: float | None) -> str:
    """A short human duration: 0.42s, 12s, 5m03s, 2h04m, 3d04h; "-" when unknown."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}{whole % size // sub_size:02d}{sub}"
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_clients(clients: list[dict[str, Any]]) -> str:
    if not clients:
        return "No clients connected.\n"
    rows = [
        (
            str(c["id"]),
            str(c["pid"] or "-"),
            c["state"],
            _duration(c["age_s"]),
            _duration(c["transaction_age_s"]),
            _duration(c["statement_age_s"]),
            f"{c['user'] or '-'}@{c['database'] or '-'}",
            c["application_name"] or "-",
            c["client"],
        )
        for c in clients
    ]
    widths = [max(len(row[i]) for row in (_HEADER, *rows)) for i in range(len(_HEADER))]

    def line(cells: tuple[str, ...], statement: str) -> str:
        aligned = (
            cell.rjust(width) if name in _RIGHT else cell.ljust(width)
            for name, cell, width in zip(_HEADER, cells, widths, strict=True)
        )
        return "  ".join((*aligned, statement)).rstrip()

    lines = [line(_HEADER, "statement")]
    for row, client in zip(rows, clients, strict=True):
        lines.append(line(row, _short(client["statement"] or "-", _STATEMENT_WIDTH)))
    return "\n".join(lines) + "\n"
