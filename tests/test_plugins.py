"""The plugin manager: built-ins, isolation of broken plugins, enable/disable, safe mode, tools, the CLI."""
import json
import sys
import textwrap

import pytest

from sol.core.cli import main
from sol.core.errors import SolError
from sol.core.plugins.manager import PluginManager

KEYS = {"name", "version", "builtin", "enabled", "status", "error", "hooks"}

PLUGINS = {
    "good_plugin": """
        from sol.core.plugins.hooks import hookimpl, ToolSpec, PanelSpec
        NAME = "good"
        VERSION = "2.0"
        SEEN = []

        @hookimpl
        def sol_tools():
            return [ToolSpec("echo", "Repeat a text.", {"type": "object", "properties": {"text": {"type": "string"}},
                                                         "required": ["text"]}, lambda a: a["text"])]

        @hookimpl
        def sol_chat_event(event):
            SEEN.append(event["type"])

        def _boom(ctx):
            raise RuntimeError("panel factory exploded")

        @hookimpl
        def sol_panels():
            return [PanelSpec("good", "Good", _boom)]
    """,
    "bad_import": """
        raise RuntimeError("boom at import time")
    """,
    "bad_hook": """
        from sol.core.plugins.hooks import hookimpl
        @hookimpl
        def sol_tools():
            raise ValueError("cannot make my tools")
    """,
    "bad_event": """
        from sol.core.plugins.hooks import hookimpl
        CALLS = []
        @hookimpl
        def sol_chat_event(event):
            CALLS.append(event)
            raise KeyError("observer fell over")
    """,
    "bad_return": """
        from sol.core.plugins.hooks import hookimpl
        @hookimpl
        def sol_tools():
            return ["not a ToolSpec"]
    """,
    "typo_hook": """
        from sol.core.plugins.hooks import hookimpl
        @hookimpl
        def sol_tool():
            return []
    """,
    "plain_functions": """
        # no @hookimpl: a function named like a hook is still taken as one
        from sol.core.plugins.hooks import ToolSpec
        def sol_tools():
            return [ToolSpec("upper", "Upper-case a text.", {"type": "object", "required": ["text"]},
                             lambda a: a["text"].upper())]
    """,
    "odd_tools": """
        import time
        from sol.core.plugins.hooks import hookimpl, ToolSpec
        NAME = "odd"
        def _raise(a):
            raise RuntimeError("tool failed on purpose")
        @hookimpl
        def sol_tools():
            return [ToolSpec("fails", "", {"type": "object"}, _raise),
                    ToolSpec("sleeps", "", {"type": "object"}, lambda a: time.sleep(5)),
                    ToolSpec("opaque", "", {"type": "object"}, lambda a: object()),
                    ToolSpec("calculator", "a second calculator", {"type": "object"}, lambda a: 0)]
    """,
    "cli_plugin": """
        from sol.core.plugins.hooks import hookimpl
        @hookimpl
        def sol_cli_commands(subparsers):
            p = subparsers.add_parser("hello", help="say hello")
            p.set_defaults(func=lambda args: print("hello from a plugin") or 0)
    """,
    "bad_cli_plugin": """
        from sol.core.plugins.hooks import hookimpl
        @hookimpl
        def sol_cli_commands(subparsers):
            raise RuntimeError("no commands today")
    """,
}


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    d = tmp_path / "plugin_modules"
    d.mkdir()
    for name, src in PLUGINS.items():
        (d / f"{name}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(d))
    yield d
    for name in PLUGINS:
        sys.modules.pop(name, None)


def by_name(pm):
    return {p.name: p for p in pm.plugins()}


def test_builtins_are_listed_by_the_cli(capsys):
    assert main(["plugins", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(set(r) == KEYS for r in rows)
    calc = next(r for r in rows if r["name"] == "calculator")
    assert calc == {"name": "calculator", "version": calc["version"], "builtin": True, "enabled": True,
                    "status": "ok", "error": None, "hooks": ["sol_tools"]}
    assert all(r["builtin"] for r in rows)   # no third-party plugin in a clean environment
    # every package under plugins/ shows up, named by its NAME
    import pkgutil

    import sol.plugins
    assert len(rows) == sum(1 for m in pkgutil.iter_modules(sol.plugins.__path__) if m.ispkg)


def test_broken_plugins_are_reported_and_the_rest_keeps_working(plugin_dir):
    pm = PluginManager(extra_modules=["good_plugin", "bad_import", "bad_hook", "bad_return", "typo_hook"])
    pm.load()
    p = by_name(pm)
    assert p["good"].status == "ok" and p["good"].version == "2.0"
    assert p["good"].hooks == ["sol_chat_event", "sol_panels", "sol_tools"]
    assert p["bad_import"].status == "broken"
    assert p["bad_import"].error == "import failed: RuntimeError: boom at import time"
    assert "boom at import time" in p["bad_import"].traceback and "Traceback" in p["bad_import"].traceback
    assert p["bad_hook"].status == "broken"
    assert p["bad_hook"].error == "sol_tools raised ValueError: cannot make my tools"
    assert "cannot make my tools" in p["bad_hook"].traceback
    assert p["bad_return"].status == "broken" and "expected ToolSpec" in p["bad_return"].error
    assert p["typo_hook"].status == "broken" and "unknown hook 'sol_tool'" in p["typo_hook"].error
    assert set(pm.tools()) == {"calculator", "echo"}
    assert pm.call_tool("calculator", {"expression": "12*7"}) == {"ok": True, "result": "84"}
    assert pm.call_tool("echo", {"text": "hi"}) == {"ok": True, "result": "hi"}
    assert all(d["builtin"] or d["name"] != "calculator" for d in (i.to_dict() for i in pm.plugins()))


def test_a_plain_function_named_like_a_hook_works(plugin_dir):
    pm = PluginManager(extra_modules=["plain_functions"])
    assert pm.call_tool("upper", {"text": "sol"}) == {"ok": True, "result": "SOL"}


def test_call_tool_never_raises(plugin_dir):
    pm = PluginManager(extra_modules=["odd_tools"])
    pm.load()
    assert pm.call_tool("fails", {}) == {"ok": False, "error": "tool failed on purpose"}
    assert pm.call_tool("sleeps", {}, timeout_s=0.2) == {"ok": False, "error": "sleeps: no answer after 0.2 s"}
    out = pm.call_tool("opaque", {})
    assert out["ok"] and out["result"].startswith("<object object")
    assert pm.call_tool("nope", {})["error"].startswith("no tool named 'nope'")
    assert pm.call_tool("calculator", [1])["error"] == "calculator: arguments must be a JSON object, not list"
    assert pm.call_tool("calculator", {})["error"] == "calculator: missing argument 'expression'"
    assert pm.call_tool("calculator", {"expression": "1/0"}) == {"ok": False, "error": "division by zero"}
    # the built-in calculator keeps its name; the shadowing one is skipped with a note
    assert pm.tools()["calculator"].plugin == "calculator"
    assert "skipped" in by_name(pm)["odd"].error and by_name(pm)["odd"].status == "ok"


def test_a_raising_chat_observer_is_isolated(plugin_dir):
    import bad_event
    import good_plugin
    pm = PluginManager(extra_modules=["bad_event", "good_plugin"])
    for kind in ("token", "message", "error"):
        pm.chat_event({"type": kind})
    assert good_plugin.SEEN == ["token", "message", "error"]
    assert len(bad_event.CALLS) == 1            # broken after its first failure, then skipped
    assert by_name(pm)["bad_event"].error == "sol_chat_event raised KeyError: 'observer fell over'"


def test_a_raising_panel_factory_gives_none_and_marks_the_plugin(plugin_dir):
    pm = PluginManager(extra_modules=["good_plugin"])
    (panel,) = [p for p in pm.panels() if p.plugin == "good"]
    assert pm.create_panel(panel, context=None) is None
    assert by_name(pm)["good"].status == "broken"
    assert "panel factory exploded" in by_name(pm)["good"].error
    assert "good" not in {p.plugin for p in pm.panels()} and "echo" not in pm.tools()


def test_enable_and_disable_persist(plugin_dir, isolated_home):
    pm = PluginManager(extra_modules=["good_plugin"])
    pm.disable("calculator")
    pm.disable("good")
    assert "calculator" not in pm.tools() and "echo" not in pm.tools()
    again = PluginManager(extra_modules=["good_plugin"])
    p = by_name(again)
    assert not p["calculator"].enabled and not p["good"].enabled and p["calculator"].status == "ok"
    assert again.tools() == {}
    assert json.loads((isolated_home / "plugins.json").read_text()) == {"disabled": ["calculator", "good"]}
    again.enable("calculator")
    assert "calculator" in PluginManager().tools()
    with pytest.raises(SolError, match="no plugin named 'nope'"):
        again.enable("nope")


def test_a_damaged_state_file_leaves_every_plugin_enabled(isolated_home):
    (isolated_home / "plugins.json").write_text("{not json")
    assert "calculator" in PluginManager().tools()
    assert (isolated_home / "plugins.json").read_text() == "{not json"   # not overwritten behind the user's back


def test_safe_mode_loads_no_third_party_plugin(plugin_dir, monkeypatch):
    import good_plugin  # noqa: F401  (imported only to prove safe mode does not register it)
    monkeypatch.setenv("SOL_SAFE_MODE", "1")
    pm = PluginManager(extra_modules=["good_plugin", "bad_import"])
    p = by_name(pm)
    assert p["good_plugin"].error == "not loaded: safe mode" and p["good_plugin"].hooks == []
    assert p["bad_import"].status == "ok"      # never imported, so it cannot fail
    assert set(pm.tools()) == {"calculator"}
    assert set(PluginManager(safe_mode=False, extra_modules=["good_plugin"]).tools()) == {"calculator", "echo"}


def test_plugin_cli_commands_and_a_failing_one(plugin_dir):
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    pm = PluginManager(extra_modules=["cli_plugin", "bad_cli_plugin"])
    pm.add_cli_commands(sub)
    args = parser.parse_args(["hello"])
    assert args.func(args) == 0
    assert by_name(pm)["bad_cli_plugin"].error == "sol_cli_commands raised RuntimeError: no commands today"


def test_tools_cli(capsys):
    assert main(["tools", "list", "--json"]) == 0
    tools = json.loads(capsys.readouterr().out)
    calc = next(t for t in tools if t["name"] == "calculator")
    assert calc["parameters"]["required"] == ["expression"] and calc["plugin"] == "calculator"
    assert main(["tools", "call", "calculator", "--args", '{"expression": "2**64"}', "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "result": "18446744073709551616"}
    assert main(["tools", "call", "calculator", "--args", '{"expression": "9**9**9**9"}', "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and "too large" in out["error"]
    assert main(["tools", "call", "calculator", "--args", "{oops", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"].startswith("--args: invalid JSON")
    assert main(["tools", "call", "calculator", "--args", '{"expression": "6*7"}']) == 0
    assert capsys.readouterr().out == "42\n"


def test_plugins_cli_enable_disable_and_errors(capsys):
    assert main(["plugins", "disable", "calculator"]) == 0
    assert main(["tools", "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert "calculator" not in json.loads(out.splitlines()[-1]) and "disabled plugin calculator" in out
    assert main(["plugins", "enable", "calculator"]) == 0
    assert main(["plugins", "enable", "nope"]) == 1
    assert "error: no plugin named 'nope'" in capsys.readouterr().err
    assert main(["plugins", "uninstall", "calculator"]) == 1
    assert "built into Sol" in capsys.readouterr().err
    assert main(["plugins", "install", "--", "--index-url=http://evil"]) == 1
    assert "not a pip option" in capsys.readouterr().err


def test_the_worked_example_in_docs_works(tmp_path, monkeypatch, capsys):
    import argparse
    import re
    from pathlib import Path

    import tomllib
    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    toml = re.search(r"`pyproject.toml`:\n\n```toml\n(.*?)```", doc, re.S).group(1)
    module = re.search(r"`sol_wordcount.py`:\n\n```python\n(.*?)```", doc, re.S).group(1)
    project = tomllib.loads(toml)
    assert project["project"]["entry-points"]["sol.plugins"] == {"wordcount": "sol_wordcount"}
    (tmp_path / "sol_wordcount.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pm = PluginManager(extra_modules=["sol_wordcount"])
        assert pm.call_tool("wordcount", {"text": "hear me speak"}) == {"ok": True, "result": 3}
        pm.chat_event({"type": "message", "role": "assistant", "content": "one two"})
        assert sys.modules["sol_wordcount"].WORDS_WRITTEN == 2
        parser = argparse.ArgumentParser()
        pm.add_cli_commands(parser.add_subparsers())
        (tmp_path / "t.txt").write_text("a b c d")
        args = parser.parse_args(["wordcount", str(tmp_path / "t.txt")])
        assert args.func(args) == 0 and capsys.readouterr().out == "4\n"
        assert by_name(pm)["sol_wordcount"].status == "ok"
    finally:
        sys.modules.pop("sol_wordcount", None)
