"""`sol tools`: the tools plugins and MCP servers give the chat; list them, call one by hand.

An MCP tool is named SERVER.TOOL. `sol tools call` is the user's own call, so a tool trusted `ask`
runs without a question; one trusted `deny` runs only with --yes."""
from __future__ import annotations

import json
import sys

from .common import print_json
from .plugins import add_safe_mode, manager


def register(sub) -> None:
    p = sub.add_parser("tools", help="tools the model can call in the chat")
    tsub = p.add_subparsers(dest="tools_command", metavar="ACTION", required=True)
    lp = tsub.add_parser("list", help="every tool of every enabled plugin and MCP server")
    lp.add_argument("--json", action="store_true")
    add_safe_mode(lp)
    lp.set_defaults(func=run_list)
    cp = tsub.add_parser("call", help="call a tool as the chat would: sol tools call calculator --args "
                                      "'{\"expression\": \"12*7\"}'")
    cp.add_argument("name")
    cp.add_argument("--args", default="{}", help="the arguments, a JSON object")
    cp.add_argument("--json", action="store_true", help='print {"ok": ..., "result"|"error": ...}')
    cp.add_argument("--yes", action="store_true", help="run it even where its trust is `deny` (for scripts)")
    add_safe_mode(cp)
    cp.set_defaults(func=run_call)


def run_list(args) -> int:
    pm = manager(args)
    tools = pm.tools()
    for note in pm.tool_notes():
        sys.stderr.write(f"warning: {note}\n")
    if args.json:
        print_json([{"name": t.name, "description": t.description, "parameters": t.parameters,
                     "plugin": t.plugin, **({"trust": t.trust} if hasattr(t, "trust") else {})}
                    for t in tools.values()])
        return 0
    if not tools:
        sys.stdout.write("no tools (see `sol plugins list`)\n")
    width = max([20] + [len(n) + 1 for n in tools])
    for t in tools.values():
        first = (t.description.strip().splitlines() or [""])[0]
        sys.stdout.write(f"{t.name:<{width}} {t.plugin:<20} {first}\n")
    return 0


def run_call(args) -> int:
    try:
        arguments = json.loads(args.args)
        if not isinstance(arguments, dict):
            raise ValueError(f"expected a JSON object, got {type(arguments).__name__}")
        out = manager(args).call_tool(args.name, arguments, consent=lambda name, arguments: "allow",
                                      override_deny=args.yes)
    except json.JSONDecodeError as e:
        out = {"ok": False, "error": f"--args: invalid JSON at column {e.colno}: {e.msg}"}
    except ValueError as e:
        out = {"ok": False, "error": f"--args: {e}"}
    if args.json:
        print_json(out)
    elif out["ok"]:
        r = out["result"]
        sys.stdout.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    else:
        sys.stderr.write(f"error: {out['error']}\n")
    return 0 if out["ok"] else 1
