"""Imports point one way (DESIGN.md): cli → pipelines / training → adapters / loading → core → torch.

The test reads every import statement of the package, at module level and inside functions, so it fails
as soon as someone adds one that points back."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "latentgen"

# Each layer may import its own layer and the layers below it (lower number), never one above.
LAYERS = {
    "errors": 0,
    "autoencoder": 1,
    "unet": 1,
    "text": 1,
    "denoiser": 1,
    "samplers": 1,
    "schedulers": 1,
    "noise": 1,
    "config": 1,
    "images": 1,
    "infotext": 1,
    "data": 1,
    "validation": 1,
    "memory": 1,  # the memory guard
    "loading": 2,
    "adapters": 2,
    "pipelines": 3,
    "hires": 3,
    "training": 4,  # uses pipelines for its sample grids; pipelines never import training
    "cli": 5,
}
# Third-party packages only some layers may import.
ONLY = {"typer": {"cli"}, "rich": {"cli"}}
NEVER = {"transformers", "diffusers", "peft"}  # test references, never imported at run time


def top_part(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def imports_of(source: str, rel_parts: tuple[str, ...]):
    """(line, imported latentgen part or None, top-level third-party package or None) of every import in the
    source of the module at `rel_parts` (its path inside the package, without the suffix)."""
    tree = ast.parse(source)
    package = list(rel_parts[:-1]) if rel_parts[-1] != "__init__" else list(rel_parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                name = a.name.split(".")
                if name[0] == "latentgen":
                    yield node.lineno, (name[1] if len(name) > 1 else None), None
                else:
                    yield node.lineno, None, name[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                if target:
                    yield node.lineno, target[0], None
                else:  # `from . import x` at the package root
                    for a in node.names:
                        yield node.lineno, a.name, None
            elif node.module.split(".")[0] == "latentgen":
                parts = node.module.split(".")
                if len(parts) > 1:
                    yield node.lineno, parts[1], None
                else:
                    for a in node.names:
                        yield node.lineno, a.name, None
            else:
                yield node.lineno, None, node.module.split(".")[0]


MODULES = sorted(p for p in SRC.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {top_part(p) for p in MODULES} - {"__init__"} <= set(LAYERS), "add new top-level modules to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    me = top_part(path)
    if me == "__init__":
        return
    bad = []
    for line, part, third in imports_of(path.read_text(), path.relative_to(SRC).with_suffix("").parts):
        if part is not None and part in LAYERS and LAYERS[part] > LAYERS[me]:
            bad.append(f"line {line}: {me} (layer {LAYERS[me]}) imports {part} (layer {LAYERS[part]})")
        if third in ONLY and me not in ONLY[third]:
            bad.append(f"line {line}: {me} imports {third}, which only {sorted(ONLY[third])} may")
        if third in NEVER:
            bad.append(f"line {line}: {me} imports {third}, a test reference")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_level_and_relative_imports():
    """The parser itself: imports inside a function, relative two levels up or absolute, are found."""
    source = "def f():\n    from ..cli.app import fail\n    import typer\n    from latentgen import pipelines\n"
    found = list(imports_of(source, ("text", "probe")))
    assert (2, "cli", None) in found and (3, None, "typer") in found and (4, "pipelines", None) in found
