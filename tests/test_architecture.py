"""The shape of the package that docs/architecture.md promises: imports point down the layers,
modules stay small, public functions take few parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "srdvol"

#: What each package (or top-level module) may import from srdvol, as docs/architecture.md says.
BASE = {"errors", "values", "axes", "interrupt", "progress"}
ALLOWED = {
    "errors": set(),
    "values": {"errors"},
    "axes": {"errors"},
    "interrupt": set(),
    "progress": {"errors"},
    "options": BASE | {"model"},  # model.config only: checked below
    "core": BASE,
    "model": BASE,
    "ngff": BASE | {"options"},
    "training": BASE | {"options", "core", "model", "ngff"},
    "predict": BASE | {"options", "core", "model", "ngff"},
    "simulate": BASE | {"options", "ngff"},
    "dask": BASE | {"options", "core", "model", "ngff", "training", "predict"},
    "app": None,  # the top: anything
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _owner(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> set[str]:
    """The srdvol modules ``path`` imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("srdvol"):
            if node.module == "srdvol":
                found |= {f"srdvol.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("srdvol.")}
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    owner = _owner(path)
    allowed = ALLOWED.get(owner, set()) if owner != "__init__" else None
    if allowed is None:
        return
    for module in _imports(path):
        target = module.split(".")[1]
        if target == owner or target == "__version__":
            continue
        assert target in allowed, f"{path.relative_to(PACKAGE)} imports {module}"
        if owner == "options" and target == "model":
            assert module == "srdvol.model.config", module  # pydantic only, no torch


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small_and_public_functions_take_few_parameters(path):
    text = path.read_text()
    assert text.count("\n") <= 500, f"{path.name}: {text.count(chr(10))} lines"
    if path.relative_to(PACKAGE).as_posix() == "app/cli.py":
        return  # typer's declarative option lists
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith(
            "_"
        ):
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            count = len([n for n in names if n not in ("self", "cls")])
            count += bool(args.vararg) + bool(args.kwarg)
            assert count <= 8, f"{path.name}:{node.lineno} {node.name} takes {count} parameters"


def test_the_command_line_loads_without_torch_or_distributed():
    import subprocess
    import sys

    code = (
        "import sys, srdvol.app.cli; "
        "print(sorted(m for m in ('torch', 'distributed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
