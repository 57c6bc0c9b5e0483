"""The house's rules: core's layers and contracts (import-linter, pyproject.toml), a light `sol --help`,
built-in plugins registered like any plugin, and the old import paths kept for one release."""
from __future__ import annotations

import shutil
import subprocess
import sys
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
CONTRACTS = re.findall(r'^name = "(.+)"$', PYPROJECT.read_text().split("[tool.importlinter]")[1], re.M)


def lint(cwd: Path, env_path: str | None = None) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True))")
    env = None
    if env_path is not None:
        import os
        env = {**os.environ, "PYTHONPATH": env_path}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_hold(tmp_path):
    r = lint(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in CONTRACTS:
        assert f"{name} KEPT" in r.stdout


def test_a_planted_import_breaks_each_contract(tmp_path):
    """A copy of the tree with one forbidden import for each contract: every contract must say BROKEN."""
    root = tmp_path / "tree"
    (root / "sol").mkdir(parents=True)   # a namespace package, as installed: PYTHONPATH puts it first
    ignore = shutil.ignore_patterns("__pycache__", "*.cpp", "*.h")
    for top in ("core", "plugins", "app"):
        shutil.copytree(REPO / top, root / "sol" / top, ignore=ignore)
    plants = {
        "sol/core/model/config.py": "from ..generation import engine  # a lower layer importing a higher one\n",
        "sol/core/formats/registry.py": "import PySide6  # Qt in core\n",
        "sol/plugins/calculator/__init__.py": "from sol.core.model import quant  # not a public module\n",
    }
    for rel, line in plants.items():
        f = root / rel
        f.write_text(f.read_text() + line)
    r = lint(tmp_path, env_path=str(root))
    assert r.returncode != 0
    for name in CONTRACTS:
        assert f"{name} BROKEN" in r.stdout, r.stdout
    assert "sol.core.model.config -> sol.core.generation.engine" in r.stdout
    assert "sol.core.formats.registry -> PySide6" in r.stdout
    assert "sol.plugins.calculator -> sol.core.model.quant" in r.stdout


def test_the_command_list_does_not_import_torch():
    """`sol --help` builds every command's parser; torch (~2 s to import) must wait for a command that
    needs a model."""
    code = ("import sys; from sol.core.cli import build_parser; build_parser(); "
            "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'PySide6') if m in sys.modules); "
            "print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "serve" in r.stdout


def test_sol_train_still_lists_its_stages():
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for stage in ("pretrain", "sft", "reward", "rl", "recipe"):
        assert stage in r.stdout


def test_every_builtin_plugin_is_registered_by_sols_distribution():
    from importlib import metadata
    declared = {ep.name: ep.value for ep in metadata.entry_points(group="sol.plugins")
                if ep.dist is not None and ep.dist.metadata["Name"] == "sol-lab"}
    folders = {d.name for d in (REPO / "plugins").iterdir() if (d / "__init__.py").is_file()}
    assert declared == {name: f"sol.plugins.{name}" for name in folders}


def test_core_folders_stay_small():
    """Rooms, not one hall: at most 20 Python files a folder, and at top level only what every layer uses,
    the `sol` entry point and the old paths kept for one release."""
    core = REPO / "core"
    for folder in [core, *(d for d in core.rglob("*") if d.is_dir() and d.name != "__pycache__")]:
        assert len(list(folder.glob("*.py"))) <= 20, folder
    top = {f.stem for f in core.glob("*.py")}
    assert top == {"__init__", "errors", "atomic", "devices", "cli", "_moved",
                   "hooks", "store", "engine", "checkpoint", "tokenizer"}


OLD_PATHS = {   # old module: (a name, the new module that defines it)
    "sol.core.hooks": ("hookimpl", "sol.core.plugins.hooks"),
    "sol.core.store": ("Store", "sol.core.chat.store"),
    "sol.core.plugins": ("PluginManager", "sol.core.plugins.manager"),
    "sol.core.engine": ("Engine", "sol.core.generation.engine"),
    "sol.core.checkpoint": ("LoadedModel", "sol.core.formats.loaded"),
    "sol.core.model": ("Transformer", "sol.core.model.transformer"),
    "sol.core.tokenizer": ("Tokenizer", "sol.core.formats.tokenizer"),
    "sol.core.train.loop": ("Stage", "sol.core.train.loop"),
    "sol.core.train.options": ("train_config", "sol.core.train.options"),
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_import_paths_still_work_and_say_where_to_go(old):
    name, new = OLD_PATHS[old]
    code = (f"import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            f"import importlib; new = getattr(importlib.import_module({new!r}), {name!r})\n"
            f"try:\n"
            f"    from {old} import {name} as got\n"
            f"except DeprecationWarning as w:\n"
            f"    print('warned:', w)\n"
            f"warnings.simplefilter('ignore')\n"
            f"from {old} import {name} as got\n"
            f"print('same' if got is new else 'different')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if old == new:   # train.loop and train.options did not move
        assert r.stdout.strip() == "same"
    else:
        assert r.stdout.splitlines() == [f"warned: {old}.{name} has moved to {new}.{name}; import it from there "
                                         "(the old path goes in Sol 0.2)", "same"]
