"""The package's house rules, checked from the source: imports go downward only, no import circle, no
`_private` name imported across modules, no file over 500 lines without a reason at its top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "phi4mm"

# Lower layers never import higher ones (docs/architecture.md draws them). Same-rank packages do not import
# each other, except where a pair is listed in SIDEWAYS.
RANK = {"config": 0, "options": 0, "sampling": 0, "model": 1, "inputs": 2, "api": 3, "engine": 4, "tasks": 5, "train": 5,
        "serve": 6, "micro": 6, "cli": 7, "__main__": 8}
SIDEWAYS: set[tuple[str, str]] = set()
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every phi4mm import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod == "phi4mm" or mod.startswith("phi4mm."):
                found.append((mod, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("phi4mm."):
                    found.append((a.name, [], node.lineno))
    return found


def room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_go_downward_only():
    mods = modules()
    bad = []
    for name, path in mods.items():
        src = room(name)
        if src == "":  # phi4mm/__init__.py: the lazy public facade
            continue
        for mod, names, line in imports(path, name):
            targets = [mod] if mod != "phi4mm" else [f"phi4mm.{n}" for n in names]
            for t in targets:
                dst = room(t)
                if dst == src or dst == "":
                    continue
                assert src in RANK and dst in RANK, f"{name} imports {t}: place both in RANK"
                if RANK[dst] > RANK[src] or (RANK[dst] == RANK[src] and (src, dst) not in SIDEWAYS):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} ({src}) imports {t} ({dst})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_circle():
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for mod, names, _ in imports(path, name):
            cands = [mod] + [f"{mod}.{n}" for n in names]
            graph[name] |= {c for c in cands if c in mods and c != name}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if m == "phi4mm" or m.count(".") == 1 and mods[m].name == "__init__.py":
                continue  # package facades re-export; they are not layers
            if state.get(m) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_no_private_names_across_modules():
    bad = []
    for name, path in modules().items():
        for mod, names, line in imports(path, name):
            bad += [f"{path.relative_to(PKG.parent)}:{line} imports {n} from {mod}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_files_stay_readable():
    long = []
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        n = text.count("\n")
        if n > MAX_LINES and "One file on purpose" not in text[:2000]:
            long.append(f"{p.relative_to(PKG.parent)}: {n} lines")
    assert not long, "files over 500 lines without a reason at their top:\n" + "\n".join(long)
