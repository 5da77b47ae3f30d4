"""The package's shape, as docs/architecture.md draws it: imports go one way between its parts,
no import cycle (lazy imports inside functions included), no function over 60 lines, and the
ImageNet recipes written as short diffs of shared bases."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "maelab"

# part -> the parts it may import (every part may import errors and atomic, the shared basics)
MAY_IMPORT = {
    "cli": {"commands", "run"},
    "commands": {"config", "run", "weights", "modules", "data", "callbacks", "models"},
    "run": {"config", "weights", "modules", "data", "callbacks", "models"},
    "modules": {"weights", "data", "models"},
    "callbacks": {"data", "models"},
    "data": {"models"},
    "config": {"data", "modules", "models"},  # the contract checks look at the classes a config names
    "weights": {"models"},
    "models": set(),
    "errors": set(),
    "atomic": set(),
    "__init__": set(),
    "__main__": {"cli"},
}
SHARED = {"errors", "atomic", "__init__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every maelab module ``path`` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("maelab")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maelab"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from maelab.run import slurm`
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules} - {"maelab"}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_part_imports_only_the_parts_below_it():
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if part(target) != part(module) and part(target) not in MAY_IMPORT[part(module)] | SHARED
    ]
    assert wrong == []


def test_there_is_no_import_cycle():
    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for target in GRAPH[module]:
                if target == start:
                    return path + [start]
                if target not in path:
                    stack.append((target, path + [target]))
        return None

    cycles = [c for c in map(cycle_from, sorted(GRAPH)) if c is not None]
    assert cycles == []


def test_the_models_are_plain_pytorch():
    for path in (PACKAGE / "models").glob("*.py"):
        third_party = {
            n.module.split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Import | ast.ImportFrom) and (not isinstance(n, ast.ImportFrom) or n.module)
            for a in (n.names if isinstance(n, ast.Import) else [n])
        }
        assert not third_party & {"lightning", "hydra", "omegaconf"}, path.name


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_60_lines(path):
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


IMAGENET_RECIPES = sorted(
    p
    for p in (PACKAGE.parents[1] / "conf" / "experiment").glob("*.yaml")
    if p.stem.startswith(("_imagenet_", "mae_vit", "finetune_vit", "linprobe_vit")) and "cifar10" not in p.stem
)


@pytest.mark.parametrize("path", IMAGENET_RECIPES, ids=lambda p: p.stem)
def test_imagenet_recipes_are_short_diffs(path):
    """The nine sizes and their three shared bases: each under 20 lines that are not comments."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(IMAGENET_RECIPES) == 12 and len(lines) < 20, f"{path.name}: {len(lines)} lines"
