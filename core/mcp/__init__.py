"""Tools from Model Context Protocol servers, on the official `mcp` SDK.

- `config`: `mcp.json` beside sol.db, in the `{"mcpServers": {...}}` shape Claude Desktop, Cursor and
  LM Studio use, plus Sol's trust choices; adding, removing, importing another app's file;
- `client`: one connection per server (stdio or streamable HTTP), started lazily on a shared event-loop
  thread, every request under a timeout, every child process stopped when Sol exits;
- `servers`: the servers as Sol tools (`SERVER.TOOL`), with trust (`ask`, `allow`, `deny`) deciding
  which call needs the user's consent.
"""
