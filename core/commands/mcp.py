"""`sol mcp`: the Model Context Protocol servers whose tools the chat may call.

    sol mcp add time -- mcp-server-time                      a local server: a command and its arguments
    sol mcp add notes --url http://127.0.0.1:8000/mcp --header 'Authorization: Bearer T'
    sol mcp list [--json]                                    servers, their state and their tools
    sol mcp trust time.get_current_time allow                ask | allow | deny, for a server or one tool
    sol mcp import ~/.config/Claude/claude_desktop_config.json
    sol mcp remove time
"""
from __future__ import annotations

import sys

from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("mcp", help="MCP servers: their tools join the chat's (sol tools list)")
    msub = p.add_subparsers(dest="mcp_command", metavar="ACTION", required=True)
    ap = msub.add_parser("add", help="add a server: NAME -- COMMAND ARGS…, or NAME --url URL",
                         description="sol mcp add NAME [--env KEY=VALUE]… -- COMMAND ARGS…   |   "
                                     "sol mcp add NAME --url URL [--header 'K: V']…")
    ap.add_argument("name", help="letters, digits, - and _: its tools are named NAME.TOOL")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="for a command (repeatable)")
    ap.add_argument("--url", default=None, help="a streamable-HTTP server's address (…/sse: an SSE server)")
    ap.add_argument("--header", action="append", default=[], metavar="'K: V'", help="for a URL (repeatable)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds a start or a call may take (default 30)")
    ap.add_argument("--trust", choices=("ask", "allow", "deny"), default=None,
                    help="for all its tools (default: ask, except tools the server marks read-only)")
    # `-- COMMAND ARGS…` is split off by cli.main (TRAILING_COMMAND) before argparse reads the rest.
    ap.set_defaults(command=[])
    ap.set_defaults(func=run_add)
    lp = msub.add_parser("list", help="servers, their state and their tools (starts each to ask it)")
    lp.add_argument("--json", action="store_true",
                    help='a list of {"name", "transport", "state", "error", "tools": [names]}')
    lp.set_defaults(func=run_list)
    rp = msub.add_parser("remove", help="remove a server from mcp.json")
    rp.add_argument("name")
    rp.set_defaults(func=run_remove)
    ip = msub.add_parser("import", help="add the servers of another app's mcp.json (Claude Desktop, Cursor, "
                                        "LM Studio, VS Code)")
    ip.add_argument("file")
    ip.set_defaults(func=run_import)
    tp = msub.add_parser("trust", help="may the model call it: ask (each time), allow, deny")
    tp.add_argument("target", metavar="NAME[.TOOL]")
    tp.add_argument("trust", choices=("ask", "allow", "deny"))
    tp.set_defaults(func=run_trust)
    for action in ("enable", "disable"):
        ep = msub.add_parser(action, help=f"{action} a server (kept in mcp.json)")
        ep.add_argument("name")
        ep.set_defaults(func=run_enable, disabled=action == "disable")


def _servers():
    from ..errors import SolError
    from ..mcp.servers import McpServers
    servers = McpServers()
    if servers.error:
        raise SolError(servers.error)
    return servers


def _pairs(items: list[str], sep: str, flag: str, example: str) -> dict[str, str]:
    from ..errors import SolError
    out = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key.strip():
            raise SolError(f"{flag} {item!r}: write it as {example}")
        out[key.strip()] = value.strip() if sep == ":" else value
    return out


def run_add(args) -> int:
    from ..errors import SolError
    from ..mcp.config import DEFAULT_TIMEOUT_S, ServerSpec, check_name
    check_name(args.name)
    command = args.command
    if bool(command) == bool(args.url):
        raise SolError("give the server's command after -- (sol mcp add NAME -- COMMAND ARGS…) or its --url, "
                       "one of the two")
    if args.timeout is not None and args.timeout <= 0:
        raise SolError(f"--timeout {args.timeout:g}: must be above 0 seconds")
    spec = ServerSpec(name=args.name, trust=args.trust, timeout=args.timeout or DEFAULT_TIMEOUT_S)
    if command:
        if args.header:
            raise SolError("--header is for a server reached by --url")
        spec.command, spec.args = command[0], command[1:]
        spec.env = _pairs(args.env, "=", "--env", "KEY=VALUE")
    else:
        if args.env:
            raise SolError("--env is for a server started by a command")
        if not args.url.startswith(("http://", "https://")):
            raise SolError(f"--url {args.url!r}: must be an http:// or https:// address")
        spec.url, spec.headers = args.url, _pairs(args.header, ":", "--header", "'Name: value'")
        spec.transport = "sse" if args.url.rstrip("/").endswith("/sse") else "http"
    servers = _servers()
    servers.config.add(spec)
    sys.stdout.write(f"added MCP server {spec.name} to {servers.path}; `sol mcp list` starts it and shows its "
                     "tools\n")
    return 0


def run_list(args) -> int:
    servers = _servers()
    rows = servers.status()
    servers.close()
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        sys.stdout.write(f"no MCP servers (add one with `sol mcp add`, or `sol mcp import FILE`); "
                         f"they are kept in {servers.path}\n")
    for r in rows:
        spec = servers.config.servers[r["name"]]
        where = spec.url if spec.transport != "stdio" else " ".join([spec.command, *spec.args])
        sys.stdout.write(f"{r['name']:<16} {r['transport']:<6} {r['state']:<12} {where}\n")
        if r["error"]:
            sys.stdout.write(f"    error: {r['error']}\n")
    for t in servers.tools(start=False).values():
        sys.stdout.write(f"    {t.name:<40} trust {t.trust}\n")
    return 0


def run_remove(args) -> int:
    servers = _servers()
    servers.config.remove(args.name)
    sys.stdout.write(f"removed MCP server {args.name} from {servers.path}\n")
    return 0


def run_import(args) -> int:
    servers = _servers()
    added, notes = servers.config.import_file(args.file)
    for note in notes:
        sys.stderr.write(f"note: {note}\n")
    sys.stdout.write(f"imported {len(added)} MCP server{'s' if len(added) != 1 else ''} from {args.file}"
                     + (f": {', '.join(added)}" if added else "") + "\n")
    return 0


def run_trust(args) -> int:
    servers = _servers()
    servers.config.set_trust(args.target, args.trust)
    sys.stdout.write(f"{args.target}: {args.trust}\n")
    return 0


def run_enable(args) -> int:
    servers = _servers()
    servers.config.set_disabled(args.name, args.disabled)
    sys.stdout.write(f"{args.name}: {'disabled' if args.disabled else 'enabled'}\n")
    return 0
