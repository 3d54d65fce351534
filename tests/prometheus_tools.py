"""promtool and prometheus for the tests: found on PATH, or installed from the Debian
package `prometheus` when missing and this runs as root with apt-get at hand.

A test that needs them calls require("promtool") or require("prometheus"), which skips
it, with a reason saying why, only when the package cannot be installed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

__all__ = ["find_tool", "install_problem", "require"]

PACKAGE = "prometheus"
TOOLS = ("promtool", "prometheus")
_APT_TIMEOUT = 900


def find_tool(name: str) -> str | None:
    """The path of `name` on PATH or in /usr/bin (where the Debian package puts it)."""
    return shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        timeout=_APT_TIMEOUT,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdin=subprocess.DEVNULL,
    )


@functools.cache
def install_problem() -> str | None:
    """None once promtool and prometheus are there (installing them if need be), else
    why they are not; tried once per test run."""
    if all(find_tool(tool) for tool in TOOLS):
        return None
    if os.geteuid() != 0:
        return f"promtool/prometheus missing and not root to `apt-get install {PACKAGE}`"
    if shutil.which("apt-get") is None:
        return "promtool/prometheus missing and no apt-get to install them"
    install = ("install", "-y", "-qq", "--no-install-recommends", PACKAGE)
    try:
        result = _apt(*install)
        if result.returncode != 0:  # an outdated or empty package list: refresh it once
            _apt("update", "-qq")
            result = _apt(*install)
    except subprocess.TimeoutExpired:
        return f"`apt-get install {PACKAGE}` did not finish in {_APT_TIMEOUT}s"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"could not install {PACKAGE} with apt-get (exit {result.returncode}): {detail[0]}"
    missing = [tool for tool in TOOLS if find_tool(tool) is None]
    return f"{', '.join(missing)} not found after installing {PACKAGE}" if missing else None


def require(tool: str) -> str:
    """The path of `tool` (promtool or prometheus); skips the calling test if it cannot be
    had."""
    problem = install_problem()
    path = find_tool(tool)
    if path is None:
        pytest.skip(problem or f"{tool} not found after installing {PACKAGE}")
    return path
