"""README's metrics reference lists exactly the metric families a live pgwarden exposes,
with their types and label names, so the table cannot drift from the code; and the
limit gauge follows the config."""

from __future__ import annotations

import re
import signal

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartProxy
from tests.support.proxy import REPO_ROOT, ProxyProcess
from tests.support.util import wait_until

START, END = "<!-- metrics-table:start -->", "<!-- metrics-table:end -->"
Row = tuple[str, frozenset[str]]  # (type, label names) of a family, by exposed name


def readme_table() -> dict[str, Row]:
    """The rows of the README table between the markers: name -> (type, labels)."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(START) + len(START) : text.index(END)]
    rows: dict[str, Row] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue  # the header, its rule, prose
        name = cells[0].strip("`")
        assert name not in rows, f"{name} is listed twice"
        rows[name] = (cells[1], frozenset(re.findall(r"`([^`]+)`", cells[2])))
    return rows


def exposed_families(text: str) -> dict[str, Row]:
    """The families of an exposition: name as exposed (counters with _total) -> (type,
    labels); histogram buckets' `le` and prometheus_client's `_created` gauges left out."""
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    exposed: dict[str, Row] = {}
    for family in families:
        base = family.name.removesuffix("_created")
        if family.name.endswith("_created") and base in names:
            continue
        empty = not family.samples
        assert not empty, f"{family.name} has no samples: extend tests/support/metrics_workload.py"
        labels = frozenset(k for s in family.samples for k in s.labels) - {"le"}
        name = f"{family.name}_total" if family.type == "counter" else family.name
        exposed[name] = (family.type, labels)
    return exposed


def test_readme_metrics_table_matches_the_exposition(metrics_proxy: ProxyProcess) -> None:
    status, text = metrics_proxy.http_get("/metrics")
    assert status == 200
    exposed = exposed_families(text)
    documented = readme_table()
    assert len(exposed) > 20, sorted(exposed)
    assert sorted(set(exposed) - set(documented)) == [], "exposed but not in README.md"
    assert sorted(set(documented) - set(exposed)) == [], "in README.md but not exposed"
    wrong = {
        name: {"README": documented[name], "exposed": row}
        for name, row in exposed.items()
        if documented[name] != row
    }
    assert not wrong, f"type or labels differ: {wrong}"


def test_the_table_parser_sees_a_drift() -> None:
    """A renamed label or a missing family is caught, not silently accepted."""
    text = (
        "# HELP pgwarden_x_total X.\n# TYPE pgwarden_x_total counter\n"
        'pgwarden_x_total{rule="a"} 1.0\n'
        "# HELP pgwarden_h H.\n# TYPE pgwarden_h histogram\n"
        'pgwarden_h_bucket{command="SELECT",le="+Inf"} 1.0\n'
        'pgwarden_h_count{command="SELECT"} 1.0\npgwarden_h_sum{command="SELECT"} 0.1\n'
        "# HELP pgwarden_h_created H.\n# TYPE pgwarden_h_created gauge\n"
        'pgwarden_h_created{command="SELECT"} 1.7e9\n'
    )
    assert exposed_families(text) == {
        "pgwarden_x_total": ("counter", frozenset({"rule"})),
        "pgwarden_h": ("histogram", frozenset({"command"})),
    }
    documented = readme_table()
    assert documented["pgwarden_query_duration_seconds"] == ("histogram", frozenset({"command"}))
    assert documented["pgwarden_advice_total"] == ("counter", frozenset({"rule", "severity"}))
    assert documented["pgwarden_client_connections"] == ("gauge", frozenset())


def gauge(proxy: ProxyProcess, name: str) -> float | None:
    """The value of an unlabelled gauge in pgwarden's /metrics, None when absent."""
    for family in text_string_to_metric_families(proxy.http_get("/metrics")[1]):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def test_client_connections_limit_follows_the_config(proxy_factory: StartProxy) -> None:
    proxy = proxy_factory({"limits": {"max_client_connections": 50}})
    assert gauge(proxy, "pgwarden_client_connections_limit") == 50
    config = yaml.safe_load(proxy.config_path.read_text())
    config["limits"]["max_client_connections"] = 7
    proxy.config_path.write_text(yaml.safe_dump(config))
    proxy.signal(signal.SIGHUP)
    wait_until(
        lambda: gauge(proxy, "pgwarden_client_connections_limit") == 7,
        message="the limit gauge to follow the reloaded config",
    )
