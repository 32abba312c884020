"""The one-way layers hold: `lint-imports` keeps pyproject's contract, and breaks on a violation.

The contract (`[tool.importlinter]` in pyproject.toml, drawn in the README's
Layout) is what keeps the packages from importing each other in
a circle again. It runs in `make lint` too; here it runs as part of the suite,
and a second run on a copy with one upward import proves it can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages: list[str] = config["tool"]["importlinter"]["root_packages"]
    return packages


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The copy's packages must win over the editable install's.
    env["PYTHONPATH"] = str(cwd)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(cwd / "pyproject.toml")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


def test_every_product_package_is_in_the_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = {name for name in config["tool"]["setuptools"]["packages"]["find"]["include"]
                 if "." not in name}
    assert set(_packages()) == installed
    layered = {
        name.strip()
        for contract in config["tool"]["importlinter"]["contracts"]
        if contract["type"] == "layers"
        for layer in contract["layers"]
        for name in layer.split("|")
    }
    assert layered == installed


def test_the_layers_are_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    for name in _packages():
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    leaf = tmp_path / "domain" / "triggers.py"
    leaf.write_text(leaf.read_text() + "\nfrom observability.metrics import Metrics  # noqa\n"
                    "from worker.app import App  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout
    assert "domain.triggers -> worker.app" in result.stdout


def test_the_wheel_carries_every_product_module(tmp_path: Path) -> None:
    """The editable install finds modules by path; a wheel only has what setuptools
    was told. `worker/dlq/` once went missing from it, and every image's CLI with it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps",
         "--quiet", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = tmp_path.glob("waddle_ai-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    expected = {
        str(path.relative_to(ROOT))
        for name in _packages()
        for path in (ROOT / name).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected - shipped == set(), "modules the wheel leaves out"
    assert "config/migrations/0001_initial.sql" in shipped
