"""The packages' modules import each other as a tree: no cycle, counting imports inside functions too (a lazy
import hides a cycle from Python, not from the reader) and leaving out ``if TYPE_CHECKING:`` blocks."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"nsa_dist": REPO / "nsa_dist", "nsa_kernels": REPO / "nsa_kernels"}


def module_names(package: str, root: Path) -> Dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``package`` (whose files live under ``root``)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The modules of ``known`` that module ``name`` (file ``path``) imports anywhere outside ``TYPE_CHECKING``
    blocks; ``from package import name`` counts as the submodule when ``name`` is one, else as the package."""
    tree = ast.parse(path.read_text())
    hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
              for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
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
                    found.append(sorted(component))
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = {name: path for package, root in PACKAGES.items() for name, path in module_names(package, root).items()}
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_a_lazy_import_counts_and_a_type_checking_import_does_not(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    names = module_names("pkg", pkg)
    assert imported_modules("pkg.a", names["pkg.a"], set(names)) == {"pkg.b"}
    assert imported_modules("pkg.b", names["pkg.b"], set(names)) == set()


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_form_a_tree(package):
    graph = import_graph()
    assert len([m for m in graph if m.split(".")[0] == package]) > 10  # the walk found the package's modules
    assert [c for c in cycles(graph) if c[0].split(".")[0] == package] == []


def test_pyproject_installs_every_package():
    """A non-editable ``pip install .`` ships exactly the packages listed in pyproject.toml: every folder with an
    ``__init__.py`` must be listed, or the installed copy misses it."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for package, root in PACKAGES.items() for name, path in module_names(package, root).items()
             if path.name == "__init__.py"}
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"
