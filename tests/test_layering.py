"""The layout promises of DESIGN.md §3: one import namespace, and imports that only go one way.

The parts stay in their folders at the top of the repository and are installed as ``battery_trace.*``;
the wheel must add no other top-level name, and must not carry the test and demo infrastructure.
Import direction: ``agent -> protocol <- server``; the stubs build frames on their own, so they import
neither the agent nor the server; the shared plumbing in ``battery_trace/`` imports none of the parts.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "battery_trace"
# folder -> its import name, as pyproject.toml maps them
PARTS = {"battery_trace": NAMESPACE, "protocol": f"{NAMESPACE}.protocol", "agent": f"{NAMESPACE}.agent",
         "server": f"{NAMESPACE}.server", "firmware_stubs": f"{NAMESPACE}.firmware_stubs"}  # fmt: skip
# What each part may not import (its own namespace prefix is always allowed).
_AGENT, _SERVER, _STUBS = (f"{NAMESPACE}.{part}" for part in ("agent", "server", "firmware_stubs"))
FORBIDDEN = {
    "battery_trace": (f"{NAMESPACE}.protocol", _AGENT, _SERVER, _STUBS),
    "protocol": (_AGENT, _SERVER, _STUBS),
    "agent": (_SERVER, _STUBS),
    "server": (_AGENT, _STUBS),
    "firmware_stubs": (_AGENT, _SERVER),
}
# Names that exist only in a checkout: no installed module may need them.
CHECKOUT_ONLY = ("harness", "bench", "tests")
# Bare top-level names of the parts: importing them works in a checkout by accident (the folder is on
# sys.path) and nowhere else.
BARE = ("protocol", "agent", "server", "firmware_stubs")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module name a file imports, anywhere in it (lazy imports inside functions too)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_each_part_imports_only_what_the_layering_allows() -> None:
    broken = []
    for folder, forbidden in FORBIDDEN.items():
        for path in _python_files(folder):
            for line, name in _imports(path):
                where = f"{path.relative_to(ROOT)}:{line}"
                if name.startswith("."):
                    broken.append(f"{where}: relative import {name!r}; write the full battery_trace name")
                elif any(_within(name, f) for f in forbidden):
                    broken.append(f"{where}: {folder}/ may not import {name}")
                elif any(_within(name, f) for f in (*CHECKOUT_ONLY, *BARE)):
                    broken.append(f"{where}: {name} is not installed; import it as part of battery_trace")
    assert broken == []


def test_nothing_imports_a_part_by_its_bare_folder_name() -> None:
    """Tests, the harness and the benchmarks use the installed names too, so they test what ships."""
    broken = []
    for folder in CHECKOUT_ONLY:
        for path in _python_files(folder):
            for line, name in _imports(path):
                if any(_within(name, bare) for bare in BARE):
                    broken.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert broken == []


def test_pyproject_maps_every_package_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {name: folder for folder, name in PARTS.items()}
    expected = set()
    for folder, name in PARTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((name, *relative)))
    assert set(config["packages"]) == expected


@pytest.mark.integration
def test_the_wheel_installs_only_the_namespace(tmp_path: Path) -> None:
    """Build the wheel as a user would and look inside: one top-level name, no test infrastructure."""
    # From a copy of what git tracks: setuptools builds in the source folder (build/), and a checkout's
    # leftovers (built helpers, demo data) must not decide what the wheel holds.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    source = tmp_path / "source"
    for name in filter(None, tracked.decode().split("\0")):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("battery_trace-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {NAMESPACE}
    assert f"{NAMESPACE}/server/web/static/index.html" in names
    assert f"{NAMESPACE}/protocol/events.py" in names
    assert not [n for n in names if any(f"/{part}/" in f"/{n}" for part in CHECKOUT_ONLY)]
