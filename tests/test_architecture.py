"""The house rules of docs/architecture.md, read off the source: which package may import which,
that no module imports itself back through others, where Hydra and FAISS may appear, that a
function fits on a screen, and that the layout the README and docs/architecture.md describe is
the tree there is. A module is one idea, however long: there is no line cap on modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retrieval"
# A function fits on a screen: its lines from ``def`` to its end, docstring included
MAX_FUNCTION_LINES = 60

# What each package of retrieval/ may import (besides itself), in data-path order. The graph is
# a DAG: nothing imports back up it.
ALLOWED = {
    "infra": set(),
    "data": {"infra"},
    "datasets": {"infra", "data"},
    "postprocess": {"infra"},
    "models": {"infra", "data", "postprocess"},
    "index": {"infra"},
    "evaluation": {"infra", "data", "index", "postprocess"},
    "training": {"infra", "data", "models", "postprocess", "evaluation"},
    "bundle": {"infra", "data", "models", "index", "postprocess"},
    "backends": {"infra", "index", "bundle"},
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
        "datasets",  # the distractors task reads revisitop's distractor list
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
        if source == "__init__":  # the public API, retrieval/__init__.py, names every package's
            continue
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


def test_every_function_fits_on_a_screen():
    long = [
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({size} lines)"
        for p in _modules()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (size := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _file_level_imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports when it is loaded (its top-level imports,
    those under ``if TYPE_CHECKING:`` too): ``from package import module`` imports the
    module, ``from module import name`` the module."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [n for top in tree.body for n in ([top] if not isinstance(top, ast.If) else top.body)]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= subs & known
            if subs - known:
                found.add(node.module)
    return found & known


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_module_imports_itself_back_through_others():
    modules = {_module_name(p): p for p in _modules()}
    graph = {
        name: _file_level_imports(path, set(modules)) - {name} for name, path in modules.items()
    }
    cycle = _cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle or [])}"


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("document", ["README.md", "docs/architecture.md"])
def test_the_layout_described_is_the_tree(document):
    text = (ROOT / document).read_text(encoding="utf-8")
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    named = set(re.findall(r"retrieval/(\w+)/", text))
    assert folders - named == set(), f"{document} does not describe {sorted(folders - named)}"
    assert named - folders == set(), f"{document} describes missing {sorted(named - folders)}"


def test_the_service_searches_through_the_retrievers_stages_only():
    """One image-to-results path: the service calls ``Retriever.prepare``, ``embed_pixels``
    and ``search`` (as ``Retriever.search`` of an image does), never the parts inside them."""
    reaching = [
        f"{p.relative_to(ROOT)}:{node.lineno} .{node.attr}"
        for p in sorted((PACKAGE / "service").glob("*.py"))
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr in ("preprocessing", "runtime")
    ]
    assert not reaching, reaching


def test_the_tests_mirror_the_packages():
    """A package's tests live in tests/<package>/; only the project-wide checks stay at the
    top (the house rules, the documents, the public API, the GPU check script)."""
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    tests = ROOT / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders <= packages, f"test folders without a package: {sorted(folders - packages)}"
    top = {p.name for p in tests.glob("test_*.py")}
    project_wide = {
        "test_architecture.py",
        "test_device_check.py",
        "test_public_api.py",
        "test_readme.py",
    }
    assert top <= project_wide, f"move into tests/<package>/: {sorted(top - project_wide)}"


def test_conf_is_needed_only_beside_the_entry_points():
    """Why a non-editable install needs no conf/: the Hydra tasks run only through the entry
    scripts at the top of a checkout (train.py, evaluate.py, export.py, embed.py), which
    carry conf/ beside them; what an installed package runs, the ``retrieval`` command and
    the library, never composes a config (only retrieval/tasks/ imports Hydra, and no
    other package imports retrieval/tasks/)."""
    from retrieval.tasks.config import CONF_DIR

    assert CONF_DIR == ROOT / "conf" and (CONF_DIR / "train.yaml").is_file()
    for script in ("train", "evaluate", "export", "embed"):
        assert (ROOT / f"{script}.py").is_file()
    users = {
        str(p.relative_to(ROOT))
        for p in _modules()
        if _package(p) != "tasks" and any(n.startswith("retrieval.tasks") for n in _imports(p))
    }
    assert not users, f"the library imports the Hydra tasks: {sorted(users)}"
