"""`sol tools`: the tools plugins give the chat; list them, call one by hand."""
from __future__ import annotations

import json
import sys

from .common import print_json
from .plugins import add_safe_mode, manager


def register(sub) -> None:
    p = sub.add_parser("tools", help="tools the model can call in the chat")
    tsub = p.add_subparsers(dest="tools_command", metavar="ACTION", required=True)
    lp = tsub.add_parser("list", help="every tool of every enabled plugin")
    lp.add_argument("--json", action="store_true")
    add_safe_mode(lp)
    lp.set_defaults(func=run_list)
    cp = tsub.add_parser("call", help="call a tool as the chat would: sol tools call calculator --args "
                                      "'{\"expression\": \"12*7\"}'")
    cp.add_argument("name")
    cp.add_argument("--args", default="{}", help="the arguments, a JSON object")
    cp.add_argument("--json", action="store_true", help='print {"ok": ..., "result"|"error": ...}')
    add_safe_mode(cp)
    cp.set_defaults(func=run_call)


def run_list(args) -> int:
    tools = manager(args).tools()
    if args.json:
        print_json([{"name": t.name, "description": t.description, "parameters": t.parameters,
                     "plugin": t.plugin} for t in tools.values()])
        return 0
    if not tools:
        sys.stdout.write("no tools (see `sol plugins list`)\n")
    for t in tools.values():
        sys.stdout.write(f"{t.name:<20} {t.plugin:<20} {t.description}\n")
    return 0


def run_call(args) -> int:
    try:
        arguments = json.loads(args.args)
        if not isinstance(arguments, dict):
            raise ValueError(f"expected a JSON object, got {type(arguments).__name__}")
        out = manager(args).call_tool(args.name, arguments)
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
