"""The analysis microbenchmark still runs and still counts every transaction it times."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.proxy import REPO_ROOT


@pytest.mark.parametrize("mode", ["prepared", "simple"])
def test_analysis_benchmark_attributes_every_transaction(mode: str) -> None:
    result = subprocess.run(
        [sys.executable, "bench/analysis.py", "--mode", mode, "--transactions", "2000"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # it exits with an error when the tracker did not count all 2000 statements
    assert result.returncode == 0, result.stderr
    found = re.fullmatch(
        rf"{mode}: (\d+\.\d\d) µs of analysis per transaction \((.+)\)\n", result.stdout
    )
    assert found is not None, result.stdout
    assert float(found.group(1)) > 0


def test_checkout_targets_name_another_tree_with_its_own_venv(tmp_path: Path) -> None:
    """`--checkout NAME=DIR[:YAML]` runs DIR's pgwarden; a tree without a .venv is refused."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.pop(0)
    variant = tmp_path / "off.yaml"
    variant.write_text("analysis: {enabled: false}\n")
    args = bench_run.parse_args(
        ["--checkout", f"before={REPO_ROOT}", "--checkout", f"before-off={REPO_ROOT}:{variant}"]
    )
    assert args.checkout == [("before", REPO_ROOT, None), ("before-off", REPO_ROOT, variant)]
    assert bench_run._python(REPO_ROOT) == sys.executable
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--checkout", f"x={tmp_path}"])  # no .venv there
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--checkout", f"pgwarden={REPO_ROOT}"])  # a built-in target


@pytest.mark.parametrize(("mode", "analysis"), [("prepared", "on"), ("simple", "off")])
def test_relay_benchmark_drives_a_session_to_ready_and_times_it(mode: str, analysis: str) -> None:
    """bench/relay.py feeds pgbench's messages through a real Session; it asserts the
    session reached READY, so a change to startup that broke it would fail here."""
    result = subprocess.run(
        [sys.executable, "bench/relay.py", "--mode", mode, "--analysis", analysis, "-t", "500"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = re.fullmatch(
        rf"{mode}, analysis {analysis}: (\d+\.\d\d) µs per transaction \((\w+)\)\n",
        result.stdout,
    )
    assert found is not None, result.stdout
    assert float(found.group(1)) > 0


def test_latency_is_read_from_pgbench_transaction_logs_and_compared_to_direct(
    tmp_path: Path,
) -> None:
    """p50/p99 come from every line of pgbench -l's logs (one per thread); a proxy's added
    latency is its per-round difference to direct, set beside PgBouncer's."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.pop(0)
    # client_id transaction_no latency_us script_no epoch epoch_us
    (tmp_path / "tx.123").write_text("".join(f"0 {i} {100 + i} 0 1 2\n" for i in range(100)))
    (tmp_path / "tx.123.1").write_text("0 0 5000 0 1 2\n")
    p50, p99 = bench_run.latency_percentiles(tmp_path)
    assert p50 == 150 and p99 == 199
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench_run.latency_percentiles(empty) == (None, None)

    def run(target: str, p50: float, rnd: int = 1) -> object:
        return bench_run.Run(
            round=rnd,
            mode="prepared",
            clients=1,
            target=target,
            seconds=1.0,
            tps=1.0,
            p50_us=p50,
            p99_us=p50 * 2,
        )

    runs = [run("direct", 100), run("pgwarden", 160), run("pgbouncer", 140)]
    args = bench_run.parse_args(["--clients", "1", "--modes", "prepared", "--rounds", "1"])
    rows = bench_run.summarize(runs, ["direct", "pgwarden", "pgbouncer"], args)
    by_target = {row["target"]: row for row in rows}
    assert by_target["pgwarden"]["added_p50_us"] == 60
    assert by_target["pgbouncer"]["added_p99_us"] == 80
    assert by_target["direct"]["added_p50_us"] is None
    table = bench_run.render_latency(rows, markdown=False)
    pgwarden_line = next(line for line in table.splitlines() if "pgwarden" in line)
    assert pgwarden_line.split()[-1] == "1.50"  # 60 µs added vs PgBouncer's 40
