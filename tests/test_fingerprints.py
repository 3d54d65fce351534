"""proxy.fingerprints.FingerprintStats: bounded series, counters that never go down,
promotion of the costliest, the ranked snapshot behind /fingerprints, bounded memory."""

from __future__ import annotations

import pytest

from proxy.fingerprints import OTHER, FingerprintStats

Series = dict[tuple[str, str], float]  # (sample name, fingerprint) -> value


def collect(stats: FingerprintStats) -> Series:
    return {
        (sample.name, sample.labels["fingerprint"]): sample.value
        for family in stats.collect()
        for sample in family.samples
    }


def fingerprints(series: Series) -> set[str]:
    return {fp for _, fp in series}


def record(stats: FingerprintStats, fp: str, times: int = 1, seconds: float = 0.001) -> None:
    for _ in range(times):
        stats.record(fp, f"SELECT {fp} WHERE id = $1", "SELECT", seconds)


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
    stats.record("fast", "SELECT $1", "SELECT", 0.001)
    stats.record("slow", "UPDATE t SET x = $1", "UPDATE", 0.5)
    for _ in range(3):
        stats.record("many", "SELECT * FROM t WHERE id = $1", "SELECT", 0.2)
    snapshot = stats.snapshot()
    assert [e["fingerprint"] for e in snapshot] == ["many", "slow", "fast"]
    many, slow, fast = snapshot
    assert many == {
        "fingerprint": "many",
        "statement": "SELECT * FROM t WHERE id = $1",
        "command": "SELECT",
        "calls": 3,
        "total_time_ms": 600.0,
        "series": False,
    }
    assert slow["command"] == "UPDATE" and slow["calls"] == 1
    assert fast["series"] is True  # the first seen took the only series


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
