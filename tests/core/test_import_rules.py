"""The floors of the house (docs/architecture.md), checked on the source with `ast`, every import counted —
also those inside functions, which run later but still tie one module to another.

- sefi_core imports nothing of ComfyUI and nothing of the repository's other packages;
- nodes import no user command and no tooling (the pack must load from a Registry zip without them);
- nothing that ships (tools/check_pack.py's SHIPPED_PACKAGES) imports tools/, which stays in the repository;
- each user command and each side package imports only the floors below it (the table ALLOWED);
- no module imports one that imports it back, directly or through others;
- the batch trainer's modules share no private (`_name`) names.

Absolute `nodes` imports are the host's own `nodes` module (upstream ComfyUI's nodes.py): this repository's
nodes package is only ever imported relatively, since the host loads the pack under a folder name of its own.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools import check_pack

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The repository's packages, by floor: the method, the ComfyUI glue, the user commands, and what sits at the side.
PACKAGES = ("sefi_core", "nodes", "batch", "host_boot", "tools", "bench", "world")

#: Top-level module names of ComfyUI itself (upstream checkout and the PyPI host).
HOST_NAMES = {"comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_api_nodes", "comfy_config",
              "comfyui_version", "folder_paths", "execution", "server", "nodes", "node_helpers", "latent_preview",
              "main", "utils", "app", "api_server", "middleware", "protocol", "alembic_db", "cuda_malloc"}

#: Which of the repository's packages each package may import ("host": ComfyUI itself).
ALLOWED: dict[str, set[str]] = {
    "sefi_core": {"sefi_core"},
    "nodes": {"nodes", "sefi_core", "host"},
    "batch": {"batch", "sefi_core", "host_boot"},
    "host_boot": {"host_boot", "host"},
    "tools": {"tools", "sefi_core", "batch", "host_boot", "host", "world"},    # world: only WORLD_IMPORTERS, below
    "bench": {"bench", "tools", "sefi_core", "host_boot", "host", "world"},
    "world": {"world", "sefi_core", "host_boot", "tools", "host"},
}
#: What ships in the Registry package, and so must not import tools/ (which does not).
SHIPPED = check_pack.SHIPPED_PACKAGES
#: Who may import the miniature world (issue 22): the demo, the dev server (it offers the world checkpoint), the
#: benchmarks and the tests only.
WORLD_IMPORTERS = ("tools.demo", "tools.dev_server", "bench.")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "nodes.train"
    target: str  # what it names: a repository module ("sefi_core.train_state") or a foreign one ("comfy.utils")
    names: tuple[str, ...]  # for `from X import a, b`: a, b
    line: int
    local: bool  # True when target is a module of this repository


def module_name(path: Path, root: Path = REPO_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_local_module(name: str, root: Path = REPO_ROOT) -> bool:
    if not name or name.split(".")[0] not in PACKAGES:
        return False
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, root: Path = REPO_ROOT) -> list[Import]:
    """Every import in one file, relative ones resolved against the repository root (itself a package)."""
    source = module_name(path, root)
    package = source.split(".") if path.name == "__init__.py" else source.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.name.split(".")[0] != "nodes" and is_local_module(alias.name, root)
                found.append(Import(source, alias.name, (), node.lineno, local))
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names)
            if node.level:
                if node.level - 1 > len(package):
                    raise AssertionError(f"{path}:{node.lineno}: relative import above the repository root")
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module.split(".")[0] == "nodes":
                found.append(Import(source, node.module, names, node.lineno, False))  # the host's nodes.py
                continue
            else:
                target = node.module
            # `from package import module` names the module itself
            submodules = [f"{target}.{n}" for n in names if is_local_module(f"{target}.{n}", root)]
            if submodules:
                found += [Import(source, m, (m.rsplit(".", 1)[1],), node.lineno, True) for m in submodules]
            rest = tuple(n for n in names if f"{target}.{n}" not in submodules)
            if rest or not submodules:
                found.append(Import(source, target, rest, node.lineno, is_local_module(target, root)))
    return found


def repository_imports(root: Path = REPO_ROOT) -> list[Import]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            found += imports_of(path, root)
    return found


def rule_violations(found: list[Import]) -> list[str]:
    problems = []
    for imp in found:
        where = f"{imp.source} (line {imp.line}) imports {imp.target}"
        package = imp.source.split(".")[0]
        allowed = ALLOWED[package]
        if imp.local:
            floor = imp.target.split(".")[0]
            if package in SHIPPED and floor == "tools":
                problems.append(f"{where}: {package} ships and tools/ does not; move what it needs into a shipped "
                                f"package ({', '.join(SHIPPED)})")
            elif floor not in allowed:
                problems.append(f"{where}: {package} may import only {sorted(allowed)}")
            if floor == "world" and package != "world" and not imp.source.startswith(WORLD_IMPORTERS):
                problems.append(f"{where}: only {', '.join(WORLD_IMPORTERS)} and the tests may import world")
            if package == "batch" and floor == "batch" and any(n.startswith("_") for n in imp.names):
                problems.append(f"{where}: shares the private name(s) {[n for n in imp.names if n[0] == '_']}")
        elif imp.target.split(".")[0] in HOST_NAMES and "host" not in allowed:
            problems.append(f"{where}: {package} must not import ComfyUI")
    return problems


def cycles(found: list[Import]) -> list[list[str]]:
    """The import circles among the repository's modules (strongly connected components with more than one
    module, or a module importing itself), each as a sorted list of module names."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.source, set())
        if imp.local:
            graph[imp.source].add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(module: str) -> None:  # Tarjan's algorithm; the graph has a few hundred nodes at most
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1 or module in graph[module]:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_every_package_imports_only_the_floors_below_it():
    found = repository_imports()
    assert {imp.source.split(".")[0] for imp in found} >= {"sefi_core", "nodes", "batch", "tools"}
    assert not rule_violations(found), "\n".join(rule_violations(found))


