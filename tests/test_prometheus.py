"""pgwarden's metrics seen by Prometheus' own tools: promtool's lint of a live scrape, the
alert rules in deploy/prometheus checked and unit-tested, and a real Prometheus server
scraping pgwarden, answering the queries of the issue, the alert rules and every query
of the Grafana dashboard in deploy/grafana."""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.tools.pgcluster import free_port
from tests.prometheus_tools import require
from tests.support.metrics_workload import light_queries
from tests.support.proxy import REPO_ROOT, ProxyProcess
from tests.support.util import wait_until

DEPLOY = REPO_ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "tests" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "pgwarden.json"
ALERT_NAMES = {
    "PgwardenDown",
    "PgwardenErrorRatioHigh",
    "PgwardenStatementTimeoutsSpiking",
    "PgwardenNPlusOneAdvice",
    "PgwardenUpstreamUnreachable",
    "PgwardenStartupsRefused",
    "PgwardenClientConnectionsNearLimit",
    "PgwardenLogLinesDropped",
}
QUERY_RATE = "rate(pgwarden_queries_total[1m])"
QUERY_P95 = (
    "histogram_quantile(0.95, sum by (le) (rate(pgwarden_query_duration_seconds_bucket[1m])))"
)
# Grafana's variables, as the test evaluates the dashboard's queries
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1m",
    "${instance}": ".*",
    "$instance": ".*",
}

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="session")
def promtool() -> str:
    return require("promtool")


def run_promtool(promtool: str, *args: str, stdin: str | None = None) -> tuple[int, str]:
    """(exit code, stdout and stderr) of `promtool ARGS`."""
    result = subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    return result.returncode, result.stdout + result.stderr


# ------------------------------------------------------------------------ promtool


def test_promtool_check_metrics_is_clean(metrics_proxy: ProxyProcess, promtool: str) -> None:
    status, text = metrics_proxy.http_get("/metrics")
    assert status == 200
    empty = [f.name for f in text_string_to_metric_families(text) if not f.samples]
    assert not empty, f"the workload left families without samples: {empty}"
    code, output = run_promtool(promtool, "check", "metrics", stdin=text)
    assert code == 0 and not output.strip(), f"promtool check metrics (exit {code}):\n{output}"


def test_promtool_check_metrics_flags_bad_names(promtool: str) -> None:
    """The lint above can fail: promtool rejects a counter without _total."""
    bad = "# HELP pgwarden_oops A counter.\n# TYPE pgwarden_oops counter\npgwarden_oops 1\n"
    code, output = run_promtool(promtool, "check", "metrics", stdin=bad)
    assert code != 0 and "_total" in output, output


def test_alert_rules_are_valid_and_complete(promtool: str) -> None:
    code, output = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert code == 0, output
    rules = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert {rule["alert"] for rule in rules} == ALERT_NAMES
    for rule in rules:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_alert_rules_unit_tests_pass(promtool: str) -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == ALERT_NAMES, "every alert needs a case where it fires"
    code, output = run_promtool(promtool, "test", "rules", str(ALERTS_TEST))
    assert code == 0 and "SUCCESS" in output, output


# ---------------------------------------------------------------- a real Prometheus


class Prometheus:
    """A Prometheus server started for the tests, and its HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def get(self, path: str, **params: str) -> dict[str, Any]:
        """The decoded JSON answer of GET `path`, error answers (4xx, 5xx) included."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with _OPENER.open(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expr: str) -> dict[str, Any]:
        """/api/v1/query for `expr` now: {"status": ..., "data": ...} or an error."""
        return self.get("/api/v1/query", query=expr)

    def values(self, expr: str) -> list[float]:
        """The sample values of an instant vector query; raises on an error answer."""
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        return [float(item["value"][1]) for item in answer["data"]["result"]]

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


