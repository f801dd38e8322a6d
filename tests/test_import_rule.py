"""The import rule of the layers (docs/ARCHITECTURE.md): stages never import stages, and the library never
imports stages or benchmarks. Read from the source with ast, so a lazy import inside a function
counts too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LIBRARY = REPO / "distill"
STAGES = LIBRARY / "stages"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_stages_never_import_stages():
    offenders = {}
    for path in sorted(STAGES.glob("*.py")):
        if path.name == "__init__.py":  # the registry: it lists the stages in order
            continue
        bad = sorted(name for name in imported_modules(path) if name.startswith("distill.stages"))
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"stages importing stages: {offenders}"


def test_the_library_never_imports_stages_or_benchmarks():
    offenders = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        if STAGES in path.parents:
            continue
        bad = sorted(name for name in imported_modules(path)
                     if name.startswith(("distill.stages", "benchmarks")) or name == "benchmarks")
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, f"library modules importing stages or benchmarks: {offenders}"


# The library's layers, lowest first (docs/ARCHITECTURE.md): a module may import its own layer and those
# below it, never one above. Each entry is a top-level module or a package.
LAYERS = [
    ("distill.errors", "distill.io", "distill.precision", "distill.targets"),
    ("distill.sections", "distill.losses"),
    ("distill.sparsity",),
    ("distill.config",),
    ("distill.runtime", "distill.data", "distill.models", "distill.student"),
    ("distill.run",),
    ("distill.train", "distill.eval", "distill.export"),
    ("distill.stages",),
]


def layer_of(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if any(module == unit or module.startswith(unit + ".") for unit in layer):
            return index
    return None


def test_every_library_module_sits_in_a_layer_and_imports_only_its_own_or_lower_ones():
    upward, unplaced = {}, []
    for path in sorted(LIBRARY.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if module == "distill":
            continue  # the package's own __init__: the version and the registration entry point
        own = layer_of(module)
        if own is None:
            unplaced.append(module)
            continue
        bad = sorted(name for name in imported_modules(path)
                     if name.startswith("distill.") and (layer_of(name) or 0) > own)
        if bad:
            upward[module] = bad
    assert not unplaced, f"modules outside every layer (add them to LAYERS and docs/ARCHITECTURE.md): {unplaced}"
    assert not upward, f"imports of a higher layer: {upward}"


def test_sparsity_and_losses_never_import_the_config():
    """Each kind of sparsity owns its config section (distill/sparsity/*_config.py), and the loss its own
    (distill.sections): distill.config composes them, never the other way."""
    offenders = {}
    for path in sorted((LIBRARY / "sparsity").rglob("*.py")) + [LIBRARY / "losses.py", LIBRARY / "sections.py"]:
        bad = sorted(name for name in imported_modules(path) if name == "distill.config" or name.startswith("distill.config."))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, f"modules importing distill.config: {offenders}"


def test_at_most_ten_modules_sit_directly_in_the_package():
    assert len(list(LIBRARY.glob("*.py"))) <= 10


def test_the_rule_sees_an_import_it_forbids(tmp_path):
    """The checker itself: a lazy stage import inside a function is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from distill.stages.train import speed_up\n    import benchmarks.quality\n")
    assert {"distill.stages.train", "benchmarks.quality"} <= imported_modules(module)


def test_benchmarks_call_the_library_not_stage_internals():
    offenders = {}
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        bad = sorted(name for name in imported_modules(path) if name.startswith("distill.stages"))
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"benchmarks importing stage internals: {offenders}"


# "readable on one screen": the longest function the library may hold
MAX_FUNCTION_LINES = 70


def test_no_library_function_is_longer_than_a_screen():
    long = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}::{node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
