"""The package layout holds: no import cycle inside katz/, and runtime code never imports build-time code.

The import graph is read from the source with ``ast`` (lazy imports inside functions count too), so
the check needs nothing imported and runs in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "katz"
# build-time code: ONNX export, engine builds; only the CLI (which offers `katz export`) may import it
BUILD_TIME = "katz.export"
MAY_IMPORT_BUILD_TIME = ("katz.export", "katz.cli")
# one package per technique
TECHNIQUES = ("katz.lora", "katz.controlnet", "katz.parallel")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module of ``mods`` that ``name`` (a module or a name inside one) resolves to."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import submodule` depends on the submodule; `from mod import name` on mod
                names = [s for s in subs if s in mods] + ([base] if any(s not in mods for s in subs) else [])
            else:
                continue
            for name in names:
                target = _owner(name, mods) if name.split(".")[0] == "katz" else None
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _under(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_katz():
    assert cycles(import_graph()) == []


def test_runtime_code_never_imports_build_time_code():
    bad = [f"{mod} -> {dep}" for mod, deps in import_graph().items() for dep in sorted(deps)
           if _under(dep, (BUILD_TIME,)) and not _under(mod, MAY_IMPORT_BUILD_TIME)]
    assert bad == []


def test_one_package_per_technique():
    mods = _modules()
    for package in TECHNIQUES:
        assert mods[package].name == "__init__.py", package
    assert not list(PACKAGE.glob("lora_*.py")) and not (PACKAGE / "tiling.py").exists()
    assert not (PACKAGE / "controlnet_client.py").exists()
