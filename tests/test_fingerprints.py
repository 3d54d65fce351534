"""proxy.fingerprints.FingerprintStats: bounded series, counters that never go down,
promotion of the costliest, the ranked snapshot behind /fingerprints (per client, with
filters), the SQL of each series in pgwarden_fingerprint_info, bounded memory."""

from __future__ import annotations

import pytest

from proxy.fingerprints import OTHER, STATEMENT_LABEL, Client, FingerprintStats

Series = dict[tuple[str, str], float]  # (sample name, fingerprint) -> value
WEB: Client = ("shop", "app", "web")
WORKER: Client = ("shop", "app", "worker")


def collect(stats: FingerprintStats) -> Series:
    """The counters' samples (pgwarden_fingerprint_info has its own test)."""
    return {
        (sample.name, sample.labels["fingerprint"]): sample.value
        for family in stats.collect()
        for sample in family.samples
        if sample.name != "pgwarden_fingerprint_info"
    }


def fingerprints(series: Series) -> set[str]:
    return {fp for _, fp in series}


def record(stats: FingerprintStats, fp: str, times: int = 1, seconds: float = 0.001) -> None:
    for _ in range(times):
        stats.record(fp, f"SELECT {fp} WHERE id = $1", "SELECT", seconds, WEB)


def test_series_are_bounded_and_the_rest_is_other() -> None:
    stats = FingerprintStats(max_series=3)
    for i in range(10):
        record(stats, f"fp{i}", times=i + 1)
    series = collect(stats)
    assert fingerprints(series) == {"fp0", "fp1", "fp2", OTHER}  # the first seen get a series
    calls = {fp: v for (name, fp), v in series.items() if name.endswith("queries_total")}
    assert calls[OTHER] == sum(range(4, 11))
    assert sum(calls.values()) == sum(range(1, 11))  # nothing lost, nothing counted twice
    seconds = {fp: v for (name, fp), v in series.items() if name.endswith("seconds_total")}
    assert seconds[OTHER] == pytest.approx(sum(range(4, 11)) * 0.001)
    assert {name for name, _ in series} == {
        "pgwarden_fingerprint_queries_total",
        "pgwarden_fingerprint_duration_seconds_total",
    }


def test_raising_the_limit_promotes_the_costliest_and_no_series_decreases() -> None:
    stats = FingerprintStats(max_series=2)
    record(stats, "a")
    record(stats, "b")
    record(stats, "costly", times=5, seconds=1.0)
    record(stats, "cheap", times=50, seconds=0.0001)
    record(stats, "middling", times=2, seconds=0.5)
    first = collect(stats)
    assert fingerprints(first) == {"a", "b", OTHER}

    stats.max_series = 4  # as a reload of metrics.max_fingerprints does
    second = collect(stats)
    assert fingerprints(second) == {"a", "b", "costly", "middling", OTHER}  # by total time
    record(stats, "costly", times=3, seconds=1.0)
    record(stats, "cheap", times=7)
    record(stats, "a")
    third = collect(stats)
    assert len(fingerprints(third)) == stats.max_series + 1

    for before, after in ((first, second), (second, third)):
        for key, value in before.items():
            assert after[key] >= value, f"{key} went down from {value} to {after[key]}"
    # counts made before the promotion stay in other; the new series counts from then on
    assert third[("pgwarden_fingerprint_queries_total", "costly")] == 3
    assert third[("pgwarden_fingerprint_queries_total", OTHER)] == 5 + 50 + 2 + 7


def test_lowering_the_limit_keeps_existing_series() -> None:
    stats = FingerprintStats(max_series=3)
    for fp in ("a", "b", "c"):
        record(stats, fp)
    stats.max_series = 1
    record(stats, "d")
    record(stats, "a")
    series = collect(stats)
    assert fingerprints(series) == {"a", "b", "c", OTHER}  # a series is never taken away
    assert series[("pgwarden_fingerprint_queries_total", "a")] == 2
    assert series[("pgwarden_fingerprint_queries_total", OTHER)] == 1


def test_snapshot_ranks_by_total_time_with_the_sql() -> None:
    stats = FingerprintStats(max_series=1)
    stats.record("fast", "SELECT $1", "SELECT", 0.001, WEB)
    stats.record("slow", "UPDATE t SET x = $1", "UPDATE", 0.5, WEB)
    for _ in range(3):
        stats.record("many", "SELECT * FROM t WHERE id = $1", "SELECT", 0.2, WEB)
    snapshot = stats.snapshot()
    assert [e["fingerprint"] for e in snapshot] == ["many", "slow", "fast"]
    many, slow, fast = snapshot
    assert many == {
        "fingerprint": "many",
        "statement": "SELECT * FROM t WHERE id = $1",
        "command": "SELECT",
        "database": "shop",
        "user": "app",
        "application_name": "web",
        "calls": 3,
        "total_time_ms": 600.0,
        "rows": 0,
        "errors": 0,
        "series": False,
    }
    assert slow["command"] == "UPDATE" and slow["calls"] == 1
    assert fast["series"] is True  # the first seen took the only series


