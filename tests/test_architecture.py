"""The layers hold: import-linter's contracts and the private-import check pass on the package
and fail on a copy of it with a deliberately added upward, private or hidden import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "src" / "medseg"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CHECK = REPO / "scripts" / "check_private_imports.py"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """``tmp_path/src/medseg``, a copy of the package, with the project's import-linter config."""
    shutil.copytree(SOURCE, tmp_path / "src" / "medseg", ignore=shutil.ignore_patterns("static"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root/src`` with ``root/pyproject.toml``."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_private(package: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), str(package)], capture_output=True, text=True, timeout=120
    )


def add_line(path: Path, line: str) -> None:
    """Insert ``line`` after the module's ``from __future__`` import."""
    text = path.read_text()
    anchor = "from __future__ import annotations\n"
    assert anchor in text, path
    path.write_text(text.replace(anchor, anchor + line + "\n", 1))


def test_the_contracts_hold_on_the_package(copy: Path):
    result = lint_imports(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(copy: Path):
    add_line(copy / "src" / "medseg" / "io" / "files.py", "import medseg.cli  # noqa: F401")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "medseg.io.files -> medseg.cli" in result.stdout
    assert "BROKEN" in result.stdout


def test_an_import_between_independent_siblings_breaks_the_layers_contract(copy: Path):
    add_line(copy / "src" / "medseg" / "tuning" / "search.py", "import medseg.distillation")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "medseg.tuning.search -> medseg.distillation" in result.stdout


def test_a_cycle_inside_a_stage_breaks_its_contract(copy: Path):
    # predictor <-> batch was a cycle hidden in a function; the inference contract forbids it.
    add_line(
        copy / "src" / "medseg" / "inference" / "predictor.py", "import medseg.inference.batch"
    )
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "medseg.inference.predictor -> medseg.inference.batch" in result.stdout


def test_a_module_without_a_layer_breaks_the_layers_contract(copy: Path):
    (copy / "src" / "medseg" / "newstage.py").write_text('"""A stage nobody placed."""\n')
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "medseg.newstage" in result.stdout


def test_the_private_import_check_passes_on_the_package():
    result = check_private(SOURCE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_private_import_check_finds_a_private_name_across_packages(copy: Path):
    package = copy / "src" / "medseg"
    add_line(
        package / "workflow.py",
        "from medseg.evaluation.evaluate import _count_case  # noqa: F401",
    )
    result = check_private(package)
    assert result.returncode == 1
    assert "workflow.py" in result.stdout and "_count_case" in result.stdout


def test_the_private_import_check_finds_an_import_hidden_in_a_function(copy: Path):
    package = copy / "src" / "medseg"
    path = package / "io" / "files.py"
    path.write_text(
        path.read_text()
        + "\n\ndef _hidden() -> None:\n    from medseg.planning import read_plan  # noqa: F401\n"
    )
    result = check_private(package)
    assert result.returncode == 1
    assert "files.py" in result.stdout and "inside a function" in result.stdout


def _module_named_by(test_file: Path) -> bool:
    """``tests/<pkg>/test_<module>[_<topic>].py`` names a module of ``medseg.<pkg>`` (or a
    name its ``__init__`` exports); ``tests/test_<module>.py`` a top-level module or package."""
    source = REPO / "src" / "medseg"
    stem = test_file.stem.removeprefix("test_")
    if test_file.parent.name == "tests":
        candidates = [source / f"{stem}.py", source / stem]
        return stem == "architecture" or any(c.exists() for c in candidates)
    package = source / test_file.parent.name
    parts = stem.split("_")
    prefixes = ["_".join(parts[:i]) for i in range(1, len(parts) + 1)]
    if any((package / f"{p}.py").exists() for p in prefixes):
        return True
    init = (package / "__init__.py").read_text()
    return any(f'"{p}"' in init for p in prefixes)  # a name in the package's __all__


def test_tests_follow_the_source_layout():
    test_files = sorted((REPO / "tests").glob("test_*.py")) + sorted(
        p for p in (REPO / "tests").glob("*/test_*.py") if p.parent.name != "helpers"
    )
    assert len(test_files) > 40
    strays = [str(p.relative_to(REPO)) for p in test_files if not _module_named_by(p)]
    assert not strays, f"test files that name no module: {strays}"
    packages = {p.name for p in (REPO / "src" / "medseg").iterdir() if (p / "__init__.py").exists()}
    folders = {p.parent.name for p in test_files if p.parent.name != "tests"}
    assert folders <= packages, f"test folders without a package: {folders - packages}"
