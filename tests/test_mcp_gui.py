"""MCP in the GUI (pytest-qt, offscreen): the chat's consent prompt and the Plugins panel's MCP tab."""
from __future__ import annotations

import json

from conftest import make_tiny_model  # noqa: E402
from test_mcp import TIME, faulty, no_orphans, script, write_config  # noqa: F401  (no_orphans: the fixture)


def test_the_chat_asks_before_an_mcp_tool_runs(window, qtbot, tmp_path, isolated_home, monkeypatch):
    from PySide6.QtCore import Qt

    from sol.core.formats.checkpoint import load_model
    win, ctx = window
    log = tmp_path / "writes.txt"
    write_config(isolated_home, {"srv": faulty("ok", env={"FAULTY_LOG": str(log)})})
    ctx.plugins.mcp.reload()
    lm = load_model(make_tiny_model(tmp_path / "m", context=1024))
    ctx.set_model(lm)
    chat = win.panel("chat")
    chat.params.max_tokens.setValue(80)
    chat.params.temperature.setValue(0)
    call = '<|tool_call|>srv.write: {"text": "from the gui"}<|tool_end|>'

    def turn(click):
        script(monkeypatch, lm.tokenizer, call, "Done.")
        chat.send("please write")
        if click is not None:
            qtbot.waitUntil(lambda: not chat.consent_bar.isHidden(), timeout=30_000)
            assert "srv.write" in chat.consent_bar.label.text() and "from the gui" in chat.consent_bar.label.text()
            qtbot.mouseClick(click, Qt.LeftButton)
        qtbot.waitUntil(lambda: not chat.busy, timeout=30_000)
        assert chat.consent_bar.isHidden()
        return chat.cards[-1]

    card = turn(chat.consent_bar.deny_btn)
    assert card.result == "error: srv.write: the user did not allow this call"
    assert not log.exists()                                   # a denied call never reached the server
    turn(chat.consent_bar.always_btn)
    assert log.read_text() == "from the gui\n"
    saved = json.loads((isolated_home / "mcp.json").read_text())["mcpServers"]["srv"]
    assert saved["toolTrust"] == {"write": "allow"}
    turn(None)                                                # allowed always: not asked again
    assert log.read_text() == "from the gui\nfrom the gui\n"


def test_the_plugins_panel_lists_servers_their_tools_and_trust(window, qtbot, tmp_path, isolated_home):
    win, ctx = window
    write_config(isolated_home, {"srv": faulty("ok"), "dies": faulty("exit")})
    ctx.plugins.mcp.reload()
    panel = win.panel("plugins")
    tab = panel.mcp_tab
    panel.tabs.setCurrentIndex(1)                             # servers start when the tab is first shown
    qtbot.waitUntil(lambda: tab.state_of("srv") == "running" and not tab.busy, timeout=30_000)
    assert tab.state_of("dies") == "failed"
    row = [r["name"] for r in tab.rows].index("dies")
    assert "exited at start" in tab.servers.item(row, 4).text()
    tab.servers.selectRow(row)
    assert "faulty: refusing to start" in tab.log.toPlainText()   # its stderr
    tab.servers.selectRow([r["name"] for r in tab.rows].index("srv"))
    tools = {tab.tools.item(r, 0).text(): tab.tools.cellWidget(r, 1) for r in range(tab.tools.rowCount())}
    assert set(tools) == {"echo", "hang", "fail", "count", "write"}
    assert tools["echo"].currentText() == "allow" and tools["write"].currentText() == "ask"   # readOnlyHint
    tools["write"].setCurrentIndex(tools["write"].findData("deny"))
    assert json.loads((isolated_home / "mcp.json").read_text())["mcpServers"]["srv"]["toolTrust"] == {"write": "deny"}
    # Add the published time server from the form, then disable and remove it.
    tab.name_edit.setText("time")
    tab.where_edit.setText(" ".join(TIME))
    tab.add_btn.click()
    qtbot.waitUntil(lambda: tab.state_of("time") == "running" and not tab.busy, timeout=30_000)
    assert "time.get_current_time" in ctx.plugins.tools()
    tab.servers.selectRow([r["name"] for r in tab.rows].index("time"))
    tab.toggle_btn.click()
    qtbot.waitUntil(lambda: tab.state_of("time") == "disabled" and not tab.busy, timeout=30_000)
    assert "time.get_current_time" not in ctx.plugins.tools()
    tab.servers.selectRow([r["name"] for r in tab.rows].index("time"))
    tab.remove_btn.click()
    assert "time" not in json.loads((isolated_home / "mcp.json").read_text())["mcpServers"]
    tab.name_edit.setText("bad.name")
    tab.where_edit.setText("x")
    tab.add_btn.click()
    assert tab.status.text().startswith("error: server name 'bad.name'")