@pytest.fixture(scope="module")
def prometheus(
    metrics_proxy: ProxyProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """Prometheus scraping `metrics_proxy` every second, with the alert rules of deploy/
    loaded as the compose stack loads them, while statements keep flowing through pgwarden;
    yielded once rates and quantiles of pgwarden's metrics have values."""
    binary = require("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    admin = metrics_proxy.admin_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [f"{DEPLOY / 'prometheus'}/alerts*.yaml"],  # the glob of prometheus.yml
        "scrape_configs": [{"job_name": "pgwarden", "static_configs": [{"targets": [admin]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            with psycopg.connect(metrics_proxy.dsn(), autocommit=True) as conn:
                while not stop.is_set():
                    light_queries(conn)
                    stop.wait(0.05)
        except BaseException as error:  # reported by the tests that need the traffic
            errors.append(error)

    thread = threading.Thread(target=traffic, name="pgwarden-traffic", daemon=True)
    thread.start()
    try:

        def has_values() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited ({process.returncode}):\n{server.log_tail()}"
                )
            with contextlib.suppress(OSError, ValueError):
                rates = server.values(f"sum({QUERY_RATE})")
                p95 = server.values(QUERY_P95)
                return bool(rates and rates[0] > 0 and p95 and math.isfinite(p95[0]))
            return False

        try:
            wait_until(has_values, 30, 0.25, message="rates and quantiles in Prometheus")
        except AssertionError as error:
            raise AssertionError(f"{error}; traffic errors {errors}\n{server.log_tail()}") from None
        yield server
    finally:
        stop.set()
        thread.join(5)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert not errors, f"statements through pgwarden failed: {errors}"


def test_prometheus_rates_and_quantiles(prometheus: Prometheus) -> None:
    assert prometheus.values('up{job="pgwarden"}') == [1.0]
    by_command = {
        item["metric"]["command"]: float(item["value"][1])
        for item in prometheus.query(QUERY_RATE)["data"]["result"]
    }
    assert by_command.get("SELECT", 0) > 0, by_command
    (p95,) = prometheus.values(QUERY_P95)
    assert 0 < p95 < 5, p95  # the traffic runs short statements (a 2 ms sleep at most)
    assert prometheus.values("sum(rate(pgwarden_fingerprint_queries_total[1m]))")[0] > 0
    assert prometheus.values("pgwarden_client_connections_limit") == [1000.0]


def test_prometheus_loads_and_evaluates_the_alert_rules(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_until(evaluated, 10, 0.25, message="every alert rule evaluated once")
    assert {rule["name"] for rule in rules} == ALERT_NAMES
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, broken
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    assert "PgwardenDown" not in firing and "PgwardenUpstreamUnreachable" not in firing


# ------------------------------------------------------------------ Grafana dashboard


def dashboard_exprs(node: Any) -> list[str]:
    """Every `expr` in the dashboard JSON, wherever it sits (panels, rows, targets)."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in dashboard_exprs(value)]
    if isinstance(node, list):
        return [e for value in node for e in dashboard_exprs(value)]
    return []


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced as the test evaluates it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def test_grafana_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
    text = json.dumps(panels)
    for metric in (
        "pgwarden_queries_total",
        "pgwarden_query_duration_seconds_bucket",
        "pgwarden_fingerprint_duration_seconds_total",
        "pgwarden_errors_total",
        "pgwarden_statement_timeouts_total",
        "pgwarden_advice_total",
        "pgwarden_client_connections",
        "pgwarden_server_connections",
        "pgwarden_client_connections_limit",
    ):
        assert metric in text, f"no panel shows {metric}"
    quantiles = {
        q for e in dashboard_exprs(panels) for q in re.findall(r"histogram_quantile\((0\.\d+)", e)
    }
    assert quantiles == {"0.5", "0.95", "0.99"}
    (table,) = [p for p in panels if "topk(" in json.dumps(p["targets"])]
    assert table["type"] == "table" and "/fingerprints" in table["description"]


def test_grafana_dashboard_queries_evaluate(
    prometheus: Prometheus, metrics_proxy: ProxyProcess
) -> None:
    exposed = {
        sample.name
        for family in text_string_to_metric_families(metrics_proxy.http_get("/metrics")[1])
        for sample in family.samples
    }
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 10
    empty = []
    for expr in map(as_promql, exprs):
        unknown = set(re.findall(r"\bpgwarden_[a-z_]+", expr)) - exposed
        assert not unknown, f"{expr} uses metrics pgwarden does not expose: {unknown}"
        answer = prometheus.query(expr)
        assert answer["status"] == "success", (expr, answer)
        if not answer["data"]["result"]:
            empty.append(expr)
    assert not empty, f"queries without data: {empty}"
