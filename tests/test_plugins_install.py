"""A third-party plugin distribution, end to end: build, `sol plugins install`, use, disable, uninstall."""
import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from sol.core.cli import main

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "1.2.3"
description = "A test plugin for Sol"

[project.entry-points."sol.plugins"]
shout = "{module}"

[tool.setuptools]
py-modules = ["{module}"]
"""

MODULE = '''
from sol.core.plugins.hooks import hookimpl, ToolSpec

@hookimpl
def sol_tools():
    return [ToolSpec(name="shout", description="Upper-case a text.",
                     parameters={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
                     func=lambda args: args["text"].upper() + "!")]
'''


def sol(*args):
    return subprocess.run([sys.executable, "-m", "sol.core.cli", *args], capture_output=True, text=True, timeout=300)


def pip_show(dist):
    return subprocess.run([sys.executable, "-m", "pip", "show", dist], capture_output=True, text=True).returncode == 0


@pytest.fixture
def plugin_project(tmp_path):
    suffix = uuid.uuid4().hex[:8]
    dist, module = f"sol-shout-test-{suffix}", f"sol_shout_test_{suffix}"
    d = tmp_path / "shout"
    d.mkdir()
    (d / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT.format(dist=dist, module=module)))
    (d / f"{module}.py").write_text(MODULE)
    yield d, dist, module
    # Leave the environment as we found it, whatever happened above.
    if pip_show(dist):
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", dist], capture_output=True)
    sys.modules.pop(module, None)


def test_install_use_disable_uninstall(plugin_project, capsys):
    folder, dist, module = plugin_project
    r = sol("plugins", "install", str(folder), "--no-deps", "--no-build-isolation")
    assert r.returncode == 0, r.stderr
    assert "Successfully installed" in r.stderr          # pip's own output, streamed through
    assert "installed plugin shout 1.2.3 (ok)" in r.stdout

    r = sol("tools", "list", "--json")                    # a fresh process sees the new tool
    assert r.returncode == 0, r.stderr
    assert {t["name"]: t["plugin"] for t in json.loads(r.stdout)}["shout"] == "shout"

    assert main(["tools", "call", "shout", "--args", '{"text": "sol"}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "result": "SOL!"}
    assert main(["plugins", "list", "--json"]) == 0
    row = next(p for p in json.loads(capsys.readouterr().out) if p["name"] == "shout")
    assert row == {"name": "shout", "version": "1.2.3", "builtin": False, "enabled": True, "status": "ok",
                   "error": None, "hooks": ["sol_tools"]}

    assert main(["plugins", "list", "--json", "--safe-mode"]) == 0
    row = next(p for p in json.loads(capsys.readouterr().out) if p["name"] == "shout")
    assert row["error"] == "not loaded: safe mode"

    assert main(["plugins", "disable", "shout"]) == 0
    assert main(["tools", "call", "shout", "--args", '{"text": "sol"}', "--json"]) == 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["ok"] is False
    assert main(["plugins", "list", "--json"]) == 0
    assert next(p for p in json.loads(capsys.readouterr().out) if p["name"] == "shout")["enabled"] is False

    assert main(["plugins", "uninstall", "shout"]) == 0
    assert "Successfully uninstalled" in capsys.readouterr().err
    assert not pip_show(dist)
    assert main(["plugins", "list", "--json"]) == 0
    assert "shout" not in {p["name"] for p in json.loads(capsys.readouterr().out)}


def test_a_failing_pip_install_is_an_error(tmp_path, capsys):
    assert main(["plugins", "install", str(tmp_path / "missing-folder"), "--no-deps", "--no-build-isolation"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: pip could not install") and len(err) > 1   # pip's reason is above
