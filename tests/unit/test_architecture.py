"""The package's layers (docs/architecture.md): imports flow one way, from the command line down to the method.

Every ``import`` in src/loramoe is parsed, including the ones inside functions, so a lazy import cannot hide an
upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "loramoe"

CORE = {
    "config", "layer", "inject", "routing", "loss", "adapter", "errors", "files", "validation", "weights", "hub", "card",
    "dirlock", "strict_json",
}  # fmt: skip
# Higher layers may import lower ones and their own package; a package never imports a sibling of its own layer.
LAYERS = {
    "core": 0,
    "data": 1,
    "models": 1,
    "inference": 1.5,  # running a loaded model: above models and data, below the jobs
    "training": 2,
    "eval": 2,
    "analysis": 2,
    "demo": 3,
    "serve": 3,
    "cli": 4,
}


def unit_of(parts: tuple[str, ...]) -> str:
    """The layer unit of the module ``loramoe.<parts>``: "core" for the method and its helpers, else its package."""
    if not parts or parts[0] == "__init__":
        return "core"
    head = parts[0]
    if head == "__main__":  # python -m loramoe: the command line
        return "cli"
    if head in CORE or (head.startswith("_") and head not in LAYERS):  # private helpers of the core
        return "core"
    return head


def module_parts(path: Path, root: Path = SRC) -> tuple[str, ...]:
    return tuple(path.relative_to(root).with_suffix("").parts)


def imported_modules(path: Path, root: Path = SRC) -> list[tuple[int, tuple[str, ...]]]:
    """``(line, parts after "loramoe")`` of every loramoe import in the file, top-level or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_parts(path, root)
    package = here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join(("loramoe", *base, *([node.module] if node.module else [])))
            else:
                module = node.module or ""
            names = [module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "loramoe":
                found.append((node.lineno, tuple(parts[1:])))
    return found


def facade_imports(path: Path, root: Path = SRC) -> list[int]:
    """Lines of ``import loramoe`` / ``from loramoe import x`` (or a relative import that resolves to the package
    itself): imports of the package ``__init__``, the facade of the library's names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_parts(path, root)[:-1]
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(alias.name == "loramoe" for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = (*base, *(node.module.split(".") if node.module else []))
            else:
                target = (
                    tuple((node.module or "").split("."))[1:]
                    if (node.module or "").split(".")[0] == "loramoe"
                    else None
                )
            if target == ():
                lines.append(node.lineno)
    return lines


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    unknown = sorted({unit_of(module_parts(p)) for p in modules()} - set(LAYERS))
    assert not unknown, f"put {unknown} in a layer: LAYERS here and the table in docs/architecture.md"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_down(path):
    unit = unit_of(module_parts(path))
    wrong = []
    for line, target in imported_modules(path):
        other = unit_of(target)
        if other == unit:
            continue
        if LAYERS.get(other, 99) >= LAYERS[unit]:
            wrong.append(
                f"line {line}: loramoe.{'.'.join(target) or '__init__'} ({other}, layer {LAYERS.get(other)})"
            )
    assert not wrong, (
        f"{path.relative_to(SRC)} ({unit}, layer {LAYERS[unit]}) imports upward or sideways: {wrong}"
    )


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "loramoe" / "training"
    pkg.mkdir(parents=True)
    module = pkg / "x.py"
    module.write_text("def f():\n    from loramoe.cli import main\n    from ..demo import run\n")
    assert [t for _, t in imported_modules(module, tmp_path / "loramoe")] == [("cli",), ("demo",)]


def test_the_readme_layout_names_every_module_and_package():
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Project layout", 1)[1].split("```")[1]
    # Private helpers (_name.py) need no entry.
    top = {p.name for p in SRC.iterdir() if p.suffix == ".py" and not p.name.startswith("_")}
    packages = {f"{p.name}/" for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    missing = sorted(name for name in top | packages if name not in block)
    assert not missing, f"README's project layout does not mention {missing}"


@pytest.mark.parametrize(
    "path", [p for p in modules() if p != SRC / "__init__.py"], ids=lambda p: str(p.relative_to(SRC))
)
def test_no_module_imports_the_package_facade(path):
    # loramoe/__init__ re-exports the core for users; inside the package a name comes from the module that
    # defines it, so the core never imports back up through __init__ and nothing depends on the facade.
    lines = facade_imports(path)
    assert not lines, (
        f"{path.relative_to(SRC)} line(s) {lines}: imports the package facade (`from loramoe import ...` or "
        "`import loramoe`); import each name from its module (`from loramoe.adapter import load_adapter`, "
        "`from loramoe._version import __version__`)"
    )


def test_the_facade_checker_sees_absolute_relative_and_submodule_forms(tmp_path):
    pkg = tmp_path / "loramoe" / "eval"
    pkg.mkdir(parents=True)
    module = pkg / "x.py"
    module.write_text(
        "import loramoe\nfrom loramoe import load_adapter\nfrom .. import inject\n"
        "from loramoe.adapter import save_adapter\nimport loramoe.layer\nfrom . import engine\n"
    )
    assert facade_imports(module, tmp_path / "loramoe") == [1, 2, 3]


def test_no_module_is_over_400_lines():
    # A module past 400 lines has usually grown a second concept; split it by concept, not by size.
    long = {
        str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"split by concept (docs/architecture.md): {long}"
