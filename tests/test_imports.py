"""Import direction: cache never imports torch; cache and predictors never import offload; one install."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def modules_after(stmt: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys; {stmt}; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_cache_is_pure_python():
    mods = modules_after("import cache, cache.policies, cache.expert_cache")
    assert "torch" not in mods and "offload" not in mods


def test_predictors_do_not_import_offload_or_cache():
    mods = modules_after("import predictors")
    assert "offload" not in mods and "cache" not in mods


def test_offload_import_does_not_initialise_cuda():
    out = subprocess.run([sys.executable, "-c", "import offload, torch; print(torch.cuda.is_initialized())"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_packages_come_from_one_installation():
    import cache
    import offload
    import predictors

    roots = {Path(m.__file__).resolve().parent.parent for m in (cache, offload, predictors)}
    assert len(roots) == 1, f"cache/offload/predictors load from different places: {roots}"


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("offload", "cache", "predictors")


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """{module: [(imported module, names imported from it)]} for every module of the three packages."""
    import ast

    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            edges = []
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    edges.append((node.module, [a.name for a in node.names]))
                elif isinstance(node, ast.Import):
                    edges += [(a.name, []) for a in node.names]
            found[name] = [(m, names) for m, names in edges if m.split(".")[0] in PACKAGES]
    return found


def test_no_module_imports_another_modules_private_names():
    bad = [f"{mod} imports {n} from {src}" for mod, edges in _imports().items() for src, names in edges
           for n in names if n.startswith("_") and src != mod]
    assert not bad, bad


def test_no_import_cycles_at_module_level():
    """Module-level imports only (function-level ones run late and cannot deadlock an import)."""
    import ast

    graph: dict[str, set[str]] = {}
    modules = set(_imports())
    for mod in modules:
        parts = mod.split(".")
        path = ROOT.joinpath(*parts)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            # a package's __init__ re-exporting its submodules is the registry pattern, not a cycle
            deps |= {t for t in targets if t in modules and t != mod and not t.startswith(mod + ".")}
        graph[mod] = deps

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return path + [start]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, cycles
