"""The analysis microbenchmark still runs and still counts every transaction it times."""

from __future__ import annotations

import re
import subprocess
import sys

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
