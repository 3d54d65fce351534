"""Whether the analysis modules run compiled (mypyc, see setup.py), and the way back to source.

Compiled modules sit beside their sources and Python prefers them, so a source edited after
the last build would silently not run. Then, and whenever PGWARDEN_PURE=1 is set, every
module of the package is imported from its source instead: all or none, because compiled
modules call each other directly and cannot mix with a newer source of one of them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

__all__ = ["MODE", "compiled_modules", "stale_sources"]

PACKAGE = Path(__file__).resolve().parent
_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-311-x86_64-linux-gnu.so


def compiled_modules(package: Path = PACKAGE) -> dict[Path, Path]:
    """Each compiled module under `package` with the source it was built from."""
    found = {}
    for ext in package.rglob(f"*{_SUFFIX}"):
        source = ext.with_name(ext.name[: -len(_SUFFIX)] + ".py")
        if source.exists():
            found[ext] = source
    return found


def stale_sources(compiled: dict[Path, Path]) -> list[str]:
    """Sources changed since they were compiled, relative to the package."""
    root = PACKAGE.parent
    return sorted(
        str(source.relative_to(root)) if source.is_relative_to(root) else str(source)
        for ext, source in compiled.items()
        if source.stat().st_mtime > ext.stat().st_mtime
    )


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
    compiled = compiled_modules()
    if not compiled:
        return "interpreted"
    reason = ""
    if os.environ.get("PGWARDEN_PURE") == "1":
        reason = "PGWARDEN_PURE=1"
    else:
        stale = stale_sources(compiled)
        if stale:
            reason = f"changed since compiled: {', '.join(stale)}; `make` rebuilds"
    if not reason:
        return "compiled"
    sys.meta_path.insert(0, _SourcesOnly())
    return f"interpreted ({reason})"


MODE = _choose()  # said at startup and in pgwarden_build_info
