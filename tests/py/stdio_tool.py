"""A small MCP server over stdio for the tests, with answers a real
server could give: `big` answers with a text of `mib` MiB (its `id` first,
or last as the official TypeScript SDK writes it, with `id_last`); `slow`
answers `secs` seconds later, on its own thread; `pid` answers with this
process's pid.

usage: stdio_tool.py (as a tool's command, transport stdio)
"""

import json
import os
import sys
import threading
import time

out = threading.Lock()


def send(msg):
    line = json.dumps(msg, separators=(",", ":")) + "\n"
    with out:
        sys.stdout.write(line)
        sys.stdout.flush()


def answer(id_, result, id_last=False):
    if id_last:
        send({"result": result, "jsonrpc": "2.0", "id": id_})
    else:
        send({"jsonrpc": "2.0", "id": id_, "result": result})


def text(t):
    return {"content": [{"type": "text", "text": t}]}


TOOLS = [
    {"name": n, "inputSchema": {"type": "object"}} for n in ("big", "slow", "pid")
]


def call(id_, name, args):
    if name == "big":
        answer(id_, text("x" * (int(args.get("mib", "5")) << 20)), args.get("id_last") == "yes")
    elif name == "slow":
        time.sleep(float(args.get("secs", "1")))
        answer(id_, text("slow done"))
    elif name == "pid":
        answer(id_, text(str(os.getpid())))
    else:
        send({"jsonrpc": "2.0", "id": id_, "error": {"code": -32602, "message": "unknown tool"}})


for line in sys.stdin:
    msg = json.loads(line)
    method, id_ = msg.get("method"), msg.get("id")
    if id_ is None:
        continue
    if method == "initialize":
        answer(id_, {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "stdio-tool", "version": "1"},
        })
    elif method == "tools/list":
        answer(id_, {"tools": TOOLS})
    elif method == "tools/call":
        p = msg["params"]
        threading.Thread(target=call, args=(id_, p["name"], p.get("arguments", {})), daemon=True).start()
    else:
        answer(id_, {})
