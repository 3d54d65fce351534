"""The compiled analysis modules load only when they are current, else the sources run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from proxy import native
from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = native.EXTENSION_SUFFIX
# Imports the whole analysis (detectors, metrics, analyzer come with the inspector), then
# says how it runs and which of the package's modules were loaded compiled.
PROBE = """
import sys, proxy, proxy.inspector
print(proxy.native.MODE)
print(" ".join(sorted(
    name for name, module in sys.modules.items()
    if name.startswith("proxy.") and (getattr(module, "__file__", None) or "").endswith(".so")
)))
"""
# `make` builds before it tests; pytest run by hand after an edit finds the build stale.
built = pytest.mark.skipif(
    not native.compiled_modules() or bool(native.changed_sources()),
    reason="no current build (PGWARDEN_COMPILE=0, no C compiler, or sources edited since)",
)


def probe(path: Path, **env: str) -> tuple[str, list[str]]:
    """MODE and the compiled modules loaded, in a fresh interpreter on `path`."""
    environ = {k: v for k, v in os.environ.items() if k != "PGWARDEN_PURE"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=path,
        env=environ | {"PYTHONPATH": str(path)} | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return out[0], out[1].split()


def test_finds_compiled_modules_and_the_sources_changed_since(tmp_path: Path) -> None:
    package = tmp_path / "proxy"
    (package / "sub").mkdir(parents=True)
    kept, edited = package / "a.py", package / "sub" / "b.py"
    for source in (kept, edited):
        source.write_text("x = 1\n")
        source.with_name(source.stem + SUFFIX).write_bytes(b"")
    (package / f"orphan{SUFFIX}").write_bytes(b"")  # no source beside it: not ours
    assert native.compiled_modules(package) == [kept, edited]
    # no record of what was compiled: every compiled module counts as changed
    assert native.changed_sources(package) == ["proxy/a.py", "proxy/sub/b.py"]

    digest = hashlib.sha256(b"x = 1\n").hexdigest()
    record = {"proxy/a.py": digest, "proxy/sub/b.py": digest}
    (package / "native.json").write_text(json.dumps(record))
    assert native.changed_sources(package) == []
    edited.write_text("x = 2\n")
    assert native.changed_sources(package) == ["proxy/sub/b.py"]


@built
def test_a_current_build_runs_compiled() -> None:
    mode, compiled = probe(ROOT)
    assert mode == "compiled"
    expected = {"proxy.tracking.statements", "proxy.inspector", "proxy.detectors.n_plus_one"}
    assert expected <= set(compiled)


@built
def test_pure_runs_every_module_from_source() -> None:
    mode, compiled = probe(ROOT, PGWARDEN_PURE="1")
    assert mode == "interpreted (PGWARDEN_PURE=1)"
    assert compiled == []  # none at all: a compiled module would call the others natively


@built
def test_a_source_edited_after_the_build_runs_interpreted(tmp_path: Path) -> None:
    copy = tmp_path / "checkout"
    copy.mkdir()
    shutil.copytree(ROOT / "proxy", copy / "proxy")
    for shared in ROOT.glob(f"*__mypyc{SUFFIX}"):
        shutil.copy2(shared, copy)
    assert probe(copy)[0] == "compiled"

    with (copy / "proxy" / "tracking" / "statements.py").open("a") as source:
        source.write("# edited\n")
    mode, compiled = probe(copy)
    assert mode.startswith("interpreted (changed since compiled: proxy/tracking/statements.py")
    assert compiled == []


def test_build_info_says_how_analysis_runs() -> None:
    exposed = generate_latest(Metrics().registry).decode()
    kind = native.MODE.split(" ", 1)[0]
    assert f'analysis_code="{kind}"' in exposed
