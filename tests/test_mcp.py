"""MCP servers' tools in Sol: real published servers (mcp-server-time from PyPI, server-everything from
npm), a FastMCP server of our own for the fault cases (tests/mcp_servers/faulty_server.py), consent, the chat
loop, `sol serve --plugin-tools all`, and mcp.json from other apps. Everything runs offline."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sol.core.cli import main
from sol.core.mcp.client import close_all
from sol.core.mcp.servers import McpServers
from sol.core.plugins.manager import PluginManager

FAULTY = str(Path(__file__).parent / "mcp_servers" / "faulty_server.py")
TIME = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "Europe/Lisbon"]


def everything_server() -> str | None:
    """@modelcontextprotocol/server-everything as .ci/run installs it (npm, outside the repo), or on PATH."""
    where = os.environ.get("SOL_TEST_MCP_EVERYTHING") or str(
        Path.home() / ".cache" / "sol-ci" / "npm" / "node_modules" / ".bin" / "mcp-server-everything")
    if Path(where).is_file() and shutil.which("node"):
        return where
    return shutil.which("mcp-server-everything") if shutil.which("node") else None


def children() -> set[int]:
    """Live (not zombie) child processes of this test process."""
    me, out = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                out.add(int(d.name))
    return out


@pytest.fixture(autouse=True)
def no_orphans():
    """Every test ends with the servers it started stopped, and none of their processes left."""
    before = children()
    yield
    close_all()
    deadline = time.time() + 5
    while children() - before and time.time() < deadline:
        time.sleep(0.05)
    assert not children() - before, "an MCP server process outlived Sol"


@pytest.fixture
def roomy_model(tmp_path) -> Path:
    """The tiny test model with room in its context for tool schemas and a JSON result."""
    from conftest import make_tiny_model
    return make_tiny_model(tmp_path / "roomy", context=1024)


def write_config(home: Path, servers: dict) -> Path:
    path = home / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def faulty(mode: str = "ok", **extra) -> dict:
    return {"command": sys.executable, "args": [FAULTY, mode], **extra}


def sol(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- configuration and the command line ------------------------------------------------------
def test_add_list_call_and_remove_the_published_time_server(capsys, isolated_home):
    code, out, _ = sol(capsys, "mcp", "add", "time", "--", *TIME)
    assert code == 0 and "added MCP server time" in out
    saved = json.loads((isolated_home / "mcp.json").read_text())
    assert saved == {"mcpServers": {"time": {"command": TIME[0], "args": TIME[1:]}}}   # the shape others read
    code, out, _ = sol(capsys, "mcp", "list", "--json")
    assert code == 0
    (row,) = json.loads(out)
    assert row == {"name": "time", "transport": "stdio", "state": "running", "error": None,
                   "tools": ["get_current_time", "convert_time"]}
    code, out, _ = sol(capsys, "tools", "list", "--json")
    tools = {t["name"]: t for t in json.loads(out)}
    assert {"calculator", "time.get_current_time", "time.convert_time"} <= set(tools)
    assert tools["time.get_current_time"]["plugin"] == "mcp:time"
    assert tools["time.get_current_time"]["parameters"]["required"] == ["timezone"]   # the server's schema
    code, out, _ = sol(capsys, "tools", "call", "time.get_current_time", "--args", '{"timezone": "Asia/Tokyo"}')
    assert code == 0 and json.loads(out)["timezone"] == "Asia/Tokyo" and "+09:00" in json.loads(out)["datetime"]
    code, out, err = sol(capsys, "tools", "call", "time.get_current_time", "--args", '{"timezone": "Nowhere/X"}')
    assert code == 1 and err.startswith("error: time.get_current_time: ") and "Nowhere/X" in err
    assert len(err.strip().splitlines()) == 1
    code, out, _ = sol(capsys, "mcp", "remove", "time")
    assert code == 0 and json.loads((isolated_home / "mcp.json").read_text()) == {"mcpServers": {}}
    code, out, _ = sol(capsys, "tools", "list", "--json")
    assert not any("." in t["name"] for t in json.loads(out))


@pytest.mark.skipif(everything_server() is None, reason="@modelcontextprotocol/server-everything needs node and "
                    "its npm package (.ci/run installs it into ~/.cache/sol-ci/npm where npm is available)")
def test_the_published_everything_server_from_npm(capsys, isolated_home):
    assert sol(capsys, "mcp", "add", "every", "--", everything_server(), "stdio")[0] == 0
    code, out, _ = sol(capsys, "mcp", "list", "--json")
    (row,) = json.loads(out)
    assert row["state"] == "running" and {"echo", "get-sum", "get-structured-content"} <= set(row["tools"])
    code, out, _ = sol(capsys, "tools", "call", "every.echo", "--args", '{"message": "hello"}')
    assert (code, out) == (0, "Echo: hello\n")
    code, out, _ = sol(capsys, "tools", "call", "every.get-sum", "--args", '{"a": 2, "b": 40}')
    assert code == 0 and "42" in out
    # An embedded resource's text reaches the model, not just the text block around it.
    code, out, _ = sol(capsys, "tools", "call", "every.get-resource-reference",
                       "--args", '{"resourceType": "Text", "resourceId": 2}')
    assert code == 0 and "This is a plaintext resource" in out


def test_streamable_http_server_with_headers(capsys, isolated_home, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, FAULTY, "http", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/mcp"
        assert sol(capsys, "mcp", "add", "web", "--url", url, "--header", "X-Team: sol")[0] == 0
        entry = json.loads((isolated_home / "mcp.json").read_text())["mcpServers"]["web"]
        assert entry == {"url": url, "headers": {"X-Team": "sol"}}
        code, out, _ = sol(capsys, "mcp", "list", "--json")
        (row,) = json.loads(out)
        assert (row["transport"], row["state"], row["error"]) == ("http", "running", None) and "echo" in row["tools"]
        assert sol(capsys, "tools", "call", "web.echo", "--args", '{"text": "over http"}')[1] == "over http\n"
    finally:
        close_all()
        proc.kill()
        proc.wait()


def test_bad_names_and_arguments_are_one_error_line(capsys, isolated_home):
    code, _, err = sol(capsys, "mcp", "add", "my.server", "--", "x")
    assert code == 1 and err == ("error: server name 'my.server': use letters, digits, - and _ "
                                 "(no dots: a tool is named SERVER.TOOL)\n")
    code, _, err = sol(capsys, "mcp", "add", "s")
    assert code == 1 and err.startswith("error: give the server's command after --")
    code, _, err = sol(capsys, "mcp", "add", "s", "--url", "http://x", "--header", "no colon")
    assert code == 1 and "--header 'no colon': write it as 'Name: value'" in err
    assert not (isolated_home / "mcp.json").exists()
    assert sol(capsys, "mcp", "add", "s", "--env", "A=1", "--", "prog", "--flag")[0] == 0
    code, _, err = sol(capsys, "mcp", "add", "s", "--", "prog")
    assert code == 1 and "already in" in err
    assert json.loads((isolated_home / "mcp.json").read_text())["mcpServers"]["s"] == \
        {"command": "prog", "args": ["--flag"], "env": {"A": "1"}}
    code, _, err = sol(capsys, "mcp", "trust", "nope.tool", "allow")
    assert code == 1 and err.startswith("error: no MCP server named 'nope'")


def test_importing_another_apps_file(capsys, isolated_home, tmp_path):
    claude = tmp_path / "claude_desktop_config.json"
    claude.write_text(json.dumps({"mcpServers": {
        "time": {"command": TIME[0], "args": TIME[1:]},
        "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                  "env": {"DEBUG": "1"}},
        "remote.api": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer x"}}},
        "globalShortcut": "Ctrl+Space"}))
    code, out, err = sol(capsys, "mcp", "import", str(claude))
    assert code == 0 and "imported 3 MCP servers" in out and "'remote.api' is named 'remote-api'" in err
    code, out, _ = sol(capsys, "mcp", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"time", "files", "remote-api"}
    assert rows["time"]["state"] == "running" and rows["remote-api"]["transport"] == "http"
    servers = json.loads((isolated_home / "mcp.json").read_text())["mcpServers"]
    assert servers["files"] == {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                                "env": {"DEBUG": "1"}}
    # VS Code's shape ("servers", "type") reads too.
    vscode = tmp_path / "vscode.json"
    vscode.write_text(json.dumps({"servers": {"t2": {"type": "stdio", "command": "x", "args": []}}}))
    assert sol(capsys, "mcp", "import", str(vscode))[0] == 0
    # A malformed file: one error line naming the file and the key; nothing changes.
    before = (isolated_home / "mcp.json").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mcpServers": {"ok": {"command": "x"}, "broken": {"command": "x", "args": "-v"}}}))
    code, _, err = sol(capsys, "mcp", "import", str(bad))
    assert code == 1 and err == f"error: {bad}: mcpServers.broken.args must be a list of strings\n"
    bad.write_text('{"mcpServers": {"a": {"command": "x"},}}')
    code, _, err = sol(capsys, "mcp", "import", str(bad))
    assert code == 1 and err.startswith(f"error: {bad}: invalid JSON at line 1") and len(err.splitlines()) == 1
    bad.write_text(json.dumps({"mcpServers": {"nothing": {"env": {}}}}))
    code, _, err = sol(capsys, "mcp", "import", str(bad))
    assert code == 1 and err.startswith(f"error: {bad}: mcpServers.nothing: no \"command\"")
    assert (isolated_home / "mcp.json").read_text() == before


def test_a_broken_mcp_json_is_named_and_the_rest_of_sol_works(capsys, isolated_home):
    (isolated_home / "mcp.json").write_text('{"mcpServers": {"x": {"command": 3}}}')
    code, _, err = sol(capsys, "mcp", "list")
    assert code == 1 and err == f"error: {isolated_home / 'mcp.json'}: mcpServers.x.command must be the program " \
                                "to run, a non-empty string\n"
    code, out, err = sol(capsys, "tools", "call", "calculator", "--args", '{"expression": "6*7"}')
    assert (code, out) == (0, "42\n")
    assert "MCP servers are off" in PluginManager().tool_notes()[0]


def test_safe_mode_starts_no_server(capsys, isolated_home):
    write_config(isolated_home, {"srv": faulty()})
    assert "srv.echo" in PluginManager().tools()
    close_all()
    assert not any("." in n for n in PluginManager(safe_mode=True).tools())


# ---- faults: each one clear message, the chat's tools still working, no process left ----------
def test_fault_cases_end_in_one_message_and_leave_the_calculator_working(isolated_home):
    write_config(isolated_home, {
        "missing": {"command": "no-such-program-for-sol"},
        "dies": faulty("exit"),
        "noise": faulty("noise", timeout=2),
        "srv": faulty("ok", timeout=2),
    })
    pm = PluginManager()
    t0 = time.perf_counter()
    tools = pm.tools()   # starts all four side by side: the slowest (noise) takes its 2 s timeout
    assert time.perf_counter() - t0 < 15
    assert {n for n in tools if "." in n} == {"srv.echo", "srv.hang", "srv.fail", "srv.count", "srv.write"}
    notes = pm.tool_notes()
    assert sorted(notes) == sorted([
        "MCP server 'missing' is not available: cannot start 'no-such-program-for-sol': no such program "
        "(is it installed, and on PATH?)",
        "MCP server 'dies' is not available: the server closed the connection before answering (it exited at "
        "start) (its last words on stderr: faulty: refusing to start)",
        "MCP server 'noise' is not available: no answer after 2 s while starting; it wrote 'hello, I am not an "
        "MCP server' on stdout, which is not MCP (a server keeps stdout for the protocol)"])
    assert pm.tool_notes() == []   # said once
    calc = {"ok": True, "result": "42"}
    assert pm.call_tool("calculator", {"expression": "6*7"}) == calc
    t0 = time.perf_counter()
    out = pm.call_tool("srv.hang", {}, consent=lambda n, a: "allow")
    assert out == {"ok": False, "error": "srv.hang: no answer after 2 s"} and time.perf_counter() - t0 < 6
    assert pm.call_tool("calculator", {"expression": "6*7"}) == calc
    out = pm.call_tool("srv.fail", {"why": "disk full"}, consent=lambda n, a: "allow")
    assert not out["ok"] and out["error"].startswith("srv.fail: Error executing tool fail")
    assert pm.call_tool("srv.echo", {"text": "still here"}) == {"ok": True, "result": "still here"}
    assert pm.call_tool("calculator", {"expression": "6*7"}) == calc
    # A server that prints garbage on stdout between its answers still answers (the SDK skips the lines).
    write_config(isolated_home, {"garbage": faulty("garbage", timeout=5)})
    pm2 = PluginManager()
    assert pm2.call_tool("garbage.echo", {"text": "through the noise"}) == {"ok": True, "result": "through the noise"}


def test_sol_stops_its_servers_when_it_exits(isolated_home, tmp_path):
    """A `sol` process that started servers (one of them busy in a call that hangs) leaves none behind."""
    marker = f"sol-exit-test-{os.getpid()}-{time.time_ns()}"
    write_config(isolated_home, {"srv": {**faulty("ok", timeout=2), "args": [FAULTY, "ok", marker]},
                                 "other": {**faulty("ok"), "args": [FAULTY, "ok", marker]}})
    env = {**os.environ, "SOL_HOME": str(isolated_home)}
    r = subprocess.run([sys.executable, "-m", "sol.core.cli", "tools", "call", "srv.hang", "--yes"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and r.stderr == "error: srv.hang: no answer after 2 s\n"

    def alive():
        out = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and marker in (d / "cmdline").read_text() and \
                        (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(d.name)
            except OSError:
                pass
        return out
    assert alive() == []


def test_a_call_to_a_failed_servers_tool_says_why(isolated_home, capsys):
    write_config(isolated_home, {"missing": {"command": "no-such-program-for-sol"}})
    code, _, err = sol(capsys, "tools", "call", "missing.anything", "--args", "{}")
    assert code == 1 and err.endswith("error: missing.anything: MCP server 'missing' is not available: cannot start "
                                      "'no-such-program-for-sol': no such program (is it installed, and on PATH?)\n")


def test_a_server_that_crashes_is_started_again_on_the_next_call(isolated_home):
    write_config(isolated_home, {"srv": faulty("ok", timeout=5)})
    servers = McpServers()
    servers.start()
    conn = servers.connection("srv")
    assert conn.call("echo", {"text": "a"}) == {"ok": True, "result": "a"}
    pid = next(p for p in children() if FAULTY in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " "))
    os.kill(pid, 9)
    first = conn.call("echo", {"text": "b"})
    assert not first["ok"] and first["error"].startswith("srv.echo: ")
    assert conn.call("echo", {"text": "c"}) == {"ok": True, "result": "c"}   # a fresh process


# ---- consent ---------------------------------------------------------------------------------
def test_a_denied_call_never_reaches_the_server_and_always_is_not_asked_again(isolated_home, tmp_path, monkeypatch):
    log = tmp_path / "writes.txt"
    write_config(isolated_home, {"srv": faulty("ok", env={"FAULTY_LOG": str(log)})})
    pm = PluginManager()
    tools = pm.tools()
    assert tools["srv.write"].trust == "ask" and tools["srv.echo"].trust == "allow"   # readOnlyHint
    asked = []

    def consent(answer):
        def ask(name, arguments):
            asked.append((name, arguments))
            return answer
        return ask
    out = pm.call_tool("srv.write", {"text": "secret"}, consent=consent("deny"))
    assert out == {"ok": False, "error": "srv.write: the user did not allow this call"}
    assert pm.call_tool("srv.write", {"text": "secret"}) == out   # no one to ask: denied too
    assert not log.exists() and pm.call_tool("srv.count", {})["result"] == "0"   # never sent
    assert pm.call_tool("srv.echo", {"text": "hi"}, consent=consent("deny"))["ok"]   # read-only: not asked
    assert asked == [("srv.write", {"text": "secret"})]
    assert pm.call_tool("srv.write", {"text": "one"}, consent=consent("always"))["ok"]
    assert pm.call_tool("srv.write", {"text": "two"}, consent=consent("deny"))["ok"]   # not asked again
    assert len(asked) == 2 and log.read_text() == "one\ntwo\n"
    saved = json.loads((isolated_home / "mcp.json").read_text())["mcpServers"]["srv"]
    assert saved["toolTrust"] == {"write": "allow"}
    # deny (per tool, or for the whole server) is never sent, whatever the consent says
    assert main(["mcp", "trust", "srv", "deny"]) == 0
    assert main(["mcp", "trust", "srv.write", "deny"]) == 0
    pm = PluginManager()
    out = pm.call_tool("srv.write", {"text": "three"}, consent=consent("allow"))
    assert out["error"] == "srv.write: the user's trust setting denies this tool (`sol mcp trust srv.write ask` " \
                           "lets the model ask)"
    assert not pm.call_tool("srv.echo", {"text": "x"})["ok"]   # the server's deny covers its read-only tools
    assert log.read_text() == "one\ntwo\n"


# ---- the chat loop -----------------------------------------------------------------------------
def script(monkeypatch, tokenizer, *texts):
    """Make the model 'choose' exactly these texts' tokens, then end its turn (as tests/test_chat.py)."""
    import sol.core.generation.engine as engine_mod
    ids = [i for t in texts for i in tokenizer.encode_ids(t, add_special_tokens=False)]
    it = iter(ids)
    end = tokenizer.token_to_id("<|end|>")
    monkeypatch.setattr(engine_mod, "choose", lambda logits, p, g, h=None, explain=True: (next(it, end), None))


