"""The repository's layout rules, checked: package list and layering."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Top-level source folders other than the root package's own folder, `qlmserve/`.
SOURCE_FOLDERS = ("controller", "operations", "backends")
# Generated code (never committed) and test data are not source.
SKIP = ("qlmserve/v1",)


def _packages_on_disk() -> set[str]:
    """The rule: `X/` is `qlmserve.X`, `qlmserve/` is `qlmserve`; every folder with an
    __init__.py below them is a subpackage."""
    out = set()
    for root, name in [("qlmserve", "qlmserve"), *((f, f"qlmserve.{f}") for f in SOURCE_FOLDERS)]:
        base = REPO / root
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            out.add(".".join([name, *rel.parts]))
    out.add("qlmserve.v1")  # generated at build time into a folder that holds only a .gitignore
    return out


def _sources() -> list[Path]:
    files = []
    for folder in ("qlmserve", *SOURCE_FOLDERS):
        for p in (REPO / folder).rglob("*.py"):
            rel = p.relative_to(REPO).as_posix()
            if not rel.startswith(SKIP):
                files.append(p)
    return files


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return mods


def test_pyproject_packages_match_the_folders():
    """This test verifies that:
    1. pyproject.toml lists exactly the packages the folder rule gives (a folder `X/` is
       `qlmserve.X`, `qlmserve/` the root package), so no subpackage is left out of a
       wheel and none is listed that does not exist;
    2. the package-dir mapping says the same rule."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == _packages_on_disk()
    assert cfg["package-dir"] == {"qlmserve": "qlmserve", **{f"qlmserve.{f}": f for f in SOURCE_FOLDERS}}


def test_controller_and_backends_never_import_each_other():
    """This test verifies that:
    1. no module under controller/ imports qlmserve.backends, and none under backends/
       imports qlmserve.controller (what both need lives below them: operations/, the
       Redis layout, the generated protocol);
    2. operations/ imports neither."""
    bad = []
    for p in _sources():
        top = p.relative_to(REPO).parts[0]
        forbidden = {"controller": ("qlmserve.backends",), "backends": ("qlmserve.controller",),
                     "operations": ("qlmserve.backends", "qlmserve.controller")}.get(top, ())
        for mod in _imports(p):
            if mod.startswith(forbidden):
                bad.append(f"{p.relative_to(REPO)} imports {mod}")
    assert not bad, bad


def test_long_files_say_why():
    """This test verifies that every source file over 500 lines says why in its module
    docstring ("Over 500 lines ..."): a newcomer reads a file in one sitting, and a longer
    one names the part to move out next."""
    long = []
    for p in _sources():
        text = p.read_text()
        if text.count("\n") > 500:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Over 500 lines" not in doc:
                long.append(p.relative_to(REPO).as_posix())
    assert long == []
