"""The layout a newcomer reads from the tree (README, "Layout"): which package may import which, and
the sizes that keep each file one concern. Read from the source's import statements, nothing run."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("autoencoder", "ldm", "runtime", "training")
COMMANDS = {"train_autoencoder.py", "train_ldm.py", "distill.py", "evaluate.py", "prepare_data.py", "posthoc_ema.py", "export.py"}
SCHEMAS = {"config.py", "autoencoder_config.py", "ldm_config.py", "distill_config.py", "__init__.py"}


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of the library."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every library module ``path`` imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
            package = ".".join(path.relative_to(ROOT).with_suffix("").parts[: -node.level])
            names.add(f"{package}.{node.module}" if node.module else package)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_import_directions_of_the_design_hold():
    rules = [  # (importer, what it must not import, why)
        ("training.data", ("training.run", "training.stage1", "training.stage2", "training.eval"), "data/ stands alone"),
        ("training.run", ("training.data", "training.stage1", "training.stage2", "training.eval"), "run/ stands alone"),
        ("ldm", ("training",), "a user who only generates never imports training code"),
        ("autoencoder", ("training", "ldm"), "stage 1 knows nothing of stage 2"),
        ("runtime", ("autoencoder", "ldm", "training"), "every package may import runtime/, it imports none of them"),
    ]
    for command in ("train_autoencoder", "train_ldm", "distill", "evaluate", "prepare_data", "posthoc_ema", "export"):  # commands import no command
        rules.append(("training.", (f"training.{command}",), "a command is imported by no library module"))
    broken = []
    for module, path in _modules().items():
        for importer, forbidden, why in rules:
            if _within(module, importer.rstrip(".")) and not module.endswith(tuple(forbidden)):
                broken += [f"{module} imports {name} ({why})" for name in _imports(path) if any(_within(name, f) for f in forbidden)]
    assert not broken, "\n".join(broken)


def test_only_the_pipeline_and_generation_use_the_autoencoder_package_in_ldm():
    users = {m for m, path in _modules().items() if m.startswith("ldm") and any(_within(n, "autoencoder") for n in _imports(path))}
    assert users <= {"ldm.pipeline"}, users


def test_the_training_top_level_holds_the_commands_and_the_config_only():
    top = {p.name for p in (ROOT / "training").glob("*.py")}
    assert top == COMMANDS | SCHEMAS, sorted(top - COMMANDS - SCHEMAS)
    assert {p.name for p in (ROOT / "training").iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "data", "run", "stage1", "stage2", "eval",
    }  # fmt: skip


def test_no_library_file_is_over_300_lines_and_each_train_function_over_110():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long
    for job, function in (("train_autoencoder", "train"), ("train_ldm", "train"), ("distill", "distill")):
        (train,) = [n for n in ast.parse((ROOT / "training" / f"{job}.py").read_text()).body if getattr(n, "name", "") == function]
        assert train.end_lineno - train.lineno + 1 + len(train.decorator_list) <= 110, job
