"""The package's shape: kernels are leaves (torch and triton only) and no module imports itself back through
others. Read from the source with `ast`, lazy imports inside functions included."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> installed package (pyproject.toml's package-dir)
PACKAGES = {"sglang_asynctls": "sglang_asynctls", "kernels": "sglang_asynctls.kernels",
            "patches": "sglang_asynctls.patches"}


def _modules():
    """{module name: set of sglang_asynctls names it imports}"""
    out = {}
    for folder, package in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3].replace(os.sep, ".")
                name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                is_pkg = f == "__init__.py"
                tree = ast.parse(open(os.path.join(dirpath, f)).read())
                deps = set()
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        deps |= {a.name for a in node.names}
                    elif isinstance(node, ast.ImportFrom):
                        base = node.module or ""
                        if node.level:
                            parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                            base = ".".join(parts + ([base] if base else []))
                        deps |= {base} | {f"{base}.{a.name}" for a in node.names}
                out[name] = {d for d in deps if d.startswith("sglang_asynctls")}
    return out


def test_kernels_import_nothing_of_the_package_but_kernels():
    offenders = {m: sorted(d for d in deps if not d.startswith("sglang_asynctls.kernels"))
                 for m, deps in _modules().items() if m.startswith("sglang_asynctls.kernels")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycle():
    mods = _modules()
    graph = {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}
    assert "sglang_asynctls.reference" in graph and "sglang_asynctls.kernels.sparse_decode" in graph
    state, path, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []
