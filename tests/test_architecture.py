"""The package's import rules, read from the source with `ast` (lazy imports count too).

Layers, lowest first; a module may import its own layer and the layers below:

    0  errors, files, text, hashing,
       safetensors_format, arenas                facts every layer needs
    1  methods                                    merge math, no I/O
    2  catalog                                    rows in, rows out
    3  planner                                    specs -> plans
    4  engine                                     plans -> shard files (never the catalog)
    5  runs                                       begin/commit/abort/recover/verify, analyze
    6  evaluate                                   models -> scores
    7  world                                      the tiny model family
    8  search                                     AP-BMM over merge plans
    9  api                                        the library surface
    10 demo                                       the main job, through api only
    11 cli                                        the command line, through api, demo, text
    12 __main__
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mergepipe"

LAYERS: dict[str, int] = {
    "mergepipe": 0, "errors": 0, "files": 0, "text": 0, "safetensors_format": 0, "hashing": 0,
    "arenas": 0,
    "methods": 1, "catalog": 2, "planner": 3, "engine": 4, "runs": 5, "evaluate": 6,
    "world": 7, "search": 8, "api": 9, "demo": 10, "cli": 11, "__main__": 12,
}
# rooms a room may never import, whatever the layers say
FORBIDDEN: dict[str, set[str]] = {
    "engine": {"catalog"},
    "cli": {"catalog", "planner", "engine", "runs", "evaluate", "world", "search", "methods"},
    "demo": {"catalog", "planner", "engine", "runs", "evaluate", "world", "search", "methods"},
}


def module_sources(root: Path = PACKAGE) -> dict[str, str]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f.read_text()
    return out


def imports_of(module: str, source: str, modules: set[str]) -> list[tuple[str, int]]:
    """Every mergepipe module ``module`` imports, with the line (``from pkg import mod``
    counts as importing ``pkg.mod`` when that is a module)."""
    is_pkg = any(m.startswith(module + ".") for m in modules)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for a in node.names:
                sub = f"{name}.{a.name}"
                found.append((sub if sub in modules else name, node.lineno))
    return sorted({(n, line) for n, line in found if n == "mergepipe" or n.startswith("mergepipe.")})


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mergepipe"


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken rule: upward imports, forbidden rooms, imports of the CLI, cycles."""
    modules = set(sources)
    graph: dict[str, set[str]] = {}
    problems = []
    for mod, src in sources.items():
        graph[mod] = set()
        for target, line in imports_of(mod, src, modules):
            graph[mod].add(target)
            a, b = room(mod), room(target)
            if a not in LAYERS or b not in LAYERS:
                problems.append(f"{mod}:{line} {target}: room {a if a not in LAYERS else b!r} "
                                f"has no layer; add it to LAYERS")
            elif LAYERS[b] > LAYERS[a]:
                problems.append(f"{mod}:{line} imports {target}, a layer above it")
            elif b in FORBIDDEN.get(a, set()):
                problems.append(f"{mod}:{line} imports {target}; {a} may not import {b}")
            elif b == "cli" and a not in ("cli", "__main__"):
                problems.append(f"{mod}:{line} imports the CLI")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), if any.

    A package importing its own submodules (``__init__`` re-exports) is not a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def edges(v: str) -> list[str]:
        return [w for w in graph.get(v, ()) if w in graph and not w.startswith(v + ".")]

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group) + [sorted(group)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_keeps_its_import_rules():
    assert violations(module_sources()) == []


def test_every_room_has_a_layer():
    rooms = {room(m) for m in module_sources()}
    assert rooms <= set(LAYERS), rooms - set(LAYERS)


def test_a_planted_upward_import_is_caught():
    sources = module_sources()
    planted = dict(sources)
    planted["mergepipe.engine.reader"] += "\nfrom mergepipe.catalog.store import Catalog\n"
    planted["mergepipe.planner.plan"] += "\ndef f():\n    from mergepipe.cli.common import table\n"
    found = violations(planted)
    assert any("engine.reader" in p and "may not import catalog" in p for p in found)
    assert any("planner.plan" in p and "layer above" in p for p in found)


def test_a_planted_cycle_is_caught():
    planted = dict(module_sources())
    planted["mergepipe.planner.plan"] += "\nfrom mergepipe.planner import exact\n"
    assert any(p.startswith("import cycle:") and "mergepipe.planner.plan" in p
               for p in violations(planted))


def test_the_cli_reaches_the_library_only_through_api():
    planted = dict(module_sources())
    planted["mergepipe.cli.merge"] += "\nfrom mergepipe.catalog import schema\n"
    assert any("cli may not import catalog" in p for p in violations(planted))