def test_nothing_that_ships_imports_tools():
    assert set(SHIPPED) <= set(PACKAGES)  # every shipped package is walked
    found = [imp for imp in repository_imports() if imp.source.split(".")[0] in SHIPPED]
    assert {imp.source.split(".")[0] for imp in found} == set(SHIPPED)
    bad = [f"{imp.source} (line {imp.line}) imports {imp.target}" for imp in found
           if imp.local and imp.target.split(".")[0] == "tools"]
    assert not bad, "\n".join(bad)


def test_no_module_imports_one_that_imports_it_back():
    assert not cycles(repository_imports())


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"sefi_core/__init__.py": "", "sefi_core/a.py": "import comfy.utils\n"}, "sefi_core must not import ComfyUI"),
    ({"sefi_core/__init__.py": "", "sefi_core/a.py": "def f():\n    from ..nodes import host\n",
      "nodes/__init__.py": "", "nodes/host.py": ""}, "sefi_core may import only"),
    ({"nodes/__init__.py": "", "nodes/a.py": "from host_boot import embedded_host\n", "host_boot/__init__.py": "",
      "host_boot/embedded_host.py": ""}, "nodes may import only"),
    ({"batch/__init__.py": "", "batch/a.py": "from batch.b import _helper\n", "batch/b.py": "_helper = 1\n"},
     "shares the private name"),
    ({"batch/__init__.py": "", "batch/a.py": "def f():\n    from tools import tiny_checkpoints\n",
      "tools/__init__.py": "", "tools/tiny_checkpoints.py": ""}, "batch ships and tools/ does not"),
    ({"host_boot/__init__.py": "", "host_boot/a.py": "import tools.check_pack\n", "tools/__init__.py": "",
      "tools/check_pack.py": ""}, "host_boot ships and tools/ does not"),
    ({"tools/__init__.py": "", "tools/a.py": "import world.x\n", "world/__init__.py": "", "world/x.py": ""},
     "may import world"),
])
def test_each_rule_catches_its_violation(tmp_path, files, expected):
    root = _tree(tmp_path, files)
    found = [imp for package in PACKAGES if (root / package).is_dir()
             for path in sorted((root / package).rglob("*.py")) for imp in imports_of(path, root)]
    assert any(expected in p for p in rule_violations(found)), rule_violations(found)


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    root = _tree(tmp_path, {"batch/__init__.py": "", "batch/a.py": "from batch import b\n",
                            "batch/b.py": "def run():\n    from batch.a import x\n",
                            "batch/c.py": "from batch import a\n"})
    found = [imp for path in sorted((root / "batch").rglob("*.py")) for imp in imports_of(path, root)]
    assert cycles(found) == [["batch.a", "batch.b"]]
