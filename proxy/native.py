"""Whether the analysis modules run compiled (mypyc, see setup.py), and the way back to source.

Compiled modules sit beside their sources and Python prefers them, so a source edited after
the last build would silently not run. The build records each compiled source's digest
(native.json); unless every source still matches, and whenever PGWARDEN_PURE=1 is set,
every module of the package is imported from its source instead. All or none, because
compiled modules call each other directly and cannot mix with a newer source of one of them.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

__all__ = ["EXTENSION_SUFFIX", "MODE", "changed_sources", "compiled_modules"]

PACKAGE = Path(__file__).resolve().parent
EXTENSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # .cpython-311-x86_64-linux-gnu.so


def compiled_modules(package: Path = PACKAGE) -> list[Path]:
    """The sources under `package` that have a compiled module beside them."""
    found = []
    for ext in package.rglob(f"*{EXTENSION_SUFFIX}"):
        source = ext.with_name(ext.name[: -len(EXTENSION_SUFFIX)] + ".py")
        if source.exists():
            found.append(source)
    return sorted(found)


def changed_sources(package: Path = PACKAGE) -> list[str]:
    """Compiled sources that differ from what the build recorded (all, with no record)."""
    root = package.parent
    compiled = [str(source.relative_to(root)) for source in compiled_modules(package)]
    try:
        recorded = json.loads((package / "native.json").read_text())
    except (OSError, ValueError):
        return compiled
    return [
        name
        for name in compiled
        if recorded.get(name) != hashlib.sha256((root / name).read_bytes()).hexdigest()
    ]


class _SourcesOnly(importlib.abc.MetaPathFinder):
    """Finds the package's modules as source files, never as extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not fullname.startswith("proxy.") or path is None:
            return None
        loaders = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, loaders).find_spec(fullname)
            if spec is not None:
                return spec
        return None


def _choose() -> str:
    if not compiled_modules():
        return "interpreted"
    if os.environ.get("PGWARDEN_PURE") == "1":
        reason = "PGWARDEN_PURE=1"
    else:
        changed = changed_sources()
        if not changed:
            return "compiled"
        reason = f"changed since compiled: {', '.join(changed)}; `make` rebuilds"
    sys.meta_path.insert(0, _SourcesOnly())
    return f"interpreted ({reason})"


MODE = _choose()  # said at startup and in pgwarden_build_info
