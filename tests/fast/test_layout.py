"""The package's layout keeps its promises: the client side loads no server code, the modules
import each other without cycles, and the documented error codes are the ones in errors.py."""

from __future__ import annotations

import ast
import graphlib
import json
import re
import subprocess
import sys
from pathlib import Path

from goldclone import errors
from goldclone.errors import answer_codes, vm_error_codes

SRC = Path(__file__).parents[2] / "src"
DOCS = Path(__file__).parents[2] / "docs"
SERVER_SIDE = (
    "goldclone.server",
    "goldclone.api",
    "goldclone.service",
    "goldclone.store",
    "goldclone.drivers",
    "goldclone.images",
    "goldclone.host",
    "goldclone.settings",
    "uvicorn",
    "fastapi",
    "sqlalchemy",
)


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    modules: list[str] = json.loads(out.stdout.splitlines()[-1])
    return [m for m in modules if m.startswith(SERVER_SIDE)]


def test_the_cli_loads_no_server_code() -> None:
    assert _loaded_after("import goldclone.cli") == []


def test_a_client_command_loads_no_server_code() -> None:
    command = (
        "from goldclone.cli import main\n"
        "code = main(['list', '--url', 'http://127.0.0.1:9'])\n"
        "assert code == 3, code"  # the server cannot be reached
    )
    assert _loaded_after(command) == []


def test_settings_import_no_driver_or_network_code() -> None:
    loaded = _loaded_after("import goldclone.settings")
    assert [m for m in loaded if m != "goldclone.settings"] == []


def _imports(path: Path) -> set[str]:
    """The goldclone modules that ``path`` imports when it is loaded or type-checked (top
    level and ``if TYPE_CHECKING:``; an import inside a function is deferred on purpose),
    with ``from package import module`` counted as an import of that module."""
    found = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.If):
            body.extend(node.body + node.orelse)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("goldclone")}


def test_modules_import_each_other_without_cycles() -> None:
    modules = {
        ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): path
        for path in SRC.rglob("*.py")
    }
    graph = {
        # a package's __init__ that re-exports its own modules is not a cycle of concepts
        name: {t for t in _imports(path) & modules.keys() if not t.startswith(name + ".")}
        for name, path in modules.items()
    }
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"an import cycle: {' -> '.join(exc.args[1])}") from None


def test_docs_list_exactly_the_error_codes_of_errors_py() -> None:
    api = (DOCS / "api.md").read_text()
    answered = set(re.findall(r"^\| \d{3} \| `([a-z-]+)` \|", api, re.MULTILINE))
    assert answered == {code for codes in answer_codes().values() for code in codes}
    table = api[api.index("| code | meaning |") :].split("\n\n")[0]
    on_vms = set(re.findall(r"^\| `([a-z-]+)` \|", table, re.MULTILINE))
    assert on_vms == set(vm_error_codes())


def _layout_table() -> list[str]:
    design = (DOCS / "design.md").read_text()
    table = design[design.index("| module | concept |") :].split("\n\n")[0]
    return [row.split(" | ")[0].removeprefix("| ") for row in table.splitlines()[2:]]


def test_the_design_docs_layout_names_every_module_and_only_modules_that_exist() -> None:
    """Each row's first cell names modules by their path under ``src/goldclone``; a bare name
    after the first path (``pool_records.py``, ``migrations/``) is in that path's folder, and
    a folder (``drivers/qemu/``) stands for everything in it."""
    root = SRC / "goldclone"
    named: set[Path] = set()
    for cell in _layout_table():
        paths = re.findall(r"`([^`]+)`", cell)
        folder = Path(paths[0]).parent
        named |= {root / (path if "/" in path.rstrip("/") else folder / path) for path in paths}
    assert [path for path in named if not path.exists()] == []
    folders = [path for path in named if path.is_dir()]
    unnamed = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "__init__.py"
        and path not in named
        and not any(folder in path.parents for folder in folders)
    ]
    assert sorted(unnamed) == []


def test_no_module_is_over_500_lines() -> None:
    """A module past 500 lines holds more than one concept: cut it where they part."""
    long = {
        str(path.relative_to(SRC)): lines
        for path in SRC.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > 500
    }
    assert long == {}


def test_the_tree_in_errors_docstring_is_the_classes_own() -> None:
    """Every class, its parent, its status and its code, as ``errors.py``'s docstring draws
    them."""
    drawn = {}
    parents: list[str] = []
    for line in (errors.__doc__ or "").splitlines():
        found = re.fullmatch(r"    ([│ ]*(?:[├└]── )?)(\w+) +(\d{3}) ([a-z-]+).*", line)
        if found is None:
            continue
        depth = len(found[1]) // 4
        parents[depth:] = [found[2]]
        parent = parents[depth - 1] if depth else None
        drawn[found[2]] = (parent, int(found[3]), found[4])
    assert len(drawn) > 40, "the tree was not read"
    classes = [errors.GoldcloneError, *errors.subclasses(errors.GoldcloneError)]
    actual = {
        cls.__name__: (
            cls.__base__.__name__ if cls is not errors.GoldcloneError else None,
            cls.status,
            cls.code,
        )
        for cls in classes
    }
    assert drawn == actual
