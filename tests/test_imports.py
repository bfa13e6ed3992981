"""The package's modules import downwards only: no module of nanorl imports (even lazily, inside a
function) a module that imports it back, directly or through others."""

import ast
import os

from conftest import ROOT

PKG = os.path.join(ROOT, "nanorl")


def _imports():
    mods = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py")}
    deps = {}
    for m in mods:
        found = set()
        for node in ast.walk(ast.parse(open(os.path.join(PKG, m + ".py")).read())):
            if isinstance(node, ast.ImportFrom) and node.module == "nanorl":
                found |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanorl."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nanorl.")}
        deps[m] = found - {m}
    return deps


def test_no_import_cycles():
    deps, cycles = _imports(), []

    def visit(m, path):
        for d in sorted(deps.get(m, ())):
            if d in path:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            else:
                visit(d, path + [d])

    for m in sorted(deps):
        visit(m, [m])
    assert deps["model"] and deps["tasks"], deps  # the scan sees imports at all
    assert not cycles, cycles
