"""Advice rendered for people: the ranked table `pgwarden advice` and `pgwarden demo` print."""

from __future__ import annotations

import textwrap
from typing import Any

__all__ = ["format_advice"]


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_advice(advice: list[dict[str, Any]]) -> str:
    if not advice:
        return "No advice yet: pgwarden has not seen a pattern worth fixing.\n"
    lines = [f"{'#':>2}  {'severity':8}  {'rule':16}  {'count':>5}  {'seen':>4}  statement"]
    for i, a in enumerate(advice, 1):
        lines.append(
            f"{i:>2}  {a['severity']:8}  {a['rule']:16}  {a['count']:>5}  "
            f"{a.get('occurrences', 1):>4}  {_short(a['statement'], 60)}"
        )
    lines.append("")
    for i, a in enumerate(advice, 1):
        app = a.get("application_name")  # advice is per application: say whose
        where = f"{a['database']}, application {app}" if app else a["database"]
        lines.append(f"[{i}] {a['rule']} on {', '.join(a['tables']) or '-'} ({where})")
        lines.append(f"    statement: {_short(a['statement'], 200)}")
        source = a.get("source")
        if source:
            lines.append(
                f"    values from: {source['column']} of {_short(source['statement'], 120)}"
            )
        lines.extend(
            textwrap.wrap(a["suggestion"], 96, initial_indent="    ", subsequent_indent="    ")
        )
        evidence = a.get("evidence")
        if evidence:
            figures = ", ".join(f"{name} {value}" for name, value in evidence.items())
            lines.extend(
                textwrap.wrap(
                    f"evidence: {figures}", 96, initial_indent="    ", subsequent_indent="      "
                )
            )
        if a.get("suggested_sql"):
            lines.append(f"    suggested SQL: {a['suggested_sql']}")
        lines.append("")
    return "\n".join(lines)