def test_snapshot_counts_rows_and_errors_per_client() -> None:
    """What the advice page's top statements show beside calls and time."""
    stats = FingerprintStats()
    stats.record("q", "SELECT * FROM t WHERE id = $1", "SELECT", 0.01, WEB, rows=5)
    stats.record("q", "SELECT * FROM t WHERE id = $1", "SELECT", 0.01, WEB, ok=False)
    stats.record("q", "SELECT * FROM t WHERE id = $1", "SELECT", 0.01, WEB, rows=2)
    (row,) = stats.snapshot()
    assert (row["calls"], row["rows"], row["errors"]) == (3, 7, 1)


def test_tracked_fingerprints_are_bounded() -> None:
    stats = FingerprintStats(max_series=2, max_tracked=20)
    record(stats, "kept-1", seconds=0.0)  # cheapest of all, but labelled: never forgotten
    record(stats, "kept-2", seconds=0.0)
    for i in range(500):
        record(stats, f"fp{i}", seconds=0.001 * (i % 7 + 1))
    snapshot = stats.snapshot()
    assert len(snapshot) <= 20
    assert {"kept-1", "kept-2"} <= {e["fingerprint"] for e in snapshot}
    series = collect(stats)
    assert fingerprints(series) == {"kept-1", "kept-2", OTHER}
    assert series[("pgwarden_fingerprint_queries_total", OTHER)] == 500  # forgotten, still counted
    assert FingerprintStats(max_series=200).max_tracked >= 1000  # the default has room


def test_snapshot_has_a_row_per_client_and_filters_by_client() -> None:
    stats = FingerprintStats(max_series=10)
    for _ in range(3):
        stats.record("lookup", "SELECT * FROM t WHERE id = $1", "SELECT", 0.1, WEB)
    stats.record("lookup", "SELECT * FROM t WHERE id = $1", "SELECT", 0.5, WORKER)
    stats.record("insert", "INSERT INTO t VALUES ($1)", "INSERT", 0.01, WORKER)
    rows = [(r["fingerprint"], r["application_name"], r["calls"]) for r in stats.snapshot()]
    assert rows == [("lookup", "worker", 1), ("lookup", "web", 3), ("insert", "worker", 1)]
    assert [r["fingerprint"] for r in stats.snapshot({"application_name": "web"})] == ["lookup"]
    assert len(stats.snapshot({"database": "shop", "user": "app"})) == 3
    assert stats.snapshot({"application_name": "nobody"}) == []
    # Prometheus sees one series per fingerprint, every client summed
    assert collect(stats)[("pgwarden_fingerprint_queries_total", "lookup")] == 4


def test_client_rows_are_bounded_and_the_sums_stay() -> None:
    stats = FingerprintStats(max_series=2, max_tracked=20)
    for i in range(200):
        client = ("shop", "app", f"app-{i}")
        stats.record("lookup", "SELECT $1", "SELECT", 0.001 * (i % 7 + 1), client)
    assert len(stats.snapshot()) <= 20
    assert collect(stats)[("pgwarden_fingerprint_queries_total", "lookup")] == 200


def test_fingerprint_info_names_the_sql_of_each_series_that_ran_cut_and_encodable() -> None:
    stats = FingerprintStats(max_series=3)
    stats.record("failed", 'SELECT "secret" FROM t', "SELECT", 0.1, WEB, ok=False)
    long = "SELECT " + ", ".join(f"c{i}" for i in range(100)) + ' FROM "a ""b"" \\ c"\nWHERE x = $1'
    stats.record("long", long, "SELECT", 0.1, WEB)
    stats.record("undecodable", "SELECT $1 AS \udcff", "SELECT", 0.1, WEB)  # surrogateescape
    stats.record("folded", "SELECT 3", "SELECT", 0.1, WEB)  # no series of its own
    (family,) = [f for f in stats.collect() if f.name == "pgwarden_fingerprint"]
    info = {s.labels["fingerprint"]: s for s in family.samples}
    assert set(info) == {"long", "undecodable"}  # not SQL that only ever failed
    assert info["long"].name == "pgwarden_fingerprint_info" and info["long"].value == 1
    assert info["long"].labels["statement"] == long[:STATEMENT_LABEL]
    assert info["undecodable"].labels["statement"] == "SELECT $1 AS ?"
