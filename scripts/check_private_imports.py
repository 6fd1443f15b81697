#!/usr/bin/env python3
"""Fail on imports that cross medseg's package boundaries through private names or hide in functions.

Checks every ``.py`` file under the package root (default: ``src/medseg`` beside this
script's folder) and, for private names only, the extra folders given with ``--also``:

1. ``from medseg.X import _name``, ``from medseg.X._module import ...``, ``import
   medseg.X._module`` and ``alias._name`` (``alias`` a medseg module imported by the file)
   where the importing module is outside package ``medseg.X``: a private name is used
   across packages. Make it public in its proper home instead. Dunder names such as
   ``__version__`` are public.
2. (package root only) ``from medseg... import`` or ``import medseg...`` inside a function
   body: an import hidden from the module's top, which is how import cycles hide. Only the
   packages that need an optional extra may be imported lazily (:data:`OPTIONAL_EXTRAS`).

Prints ``path:line: message`` per problem and exits 1 if there is any (0 otherwise).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT_PACKAGE = "medseg"
# Packages whose import needs an optional extra (pyproject's ``hospital``: pydicom,
# highdicom, DICOMweb, FastAPI); they may be imported inside the function that needs them,
# so that everything else works without the extra.
OPTIONAL_EXTRAS = ("medseg.dicom", "medseg.pacs", "medseg.serve")


def _module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(module: str) -> str:
    """``medseg.X`` for any ``medseg.X...`` (a top-level module such as ``medseg.api`` is its own)."""
    return ".".join(module.split(".")[:2])


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _nodes_in_functions(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(func) if n is not func)
    return inside


def _is_lazy_extra(target: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in OPTIONAL_EXTRAS)


def check_file(path: Path, module: str, *, functions: bool) -> Iterator[str]:
    """Problems of one file (``module`` its dotted name; ``functions``: check rule 2)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    own = _package_of(module) if module.startswith(ROOT_PACKAGE + ".") else module
    inside = _nodes_in_functions(tree) if functions else set()
    aliases: dict[str, str] = {}  # local name -> medseg module it names
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            if target != ROOT_PACKAGE and not target.startswith(ROOT_PACKAGE + "."):
                continue
            names = [f"{target}.{a.name}" if target == ROOT_PACKAGE else target for a in node.names]
            if id(node) in inside and not all(_is_lazy_extra(n) for n in names):
                yield f"{where}: `from {target} import ...` inside a function (import at the top)"
            for alias in node.names:
                full = f"{target}.{alias.name}"
                aliases[alias.asname or alias.name] = full
                owner = _package_of(full) if target == ROOT_PACKAGE else _package_of(target)
                if owner == own:
                    continue
                if _is_private(alias.name) or any(_is_private(p) for p in target.split(".")):
                    yield f"{where}: private name `{full}` imported from outside {owner}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                if target != ROOT_PACKAGE and not target.startswith(ROOT_PACKAGE + "."):
                    continue
                if id(node) in inside and not _is_lazy_extra(target):
                    yield f"{where}: `import {target}` inside a function (import at the top)"
                if alias.asname:
                    aliases[alias.asname] = target
                if _package_of(target) != own and any(_is_private(p) for p in target.split(".")):
                    yield f"{where}: private module `{target}` imported from outside its package"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _is_private(node.attr)
        ):
            target = aliases[node.value.id]
            if _package_of(target) != own:
                yield (
                    f"{path}:{node.lineno}: private name `{target}.{node.attr}` "
                    f"used from outside {_package_of(target)}"
                )


def check(package_root: Path, also: list[Path]) -> list[str]:
    """Every problem under ``package_root`` (both rules) and ``also`` (private names only)."""
    problems = []
    for path in sorted(package_root.rglob("*.py")):
        problems += check_file(path, _module_name(path, package_root), functions=True)
    for folder in also:
        for path in sorted(folder.rglob("*.py")):
            problems += check_file(path, f"{folder.name}.{path.stem}", functions=False)
    return problems


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package_root", nargs="?", type=Path, default=here / "src" / ROOT_PACKAGE)
    parser.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        help="a folder (benchmarks, tests...) checked for private names only",
    )
    args = parser.parse_args(argv)
    problems = check(args.package_root, args.also)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} import problem(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
