"""The package's architecture, checked: no import circles, and each layer imports only down.

Every import counts (top level, inside functions, under `if TYPE_CHECKING:`): a circle
through a type-only or deferred import still ties the modules together, so none of them can
be read, tested or moved without the others.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"


@dataclass(frozen=True)
class Layer:
    """`modules` may import from proxy only `only` (None: anything in proxy), and never
    `never` (proxy's or any other). A name covers the module and everything under it."""

    name: str
    modules: tuple[str, ...]
    only: tuple[str, ...] | None = None
    never: tuple[str, ...] = ()


SESSION_AND_SERVER = ("proxy.session", "proxy.server")
# Bottom up: the codec, what tracks statements on it, the analysis that reads them, and the
# operations around the relay. The relay itself (proxy.session, proxy.server) sits on top.
LAYERS = (
    Layer("codec", ("proxy.protocol",), only=("proxy.protocol",), never=("asyncio",)),
    Layer(
        "tracking",
        ("proxy.tracking",),
        only=("proxy.protocol", "proxy.analysis", "proxy.logs", "proxy.tracking"),
        never=("asyncio",),
    ),
    Layer(
        "analysis",
        ("proxy.analysis", "proxy.detectors", "proxy.rewriters"),
        never=(*SESSION_AND_SERVER, "proxy.admin", "asyncio"),
    ),
    Layer(
        "operations",
        (
            "proxy.metrics",
            "proxy.advice",
            "proxy.admin",
            "proxy.logs",
            "proxy.config",
            "proxy.durations",
        ),
        never=SESSION_AND_SERVER,
    ),
    # the index advisor runs beside the relay: it reads the statistics and reports advice,
    # and only the server (which starts it) imports it (test_only_the_server_imports_...)
    Layer("advisor", ("proxy.advisor",), never=(*SESSION_AND_SERVER, "proxy.inspector")),
    # the page and the report render what the admin server's JSON holds: nothing of the
    # relay or the analysis, so a page can be rendered from any pgwarden's answers
    Layer(
        "web",
        ("proxy.web",),
        only=("proxy.web", "proxy.admin", "proxy.advice", "proxy.logs"),
        never=(*SESSION_AND_SERVER, "proxy.inspector", "proxy.advisor"),
    ),
)

Imports = dict[str, dict[str, str]]  # module -> imported name -> where ("file:line")


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def scan(root: Path = PACKAGE) -> Imports:
    """Every module of the package with everything it imports, stdlib and libraries too."""
    paths = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found: Imports = {}
    for module, path in paths.items():
        imports = found[module] = {}
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    anchor = package.rsplit(".", node.level - 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                # `from proxy.x import y` imports the module proxy.x.y when there is one
                names = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base
                    for alias in node.names
                ]
            else:
                continue
            where = f"{path.relative_to(root.parent)}:{node.lineno}"
            for name in names:
                imports.setdefault(name, where)
    return found


def graph(imports: Imports) -> dict[str, set[str]]:
    """Imports between the package's modules."""
    return {module: {t for t in targets if t in imports} for module, targets in imports.items()}


def components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan's algorithm): each circle lies inside one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def shortest_cycle(edges: dict[str, set[str]], start: str) -> list[str]:
    """A shortest path from `start` back to itself (breadth first), start at both ends."""
    paths = {start: [start]}
    queue = [start]
    for node in queue:
        for target in sorted(edges[node]):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    return []


def describe(cycle: list[str], imports: Imports) -> str:
    steps = [
        f"-> {target} ({imports[source][target]})" for source, target in itertools.pairwise(cycle)
    ]
    return " ".join([cycle[0], *steps])


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from pkg import sub\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "low.py").write_text("def f():\n    import pkg.top\n")
    (root / "top.py").write_text(
        "import asyncio\nfrom typing import TYPE_CHECKING\nfrom .sub import low\n"
        "if TYPE_CHECKING:\n    from pkg.sub.low import f\n    from . import missing\n"
    )
    imports = scan(root)
    assert graph(imports) == {
        "pkg": {"pkg.sub"},  # `from package import module` is the module
        "pkg.sub": set(),
        "pkg.sub.low": {"pkg.top"},  # inside a function
        "pkg.top": {"pkg.sub.low", "pkg"},  # relative, and under TYPE_CHECKING
    }
    assert imports["pkg.top"]["asyncio"] == "pkg/top.py:1"  # libraries: seen, not graphed
    assert {"proxy.server", "proxy.protocol.framing"} <= set(scan())


def test_no_import_circles() -> None:
    imports = scan()
    edges = graph(imports)
    circles = [
        describe(shortest_cycle(edges, component[0]), imports)
        for component in components(edges)
        if len(component) > 1 or component[0] in edges[component[0]]
    ]
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_layers_import_only_down() -> None:
    imports = scan()
    broken = []
    for layer in LAYERS:
        for module, targets in imports.items():
            if not within(module, layer.modules):
                continue
            for target, where in targets.items():
                escapes = (
                    layer.only is not None
                    and within(target, ("proxy",))
                    and not within(target, layer.only)
                )
                if escapes or within(target, layer.never):
                    broken.append(f"{layer.name}: {module} imports {target} ({where})")
    assert not broken, "imports against the layers:\n" + "\n".join(broken)


def test_only_the_server_imports_the_advisor() -> None:
    importers = sorted(
        module
        for module, targets in scan().items()
        if not within(module, ("proxy.advisor",))
        and any(within(target, ("proxy.advisor",)) for target in targets)
    )
    assert importers == ["proxy.server"]
