"""Fourteen ways a third-party plugin can misbehave, installed for real (a wheel, through
`sol plugins install`): Sol lists each as broken with its reason, and `plugins list`, `tools list`,
`tools call calculator`, training and the GUI keep working (issue 15, item 10)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

PLUGINS = {
    "tool_none": '''
from sol.core.plugins.hooks import ToolSpec, hookimpl
@hookimpl
def sol_tools():
    return [ToolSpec(name=None, description="no name", parameters={"type": "object"}, func=lambda a: 1)]
''',
    "params_none": '''
from sol.core.plugins.hooks import ToolSpec, hookimpl
@hookimpl
def sol_tools():
    return [ToolSpec(name="nullparams", description="x", parameters=None, func=lambda a: 1)]
''',
    "twice": '''
from sol.core.plugins.hooks import ToolSpec, hookimpl
@hookimpl
def sol_tools():
    return [ToolSpec(name="twicetool", description="x", parameters={"type": "object"}, func=lambda a: "twice")]
''',
    "cli_raises": '''
from sol.core.plugins.hooks import hookimpl
@hookimpl
def sol_cli_commands(subparsers):
    raise RuntimeError("no commands today")
''',
    "chat_raises": '''
from sol.core.plugins.hooks import hookimpl
@hookimpl
def sol_chat_event(event):
    raise RuntimeError("cannot watch")
''',
    "hangs": '''
import time
time.sleep(3600)
''',
    "stage_only": '''
from sol.core.plugins.hooks import StageSpec, hookimpl
def add(p):
    p.add_argument("--word", default="hi")
def run(args, emit):
    emit({"type": "start", "stage": "echo", "max_steps": 2})
    emit({"type": "step", "step": 1, "loss": 0.5})
    emit({"type": "step", "step": 2, "reward": 1.0})
    emit({"type": "done", "out": args.out})
    return args.out
@hookimpl
def sol_training_stages():
    return [StageSpec("echo-stage", "echo a word", add, run)]
''',
    "stage_bad_args": '''
from sol.core.plugins.hooks import StageSpec, hookimpl
def add(p):
    raise RuntimeError("no flags")
@hookimpl
def sol_training_stages():
    return [StageSpec("bad-stage", "broken flags", add, lambda args, emit: None)]
''',
    "calc_again": '''
from sol.core.plugins.hooks import ToolSpec, hookimpl
@hookimpl
def sol_tools():
    return [ToolSpec(name="calculator", description="a second calculator", parameters={"type": "object"},
                     func=lambda a: "not the real one")]
''',
    "panel_bad_field": '''
from sol.core.plugins.hooks import PanelSpec, hookimpl
@hookimpl
def sol_panels():
    return [PanelSpec("badpanel", "Bad", None)]
''',
    "panel_raises": '''
from sol.core.plugins.hooks import PanelSpec, hookimpl
def make(ctx):
    raise RuntimeError("panel boom")
@hookimpl
def sol_panels():
    return [PanelSpec("boompanel", "Boom", make, order=500)]
''',
    "import_raises": '''
raise RuntimeError("boom at import")
''',
    "exit_at_import": '''
raise SystemExit(3)
''',
    "returns_junk": '''
from sol.core.plugins.hooks import hookimpl
@hookimpl
def sol_tools():
    return [42]
''',
}
# entry-point name -> module (the module "twice" is registered under two names)
ENTRY_POINTS = {**{n: n for n in PLUGINS}, "twice_again": "twice"}


def build_wheel(folder: Path, dist: str, version: str, prefix: str) -> Path:
    """A pure-Python wheel written by hand (no build backend needed, as pip installs it offline)."""
    files = {f"{prefix}{name}.py": src.encode() for name, src in PLUGINS.items()}
    di = f"{dist.replace('-', '_')}-{version}.dist-info"
    eps = "[sol.plugins]\n" + "".join(f"{ep} = {prefix}{mod}\n" for ep, mod in ENTRY_POINTS.items())
    files[f"{di}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{di}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{di}/entry_points.txt"] = eps.encode()
    record = ""
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(data)}\n"
    files[f"{di}/RECORD"] = (record + f"{di}/RECORD,,\n").encode()
    whl = folder / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return whl


def pip_show(dist):
    return subprocess.run([sys.executable, "-m", "pip", "show", dist], capture_output=True, text=True).returncode == 0


@pytest.fixture(scope="module")
def misbehaving(tmp_path_factory):
    suffix = uuid.uuid4().hex[:8]
    dist, prefix = f"sol-misbehave-{suffix}", f"solmis_{suffix}_"
    whl = build_wheel(tmp_path_factory.mktemp("whl"), dist, "0.1.0", prefix)
    home = tmp_path_factory.mktemp("solhome")
    env = {**os.environ, "SOL_HOME": str(home), "HF_HOME": str(home / "hf"), "SOL_PLUGIN_IMPORT_TIMEOUT": "2",
           "QT_QPA_PLATFORM": "offscreen"}
    env.pop("SOL_SAFE_MODE", None)

    def sol(*args, timeout=120, cwd=None):
        return subprocess.run([sys.executable, "-m", "sol.core.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=cwd)
    r = sol("plugins", "install", whl, "--no-deps", timeout=300)
    yield sol, r, whl, dist, home
    if pip_show(dist):
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", dist], capture_output=True)


def listed(sol):
    r = sol("plugins", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {p["name"]: p for p in json.loads(r.stdout)}


def test_install_reports_each_plugin_and_the_broken_ones(misbehaving):
    sol, r, *_ = misbehaving
    assert r.returncode == 1, r.stderr          # some plugins of the distribution are broken
    assert "installed plugin stage_only 0.1.0 (ok)" in r.stdout
    assert "installed plugin tool_none 0.1.0 (broken: sol_tools TypeError: ToolSpec.name must be" in r.stdout
    assert "Traceback" not in r.stderr


def test_plugins_list_names_what_is_wrong_with_each(misbehaving):
    sol, *_ = misbehaving
    t0 = time.monotonic()
    p = listed(sol)
    assert time.monotonic() - t0 < 60
    assert p["calculator"]["status"] == "ok"
    broken = {n: p[n]["error"] for n in p if p[n]["status"] == "broken"}
    assert "ToolSpec.name" in broken["tool_none"]
    assert "ToolSpec.parameters" in broken["params_none"]
    assert "PanelSpec.factory" in broken["panel_bad_field"]
    assert "import failed: RuntimeError: boom at import" == broken["import_raises"]
    assert "SystemExit" in broken["exit_at_import"]
    assert "returned int" in broken["returns_junk"]
    assert "import took longer than 2 s" in broken["hangs"]
    assert "two entry-point names" in broken["twice_again"]
    assert p["twice"]["status"] == "ok" and p["twice"]["hooks"] == ["sol_tools"]   # the first keeps its hooks
    assert "tool 'calculator' skipped" in p["calc_again"]["error"]
    assert "also offered by plugin 'calc_again'" in p["calculator"]["error"]      # both say so
    # the hung import is remembered: the next run does not wait for it again
    t0 = time.monotonic()
    assert "in an earlier run" in listed(sol)["hangs"]["error"]
    assert time.monotonic() - t0 < 30


def test_tools_keep_working(misbehaving):
    sol, *_ = misbehaving
    r = sol("tools", "list", "--json")
    assert r.returncode == 0, r.stderr
    tools = {t["name"]: t["plugin"] for t in json.loads(r.stdout)}
    assert tools["calculator"] == "calculator" and tools["twicetool"] == "twice"
    assert "nullparams" not in tools and None not in tools
    r = sol("tools", "call", "calculator", "--args", '{"expression": "12*7"}')
    assert r.returncode == 0 and r.stdout.strip() == "84", r.stderr
    r = sol("tools", "call", "nosuch")
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "calculator" in r.stderr


def test_failures_in_commands_and_chat_events_are_remembered(misbehaving):
    sol, *_ = misbehaving
    assert listed(sol)["cli_raises"]["status"] == "ok"     # nothing called it yet
    r = sol("tools", "list", "--nosuch-flag")               # builds the whole parser, plugins' commands too
    assert "Traceback" not in r.stderr
    r = sol("--help")
    assert r.returncode == 0
    p = listed(sol)
    assert p["cli_raises"]["status"] == "broken"
    assert "sol_cli_commands raised RuntimeError: no commands today" in p["cli_raises"]["error"]
    r = sol("chat", "--model", "starter", "--message", "hi", "--max-tokens", 2, timeout=300)
    assert r.returncode == 0, r.stderr
    p = listed(sol)
    assert p["chat_raises"]["status"] == "broken" and "cannot watch" in p["chat_raises"]["error"]
    r = sol("plugins", "enable", "chat_raises")             # tries it again
    assert r.returncode == 0
    assert listed(sol)["chat_raises"]["status"] == "ok"


def test_a_plugin_stage_with_only_its_own_flags_runs(misbehaving, tmp_path):
    sol, *_ = misbehaving
    r = sol("train", "echo-stage", "--word", "yo", "--out", tmp_path / "echo")
    assert r.returncode == 0, r.stderr
    assert "2/2" in r.stderr and "loss 0.5000" in r.stderr and "reward 1" in r.stderr
    r = sol("train", "echo-stage", "--out", tmp_path / "echo2", "--events", "-")
    assert r.returncode == 0 and [json.loads(x)["type"] for x in r.stdout.splitlines()][-1] == "done"
    r = sol("train", "bad-stage", "--out", tmp_path / "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_safe_mode_before_the_subcommand(misbehaving):
    sol, *_ = misbehaving
    r = sol("--safe-mode", "plugins", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {p["name"]: p for p in json.loads(r.stdout)}
    assert rows["tool_none"]["error"] == "not loaded: safe mode"


def test_reinstall_and_sol_itself(misbehaving):
    sol, _, whl, dist, _ = misbehaving
    r = sol("plugins", "install", whl, "--no-deps", timeout=300)
    assert "registers no plugin" not in r.stderr
    assert "reinstalled plugin stage_only 0.1.0 (ok)" in r.stdout
    r = sol("plugins", "install", "sol-lab")
    assert r.returncode == 1 and "Sol itself" in r.stderr and "uninstall" not in r.stderr
    assert "Looking in" not in r.stderr                     # pip was never run


def test_a_bare_folder_name_is_the_folder(tmp_path, monkeypatch):
    from sol.core.commands.plugins import pip_spec
    (tmp_path / "myplugin").mkdir()
    (tmp_path / "myplugin" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.chdir(tmp_path)
    assert pip_spec("myplugin") == str(tmp_path / "myplugin")
    assert pip_spec("someplugin") == "someplugin"


def test_the_gui_opens_with_every_misbehaving_plugin(misbehaving, tmp_path):
    sol, *_ = misbehaving
    shot = tmp_path / "plugins.png"
    r = sol("gui", "--panel", "plugins", "--screenshot", shot, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert shot.is_file() and shot.stat().st_size > 1000
    assert "Traceback" not in r.stderr
    r = sol("gui", "--panel", "nosuch")
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr


# ---- 11. docs/plugins.md names what a plugin author needs -------------------------------------------
DOC = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text(encoding="utf-8")


def test_docs_name_every_panel_context_attribute_that_exists():
    import re

    from sol.app.context import PanelContext
    section = DOC[DOC.index("| attribute | what it is |"):DOC.index("A panel's `icon`")]
    names = set(re.findall(r"`context\.(\w+)", section))
    assert {"loaded", "model", "tokenizer", "chat_session", "store", "plugins", "device", "run", "stream",
            "setting", "set_setting"} <= names
    assert all(hasattr(PanelContext, n) or n in ("store", "plugins", "device", "chat_session", "last_answer")
               for n in names)
    for signal in re.findall(r"`(\w+)\(", section[section.index("signals"):]):
        assert isinstance(getattr(PanelContext, signal), object) and hasattr(PanelContext, signal)


def test_docs_list_every_chat_event_type_and_the_stage_contract():
    import re
    chat_src = (Path(__file__).resolve().parents[1] / "core" / "chat" / "session.py").read_text()
    types = set(re.findall(r'"type": "(\w+)"', chat_src)) - {"function"}
    section = DOC[DOC.index("## Chat events"):DOC.index("## Tools: fields")]
    assert types and all(f"| `{t}` |" in section for t in types)
    for words in ("run(args, emit)", "--events", "--out", "Name clashes", "first loaded wins", "Installing offline",
                  "absolute path", "SOL_PLUGIN_IMPORT_TIMEOUT", "sol --safe-mode"):
        assert words in DOC, words


def test_a_panel_icon_may_be_a_file_in_the_plugins_package(tmp_path):

    from sol.app.resources import icon_path
    icon = tmp_path / "icon.svg"
    icon.write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    assert icon_path(str(icon)) == str(icon)
    assert icon_path(str(tmp_path / "missing.svg")) == ""
    assert icon_path("chat.svg").endswith("chat.svg")
