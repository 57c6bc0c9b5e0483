"""napari's rule: the engine never imports Qt."""
import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "core"
QT = ("PySide6", "PyQt5", "PyQt6", "qtpy", "pyqtgraph", "superqt", "shiboken6")
# `sol gui` opens the desktop app: the one import from core into sol.app, inside the command (the layer
# contract in pyproject.toml names the same exception).
OPENS_THE_GUI = ("core/commands/gui.py", "sol.app.main")


def _imported_modules(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_no_qt_import_anywhere_under_core():
    offenders = [f"{f.relative_to(CORE.parent)}:{line} imports {mod}"
                 for f in CORE.rglob("*.py") for line, mod in _imported_modules(f)
                 if mod.split(".")[0] in QT
                 or (mod.startswith(("sol.app", "app.")) and (f.relative_to(CORE.parent).as_posix(), mod) != OPENS_THE_GUI)]
    assert not offenders, "core/ must stay headless:\n" + "\n".join(offenders)


def test_importing_every_core_module_loads_no_qt():
    mods = sorted("sol.core." + ".".join(f.relative_to(CORE).with_suffix("").parts)
                  for f in CORE.rglob("*.py") if f.name != "__init__.py")
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {QT!r}]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_checker_catches_a_qt_import(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("import os\nfrom PySide6.QtCore import QObject\n")
    assert any(m.startswith("PySide6") for _, m in _imported_modules(f))
