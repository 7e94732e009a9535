"""The house rules of docs/architecture.md, read off the source: which package may import which,
where Hydra and FAISS may appear, how long a module may grow, and that the layout the README and
docs/architecture.md describe is the tree there is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retrieval"
# A module is one idea, however long; past this it is rarely one (functions stay on a screen)
MAX_LINES = 600

# What each package of retrieval/ may import (besides itself), in data-path order. The graph is
# a DAG: nothing imports back up it.
ALLOWED = {
    "infra": set(),
    "data": {"infra"},
    "postprocess": {"infra"},
    "models": {"infra", "data", "postprocess"},
    "index": {"infra"},
    "evaluation": {"infra", "data", "index", "postprocess"},
    "training": {"infra", "data", "models", "postprocess", "evaluation"},
    "bundle": {"infra", "data", "models", "index", "postprocess"},
    "backends": {"infra", "bundle"},
    "search": {
        "infra",
        "data",
        "models",
        "postprocess",
        "index",
        "evaluation",
        "bundle",
        "backends",
    },
    "service": {"infra", "data", "search"},
    "cli": {"infra", "data", "bundle", "backends", "search", "service"},
    "tasks": {
        "infra",
        "data",
        "models",
        "training",
        "index",
        "evaluation",
        "postprocess",
        "bundle",
        "search",  # export calibrates the duplicate finder's threshold
    },
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _package(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "retrieval":
                names |= {f"retrieval.{alias.name}" for alias in node.names}
    return names


def test_packages_import_only_down_the_data_path():
    found = {_package(p) for p in _modules()} - {"__init__"}
    assert found == set(ALLOWED), "a package was added or removed: give it its place in ALLOWED"
    wrong = []
    for path in _modules():
        source = _package(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "retrieval" or len(parts) < 2 or parts[1] == source:
                continue
            if parts[1] not in ALLOWED.get(source, set()):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_allowed_imports_form_no_cycle():
    state: dict[str, str] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert state.get(name) != "open", f"import cycle: {' -> '.join((*trail, name))}"
        if state.get(name) == "done":
            return
        state[name] = "open"
        for dep in ALLOWED[name]:
            visit(dep, (*trail, name))
        state[name] = "done"

    for name in ALLOWED:
        visit(name, ())


@pytest.mark.parametrize(
    "library,home",
    [("hydra", "tasks"), ("omegaconf", "tasks"), ("faiss", "index")],
)
def test_a_library_is_imported_in_one_package_only(library, home):
    outside = [
        str(p.relative_to(ROOT))
        for p in _modules()
        if _package(p) != home and any(n.split(".")[0] == library for n in _imports(p))
    ]
    assert not outside, f"{library} outside retrieval/{home}/: {outside}"


def test_no_module_is_longer_than_the_house_allows():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("document", ["README.md", "docs/architecture.md"])
def test_the_layout_described_is_the_tree(document):
    text = (ROOT / document).read_text(encoding="utf-8")
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    named = set(re.findall(r"retrieval/(\w+)/", text))
    assert folders - named == set(), f"{document} does not describe {sorted(folders - named)}"
    assert named - folders == set(), f"{document} describes missing {sorted(named - folders)}"