def test_a_chat_turn_calls_an_mcp_tool_gets_the_result_and_continues(roomy_model, isolated_home, monkeypatch):
    from sol.core.chat.session import ChatSession
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.engine import GenerationParams
    from sol.core.generation.sampling import SamplingParams
    write_config(isolated_home, {"time": {"command": TIME[0], "args": TIME[1:]}})
    lm = load_model(roomy_model)
    script(monkeypatch, lm.tokenizer, '<|tool_call|>time.get_current_time: {"timezone": "Asia/Tokyo"}<|tool_end|>',
           "It is late.")
    chat = ChatSession(lm, PluginManager())
    p = GenerationParams(max_tokens=200, sampling=SamplingParams(temperature=0))
    events = list(chat.send("what time is it in Tokyo?", p))
    (result,) = [e for e in events if e["type"] == "tool_result"]
    assert result["name"] == "time.get_current_time" and json.loads(result["result"])["timezone"] == "Asia/Tokyo"
    forced = "".join(e["text"] for e in events if e["type"] == "token" and e["forced"])
    assert forced.startswith("<|tool_result|>") and "Asia/Tokyo" in forced   # the model read the result
    answer = [e for e in events if e["type"] == "message" and e["role"] == "assistant"]
    assert answer[-1]["content"] == "It is late."
    # Offered to the model with the server's schema (a template that renders tools writes them in the prompt).
    offered = {t["function"]["name"]: t["function"] for t in chat.plugins.tool_schemas()}
    assert offered["time.get_current_time"]["parameters"]["required"] == ["timezone"]


