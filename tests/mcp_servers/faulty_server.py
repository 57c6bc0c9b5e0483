"""An MCP server written with the SDK's FastMCP (MCPServer since mcp 2) for the fault cases of
tests/test_mcp.py. `python faulty_server.py MODE`:

- `ok`: serves the tools below over stdio;
- `exit`: exits before answering anything (a server that dies at start);
- `garbage`: prints text that is not JSON-RPC on stdout before each answer (a stray print());
- `noise`: not an MCP server at all: answers every line on stdin with a line of text;
- `http PORT`: serves the same tools over streamable HTTP on 127.0.0.1:PORT.

Tools: `echo` (its text back), `hang` (never answers), `fail` (raises: the tool's error reaches the
model), `count` (how many calls this process has answered: a denied call never reaches it), `write`
(appends to the file in $FAULTY_LOG, so a test can see a call arrive)."""
import os
import sys
import time

try:
    from mcp.server.mcpserver import MCPServer as FastMCP
except ImportError:   # mcp 1.x
    from mcp.server.fastmcp import FastMCP
from mcp.types import ToolAnnotations

mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
if mode == "exit":
    sys.stderr.write("faulty: refusing to start\n")
    sys.exit(3)
if mode == "noise":
    for line in sys.stdin:
        print("hello, I am not an MCP server", flush=True)
    sys.exit(0)

server = FastMCP("faulty")
calls = 0


def garbage():
    if mode == "garbage":
        print("this is not JSON-RPC", flush=True)


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def echo(text: str) -> str:
    """Say the text back."""
    global calls
    calls += 1
    garbage()
    return text


@server.tool()
def hang(seconds: float = 3600) -> str:
    """Never answer (well: after `seconds`)."""
    time.sleep(seconds)
    return "woke up"


@server.tool()
def fail(why: str = "it broke") -> str:
    """Raise an error."""
    raise RuntimeError(why)


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def count() -> int:
    """How many echo/write calls this server has answered."""
    return calls


@server.tool()
def write(text: str) -> str:
    """Append a line to $FAULTY_LOG: a call that changes something (so it needs consent)."""
    global calls
    calls += 1
    with open(os.environ["FAULTY_LOG"], "a") as f:
        f.write(text + "\n")
    return f"wrote {len(text)} characters"


if __name__ == "__main__":
    if mode == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
