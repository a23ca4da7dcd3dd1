"""The package's import graph has no circle of more than two modules (issue 26's target): helpers live
on the ground floor (errors, checks, prompt, calibration) and nothing below imports from above."""
from __future__ import annotations

import ast
from pathlib import Path

import agdecode

SRC = Path(agdecode.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):  # module level and inside functions alike
            if isinstance(node, ast.ImportFrom):
                base = m.split(".")
                if node.level:
                    base = base[: len(base) - node.level + (p.name == "__init__.py")]
                else:
                    base = []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m:
                    edges[m].add(t)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_of_more_than_two_modules():
    cycles = _cycles(_edges(_modules()))
    assert [c for c in cycles if len(c) > 2] == [], cycles


def test_the_ground_floor_imports_nothing_from_above():
    edges = _edges(_modules())
    for low in ("agdecode.errors", "agdecode.checks", "agdecode.prompt", "agdecode.calibration"):
        assert edges[low] <= {"agdecode.errors", "agdecode.identity", "agdecode.models"}, (low, edges[low])
