"""docs/screenshots/mcp.png: the Plugins panel's MCP servers tab with the official time server running,
server-everything (npm) where it is installed, and a server whose command is missing.

    SOL_HOME=$(mktemp -d) xvfb-run -a -s "-screen 0 1400x900x24" python docs/screenshots/make_mcp.py
"""
import json
import os
import shutil
import sys
from pathlib import Path

from sol.core.formats.registry import data_dir

servers = {"time": {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone", "Europe/Lisbon"]},
           "weather": {"command": "mcp-weather-server-not-installed"}}
everything = shutil.which("mcp-server-everything") or str(
    Path.home() / ".cache" / "sol-ci" / "npm" / "node_modules" / ".bin" / "mcp-server-everything")
if os.path.isfile(everything):
    servers["everything"] = {"command": everything, "args": ["stdio"], "toolTrust": {"gzip-file-as-resource": "deny"}}
data_dir().mkdir(parents=True, exist_ok=True)
(data_dir() / "mcp.json").write_text(json.dumps({"mcpServers": servers}))

from window import spin, win  # noqa: E402 (the shared window)

win.show_panel("plugins")
panel = win.panel("plugins")
panel.tabs.setCurrentIndex(1)
tab = panel.mcp_tab
spin(60, lambda: tab.state_of("time") == "running" and not tab.busy)
names = [r["name"] for r in tab.rows]
tab.servers.selectRow(names.index("everything" if "everything" in names else "time"))
spin(1)
win.grab().save("docs/screenshots/mcp.png")
print("saved docs/screenshots/mcp.png")
