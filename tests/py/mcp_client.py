"""The official MCP Python SDK as a Lever agent would use it.

Reads a plan as JSON (the first argument, or stdin):
  {"url": ".../mcp", "token": "...", "calls": [{"name": ..., "arguments": {...}}]}
connects over streamable HTTP with the capability token as a bearer token,
lists the tools, makes the calls in order, and prints one JSON object:
  {"protocol": ..., "server": ..., "tools": [names],
   "calls": [{"ok": bool, "is_error": bool, "text": ..., "structured": ...,
              "error": {"code", "message", "data"}}]}
"""

import asyncio
import json
import sys

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


async def main(plan):
    headers = {"Authorization": f"Bearer {plan['token']}"}
    out = {"calls": []}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with streamable_http_client(plan["url"], http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                out["protocol"] = init.protocol_version
                out["server"] = init.server_info.name
                tools = await session.list_tools()
                out["tools"] = sorted(t.name for t in tools.tools)
                for call in plan.get("calls", []):
                    entry = {"name": call["name"]}
                    try:
                        r = await session.call_tool(call["name"], call.get("arguments"))
                        entry["ok"] = True
                        entry["is_error"] = bool(getattr(r, "is_error", False))
                        entry["text"] = "".join(
                            getattr(c, "text", "") for c in getattr(r, "content", [])
                        )
                        entry["structured"] = getattr(r, "structured_content", None)
                    except MCPError as e:
                        err = e.error
                        entry["ok"] = False
                        entry["error"] = {
                            "code": err.code,
                            "message": err.message,
                            "data": err.data,
                        }
                    out["calls"].append(entry)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.load(sys.stdin)))