def test_sol_chat_asks_before_a_tool_that_needs_consent(roomy_model, isolated_home, monkeypatch, capsys, tmp_path):
    from sol.core.formats.checkpoint import load_model
    log = tmp_path / "writes.txt"
    write_config(isolated_home, {"srv": faulty("ok", env={"FAULTY_LOG": str(log)})})
    tok = load_model(roomy_model).tokenizer
    call = '<|tool_call|>srv.write: {"text": "hello"}<|tool_end|>'
    script(monkeypatch, tok, call, "Done.")
    base = ["chat", "--model", str(roomy_model), "--message", "write hello", "--json", "--max-tokens", "80"]
    assert main(base) == 0   # pytest's stdin is no terminal: nobody to ask, so denied
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    (res,) = [e for e in events if e["type"] == "tool_result"]
    assert res["error"] == "srv.write: the user did not allow this call" and not log.exists()
    close_all()
    script(monkeypatch, tok, call, "Done.")
    assert main(base + ["--yes"]) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    (res,) = [e for e in events if e["type"] == "tool_result"]
    assert res["result"] == "wrote 5 characters" and log.read_text() == "hello\n"


def test_a_failed_server_is_a_notice_in_the_chat_and_the_chat_goes_on(roomy_model, isolated_home, monkeypatch):
    from sol.core.chat.session import ChatSession
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.engine import GenerationParams
    from sol.core.generation.sampling import SamplingParams
    write_config(isolated_home, {"dies": faulty("exit")})
    lm = load_model(roomy_model)
    script(monkeypatch, lm.tokenizer, "<|tool_call|>calculator: 6*7<|tool_end|>", "42.")
    chat = ChatSession(lm, PluginManager())
    events = list(chat.send("6 times 7?", GenerationParams(max_tokens=60, sampling=SamplingParams(temperature=0))))
    notices = [e["text"] for e in events if e["type"] == "notice"]
    assert notices == ["MCP server 'dies' is not available: the server closed the connection before answering "
                       "(it exited at start) (its last words on stderr: faulty: refusing to start)"]
    assert [e.get("result") for e in events if e["type"] == "tool_result"] == ["42"]


# ---- sol serve --plugin-tools all -----------------------------------------------------------------
def test_serve_offers_and_runs_only_the_mcp_tools_trusted_allow(roomy_model, isolated_home, monkeypatch, tmp_path):
    from serve_helpers import app_server
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    from sol.core.formats.checkpoint import load_model
    from sol.core.generation.batch import BatchEngine
    from sol.core.serve.app import create_app
    from sol.core.serve.served import Served
    from sol.core.serve.tools import ServerTools
    log = tmp_path / "writes.txt"
    write_config(isolated_home, {"srv": faulty("ok", env={"FAULTY_LOG": str(log)})})
    pm = PluginManager()
    offered = set(ServerTools(pm, "all").runs([]))
    assert {"calculator", "srv.echo", "srv.count"} <= offered and not {"srv.write", "srv.hang", "srv.fail"} & offered
    assert set(ServerTools(pm, "trained").runs(["calculator", "srv.write"])) == {"calculator"}

    lm = load_model(roomy_model)
    engine = BatchEngine(lm.model, lm.tokenizer, max_batch=1)
    engine.start()
    app = create_app([Served("tiny", lm, engine)], plugins=pm, plugin_tools="all")
    with app_server(app, engine) as base:
        url = base + "/v1/chat/completions"
        script(monkeypatch, lm.tokenizer, '<|tool_call|>srv.echo: {"text": "from the server"}<|tool_end|>', "ok")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "echo"}], "max_tokens": 80,
                "temperature": 0}
        msg = httpx.post(url, json=body, timeout=60).json()["choices"][0]["message"]
        assert msg["sol_tool_rounds"] == [{"name": "srv.echo", "arguments": {"text": "from the server"},
                                           "result": "from the server"}]
        # A tool that needs consent is not offered, and a call the model writes anyway is not run.
        script(monkeypatch, lm.tokenizer, '<|tool_call|>srv.write: {"text": "x"}<|tool_end|>', "ok")
        r = httpx.post(url, json=body, timeout=60).json()["choices"][0]
        assert "sol_tool_rounds" not in r["message"] and not log.exists()


def test_sol_chat_asks_on_a_terminal(monkeypatch):
    import io

    from sol.core.commands.chat import consent

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    err = Terminal()
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(sys, "stderr", err)
    answers = iter(["maybe", "a", "", "y"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    ask = consent(yes=False)
    assert ask("srv.write", {"text": "hi"}) == "always"      # "maybe" is asked again
    assert 'The model wants to call srv.write {"text": "hi"}' in err.getvalue()
    assert ask("srv.write", {}) == "deny"                     # Enter is no
    assert ask("srv.write", {}) == "allow"
    assert consent(yes=True)("srv.write", {}) == "allow"


def test_tools_are_ready_at_once_only_when_no_server_is_left_to_start(isolated_home):
    """sol serve lists tools on its event loop when PluginManager.tools_ready() says nothing would start a
    server first; otherwise on a thread (a start may take the server's timeout)."""
    write_config(isolated_home, {"srv": faulty("ok")})
    pm = PluginManager()
    assert not pm.tools_ready()        # not loaded yet
    pm.load()
    assert not pm.tools_ready()        # mcp.json names a server that has not started
    assert "srv.echo" in pm.tools()    # starts it
    assert pm.tools_ready() and not pm.mcp.pending()
    pm.mcp.config.set_disabled("srv", True)
    pm.mcp.reload()
    assert pm.tools_ready()            # a disabled server is never started
    safe = PluginManager(safe_mode=True)
    safe.load()
    assert safe.tools_ready()


def test_a_server_disabled_while_running_is_stopped(isolated_home):
    """set_disabled changes the entry in place (the GUI's Disable): the next reload still sees the change."""
    write_config(isolated_home, {"srv": faulty("ok")})
    servers = McpServers()
    servers.start()
    conn = servers.connection("srv")
    assert conn.state == "running" and children()
    servers.config.set_disabled("srv", True)
    servers.reload()
    assert conn.state == "stopped" and "srv" not in servers._connections
    assert servers.status() == [{"name": "srv", "transport": "stdio", "state": "disabled", "error": None,
                                 "tools": []}]
